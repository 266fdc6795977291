"""L2A models for Qwen2.5 and Qwen3 (docs/METHOD.md), registered with transformers' Auto
classes on import, so `AutoModelForCausalLM.from_pretrained(dir)` loads an L2A checkpoint."""

from transformers import AutoConfig, AutoModel, AutoModelForCausalLM

from .config import L2AQwen2Config, L2AQwen3Config
from .convert import apply_trainable, build_base, build_model, convert_model, l2a_group, select_layers
from .documents import DocumentLayout
from .pruning import kv_cache_bytes, prune_layers
from .modeling import (
    L2AModelOutput,
    L2AQwen2ForCausalLM,
    L2AQwen2Model,
    L2AQwen3ForCausalLM,
    L2AQwen3Model,
)

for _config, _model, _lm in (
    (L2AQwen2Config, L2AQwen2Model, L2AQwen2ForCausalLM),
    (L2AQwen3Config, L2AQwen3Model, L2AQwen3ForCausalLM),
):
    AutoConfig.register(_config.model_type, _config, exist_ok=True)
    AutoModel.register(_config, _model, exist_ok=True)
    AutoModelForCausalLM.register(_config, _lm, exist_ok=True)

__all__ = [
    "DocumentLayout",
    "L2AModelOutput",
    "L2AQwen2Config",
    "L2AQwen2ForCausalLM",
    "L2AQwen2Model",
    "L2AQwen3Config",
    "L2AQwen3ForCausalLM",
    "L2AQwen3Model",
    "apply_trainable",
    "build_base",
    "build_model",
    "convert_model",
    "l2a_group",
    "kv_cache_bytes",
    "prune_layers",
    "select_layers",
]
