"""L2A model configs: the Qwen2/Qwen3 configs plus the L2A fields, saved in config.json.

`l2a_layer_types[i]` says what layer i computes:
- "global": full causal attention (an unconverted layer, exactly the base model's);
- "swa":    sliding-window attention only (SWA baseline, static-hybrid local layers, pruned layers);
- "l2a":    sliding-window attention, then global attention for the tokens the router selects.
"""

from __future__ import annotations

from transformers import Qwen2Config, Qwen3Config

from l2a_common import UserError

LAYER_TYPES = ("global", "swa", "l2a")
ROUTINGS = ("learned", "random")

# What a config.json that lacks an L2A field means. Not the settings' defaults (those live in
# configs/l2a/*.yaml alone, and conversion writes every field): transformers saves only the fields
# that differ from a default-constructed config, so checkpoints already written rely on these
# values, and changing one would change how they load.
CONFIG_JSON_DEFAULTS = dict(
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
        for key, default in CONFIG_JSON_DEFAULTS.items():
            setattr(self, key, kwargs.pop(key, default))
        return kwargs

    def _finish_l2a(self) -> None:
        if self.l2a_layer_types is None:
            self.l2a_layer_types = ["global"] * self.num_hidden_layers
        self.l2a_layer_types = list(self.l2a_layer_types)
        self.validate_l2a()

    def validate_l2a(self) -> None:
        """The one check of the L2A fields, whoever sets them (l2a-convert from the `l2a` group, the
        runtime settings applied to a loaded checkpoint, a config.json): one line naming the
        setting (`l2a.<key>`)."""
        if len(self.l2a_layer_types) != self.num_hidden_layers:
            raise UserError(
                f"l2a_layer_types has {len(self.l2a_layer_types)} entries for {self.num_hidden_layers} layers"
            )
        bad = sorted(set(self.l2a_layer_types) - set(LAYER_TYPES))
        if bad:
            raise UserError(f"l2a_layer_types: unknown type(s) {bad}; allowed {LAYER_TYPES}")
        if int(self.l2a_window) < 1:
            raise UserError(f"l2a.window={self.l2a_window}: the sliding window must be at least 1 token")
        if not 0.0 < float(self.l2a_threshold) < 1.0:
            raise UserError(f"l2a.threshold={self.l2a_threshold}: must be strictly between 0 and 1")
        if float(self.l2a_temperature) <= 0.0:
            raise UserError(f"l2a.temperature={self.l2a_temperature}: must be > 0")
        if not 0.0 <= float(self.l2a_p_dense) <= 1.0:
            raise UserError(f"l2a.p_dense={self.l2a_p_dense}: must be in [0, 1]")
        if self.l2a_routing not in ROUTINGS:
            raise UserError(f"l2a_routing='{self.l2a_routing}' is not one of {ROUTINGS}")
        if not 0.0 <= float(self.l2a_random_rate) <= 1.0:
            raise UserError(f"l2a.random_rate={self.l2a_random_rate}: must be in [0, 1]")
        from .attention import BACKENDS
        from .fused_ops import FUSED_OPS

        if self.l2a_backend not in BACKENDS:
            raise UserError(f"l2a.backend='{self.l2a_backend}' is not one of {BACKENDS}")
        if self.l2a_fused_ops not in FUSED_OPS:
            raise UserError(f"l2a.fused_ops='{self.l2a_fused_ops}' is not one of {FUSED_OPS}")

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
