"""`l2a-prune`: post-training pruning of L2A layers whose router (almost) never fires
(`l2a_train.prune_checkpoint`).

    l2a-prune model.path=checkpoints/quickstart-l2a calibration.path=data/quickstart output=checkpoints/quickstart-pruned
"""

from l2a_common import hydra_app
from l2a_train.prune_checkpoint import prune

main = hydra_app("prune")(prune)

if __name__ == "__main__":
    main()
