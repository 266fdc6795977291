"""l2a_kernels: query-sparse global attention and sliding-window attention (leaf package).

Public ops (packed "varlen" layout, differentiable):
    conditional_attention(q, k, v, route, *, cu_seqlens=None, scale=None, dense_forward=False)
    sliding_window_attention(q, k, v, window, *, cu_seqlens=None, scale=None)
Ground truth in pure PyTorch: l2a_kernels.reference. Benchmark: python -m l2a_kernels.bench.
Registers and spills of the launch configs, no GPU needed: python -m l2a_kernels.resources.
"""

from . import reference
from .ops import conditional_attention, sliding_window_attention

__all__ = ["conditional_attention", "sliding_window_attention", "reference"]
