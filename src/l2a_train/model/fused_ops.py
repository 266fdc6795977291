"""liger-kernel's fused RMSNorm, SwiGLU and RoPE for L2A models on CUDA (`l2a.fused_ops`).

transformers' Qwen modules compute each of these with several elementwise kernels (float32
casts, pow, mean, rsqrt and two multiplies for RMSNorm; silu then multiply; rotate_half's
slices, neg and cat for RoPE), each a full pass over memory. In an L2A training step on an H200
they are about 30% of the device time at 32K tokens (docs/BENCHMARKS.md): an L2A layer has a
third RMSNorm and a second RoPE. liger-kernel (a dependency already, for the fused
cross-entropy) fuses each into one Triton kernel per direction, with the same weights.

The norm and MLP are subclasses of transformers' own classes (same parameters, same names),
so they are still called as modules and DeepSpeed ZeRO-3 gathers their weights as usual. Only
CUDA tensors take liger's path (its RMSNorm does not run on CPU), and only while the model's
config says `l2a_fused_ops="liger"` (a runtime setting); otherwise transformers' forward runs.
liger's RoPE writes its result into q and k in place: they are fresh projections nobody holds.
"""

from __future__ import annotations

import torch
from transformers.models.qwen2 import modeling_qwen2 as qwen2
from transformers.models.qwen3 import modeling_qwen3 as qwen3

FUSED_OPS = ("liger", "none")


def _liger(config, x: torch.Tensor) -> bool:
    return x.is_cuda and getattr(config, "l2a_fused_ops", "none") == "liger"


class _FusedRMSNorm:
    """Mixed into a Qwen RMSNorm class: takes the model config, runs liger's kernel on CUDA."""

    def __init__(self, hidden_size, eps=1e-6, *, config):
        super().__init__(hidden_size, eps=eps)
        self.l2a_config = config

    def forward(self, x):
        if not _liger(self.l2a_config, x):
            return super().forward(x)
        from liger_kernel.ops.rms_norm import LigerRMSNormFunction

        # casting mode "llama" is what the Qwen norms compute; in_place=False keeps dY intact
        return LigerRMSNormFunction.apply(x, self.weight, self.variance_epsilon, 0.0, "llama", False)


class _FusedMLP:
    """Mixed into a Qwen MLP class (down(silu(gate(x)) * up(x))): liger's SwiGLU on CUDA."""

    def forward(self, x):
        if not _liger(self.config, x):
            return super().forward(x)
        from liger_kernel.ops.swiglu import LigerSiLUMulFunction

        return self.down_proj(LigerSiLUMulFunction.apply(self.gate_proj(x), self.up_proj(x)))


# module-level classes (not made on the fly) so that models pickle (torch.save(model))
class FusedQwen2RMSNorm(_FusedRMSNorm, qwen2.Qwen2RMSNorm):
    pass


class FusedQwen3RMSNorm(_FusedRMSNorm, qwen3.Qwen3RMSNorm):
    pass


class FusedQwen2MLP(_FusedMLP, qwen2.Qwen2MLP):
    pass


class FusedQwen3MLP(_FusedMLP, qwen3.Qwen3MLP):
    pass


_FUSED = {qwen2.Qwen2RMSNorm: FusedQwen2RMSNorm, qwen3.Qwen3RMSNorm: FusedQwen3RMSNorm,
          qwen2.Qwen2MLP: FusedQwen2MLP, qwen3.Qwen3MLP: FusedQwen3MLP}


def fusable(base: type) -> type:
    """The fusable subclass of a Qwen RMSNorm (it then takes `config=`) or MLP class."""
    return _FUSED[base]


def rotary(apply_rotary_pos_emb, q, k, cos, sin, config):
    """RoPE of q [B, L, HQ, D] and k [B, L, H, D] with cos/sin [B, L, D]."""
    if not _liger(config, q):
        return apply_rotary_pos_emb(q, k, cos, sin, unsqueeze_dim=2)
    from liger_kernel.transformers.rope import liger_rotary_pos_emb

    # liger takes [B, heads, L, D] and works on the [B, L, heads, D] layout internally
    q, k = liger_rotary_pos_emb(q.transpose(1, 2), k.transpose(1, 2), cos, sin)
    return q.transpose(1, 2), k.transpose(1, 2)
