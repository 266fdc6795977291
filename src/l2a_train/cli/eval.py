"""`l2a-eval`: long-context evaluation of any checkpoint (`l2a_train.evaluation.evaluate`).

    l2a-eval model.path=checkpoints/quickstart-l2a data.path=data/quickstart output=results/eval
    l2a-eval eval=ruler model.path=/ckpt/qwen3-8b-l2a data.path=/data/heldout output=results/qwen3-8b-l2a
"""

from l2a_common import hydra_app
from l2a_train.evaluation.evaluate import evaluate

main = hydra_app("eval")(evaluate)

if __name__ == "__main__":
    main()
