"""`l2a-train`: continued pretraining of an L2A model with DeepSpeed (`l2a_train.training.run`).

    l2a-train experiment=quickstart
    torchrun --nproc_per_node=8 -m l2a_train.cli.train experiment=qwen3_8b_128k model.path=... data.path=...
    l2a-train -m experiment=... trainer.lr=2e-5,5e-5     # a sweep (one job folder each)
"""

from omegaconf import OmegaConf

from l2a_common import hydra_app
from l2a_train.training import run
from l2a_train.training.sweep import job_dirname

# sweep job folders: Hydra's override_dirname made safe for paths (configs/train.yaml)
if not OmegaConf.has_resolver("l2a_job_dir"):
    OmegaConf.register_new_resolver("l2a_job_dir", job_dirname)

main = hydra_app("train")(run)

if __name__ == "__main__":
    main()
