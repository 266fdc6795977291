"""L2A model configs: the Qwen2/Qwen3 configs plus the L2A fields, saved in config.json.

`l2a_layer_types[i]` says what layer i computes:
- "global": full causal attention (an unconverted layer, exactly the base model's);
- "swa":    sliding-window attention only (SWA baseline, static-hybrid local layers, pruned layers);
- "l2a":    sliding-window attention, then global attention for the tokens the router selects.
"""

from __future__ import annotations

from transformers import Qwen2Config, Qwen3Config

LAYER_TYPES = ("global", "swa", "l2a")
ROUTINGS = ("learned", "random")

L2A_DEFAULTS = dict(
    l2a_layer_types=None,  # None: every layer "global" (a plain model in L2A clothing)
    l2a_window=4095,
    l2a_temperature=0.1,
    l2a_threshold=0.5,
    l2a_p_dense=0.1,
    l2a_routing="learned",
    l2a_random_rate=0.2,
    l2a_backend="auto",
    l2a_fused_ops="liger",
)


class L2AConfigMixin:
    """Adds and validates the L2A fields; the values come from configs/l2a/*.yaml via conversion."""

    def _init_l2a(self, kwargs: dict) -> dict:
        for key, default in L2A_DEFAULTS.items():
            setattr(self, key, kwargs.pop(key, default))
        return kwargs

    def _finish_l2a(self) -> None:
        if self.l2a_layer_types is None:
            self.l2a_layer_types = ["global"] * self.num_hidden_layers
        self.l2a_layer_types = list(self.l2a_layer_types)
        self.validate_l2a()

    def validate_l2a(self) -> None:
        if len(self.l2a_layer_types) != self.num_hidden_layers:
            raise ValueError(
                f"l2a_layer_types has {len(self.l2a_layer_types)} entries for {self.num_hidden_layers} layers"
            )
        bad = sorted(set(self.l2a_layer_types) - set(LAYER_TYPES))
        if bad:
            raise ValueError(f"l2a_layer_types: unknown type(s) {bad}; allowed {LAYER_TYPES}")
        if int(self.l2a_window) < 1:
            raise ValueError(f"l2a.window must be >= 1, got {self.l2a_window}")
        if not 0.0 < float(self.l2a_threshold) < 1.0:
            raise ValueError(f"l2a.threshold must be in (0, 1), got {self.l2a_threshold}")
        if float(self.l2a_temperature) <= 0.0:
            raise ValueError(f"l2a.temperature must be > 0, got {self.l2a_temperature}")
        if not 0.0 <= float(self.l2a_p_dense) <= 1.0:
            raise ValueError(f"l2a.p_dense must be in [0, 1], got {self.l2a_p_dense}")
        if self.l2a_routing not in ROUTINGS:
            raise ValueError(f"l2a routing must be one of {ROUTINGS}, got {self.l2a_routing}")
        if not 0.0 <= float(self.l2a_random_rate) <= 1.0:
            raise ValueError(f"l2a.random_rate must be in [0, 1], got {self.l2a_random_rate}")
        from .fused_ops import FUSED_OPS

        if self.l2a_fused_ops not in FUSED_OPS:
            raise ValueError(f"l2a.fused_ops must be one of {FUSED_OPS}, got '{self.l2a_fused_ops}'")

    @property
    def num_l2a_layers(self) -> int:
        return sum(t == "l2a" for t in self.l2a_layer_types)


class L2AQwen2Config(L2AConfigMixin, Qwen2Config):
    model_type = "l2a_qwen2"

    def __init__(self, **kwargs):
        kwargs = self._init_l2a(kwargs)
        super().__init__(**kwargs)
        self._finish_l2a()


class L2AQwen3Config(L2AConfigMixin, Qwen3Config):
    model_type = "l2a_qwen3"

    def __init__(self, **kwargs):
        kwargs = self._init_l2a(kwargs)
        super().__init__(**kwargs)
        self._finish_l2a()


CONFIG_BY_FAMILY = {"qwen2": L2AQwen2Config, "qwen3": L2AQwen3Config}
FAMILY_BY_MODEL_TYPE = {"qwen2": "qwen2", "qwen3": "qwen3", "l2a_qwen2": "qwen2", "l2a_qwen3": "qwen3"}
