"""`l2a-convert`: a base Qwen2/Qwen3 checkpoint (or a config) -> an L2A checkpoint directory
(`l2a_train.convert_checkpoint`)."""

from l2a_common import hydra_app
from l2a_train.convert_checkpoint import convert

main = hydra_app("convert")(convert)

if __name__ == "__main__":
    main()
