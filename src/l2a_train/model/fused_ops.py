"""liger-kernel's fused RMSNorm, SwiGLU and RoPE for L2A models on CUDA (`l2a.fused_ops`).

transformers' Qwen modules compute each of these with several elementwise kernels (float32
casts, pow, mean, rsqrt and two multiplies for RMSNorm; silu then multiply; rotate_half's
slices, neg and cat for RoPE), each a full pass over memory. In an L2A training step on an H200
they are about 30% of the device time at 32K tokens (docs/BENCHMARKS.md): an L2A layer has a
third RMSNorm and a second RoPE. liger-kernel (a dependency already, for the fused
cross-entropy) fuses each into one Triton kernel per direction, with the same weights.

Only CUDA tensors take liger's path (its RMSNorm does not run on CPU); everywhere else, and
with `fused_ops: none`, transformers' modules compute as before. liger's RoPE writes its result
into q and k in place, which is safe here: they are fresh projections nobody else holds.
"""

from __future__ import annotations

import torch

FUSED_OPS = ("liger", "none")


def _liger(config, x: torch.Tensor) -> bool:
    return x.is_cuda and getattr(config, "l2a_fused_ops", "none") == "liger"


def rms_norm(module, x: torch.Tensor, config) -> torch.Tensor:
    """`module(x)` for a Qwen2/Qwen3 RMSNorm (float32 statistics, cast back, then the weight)."""
    if not _liger(config, x):
        return module(x)
    from liger_kernel.ops.rms_norm import LigerRMSNormFunction

    # casting mode "llama" is what the Qwen modules compute; in_place=False keeps dY intact
    return LigerRMSNormFunction.apply(x, module.weight, module.variance_epsilon, 0.0, "llama", False)


def mlp(module, x: torch.Tensor, config) -> torch.Tensor:
    """`module(x)` for a Qwen SwiGLU MLP: down(silu(gate(x)) * up(x))."""
    if not _liger(config, x):
        return module(x)
    from liger_kernel.ops.swiglu import LigerSiLUMulFunction

    return module.down_proj(LigerSiLUMulFunction.apply(module.gate_proj(x), module.up_proj(x)))


def rotary(apply_rotary_pos_emb, q, k, cos, sin, config):
    """RoPE of q [B, L, HQ, D] and k [B, L, H, D] with cos/sin [B, L, D]."""
    if not _liger(config, q):
        return apply_rotary_pos_emb(q, k, cos, sin, unsqueeze_dim=2)
    from liger_kernel.transformers.rope import liger_rotary_pos_emb

    # liger takes [B, heads, L, D] and works on the [B, L, heads, D] layout internally
    q, k = liger_rotary_pos_emb(q.transpose(1, 2), k.transpose(1, 2), cos, sin)
    return q.transpose(1, 2), k.transpose(1, 2)
