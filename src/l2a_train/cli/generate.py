"""`l2a-generate`: continue a prompt with any checkpoint, through the L2A KV cache
(`l2a_train.generation`).

    l2a-generate model.path=checkpoints/quickstart-pruned "prompt='def fibonacci(n):'"
"""

from l2a_common import hydra_app
from l2a_train.generation import generate

main = hydra_app("generate")(generate)

if __name__ == "__main__":
    main()
