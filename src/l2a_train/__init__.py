"""l2a-train: long-context continued pretraining with L2A (Learning To Attend) layers.

Importing the package registers the L2A model types (`l2a_qwen2`, `l2a_qwen3`) with
transformers' Auto classes.
"""

from . import model  # noqa: F401  (registration side effect)

__version__ = "0.1.0"
