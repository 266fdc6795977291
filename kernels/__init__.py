"""l2a_kernels: query-sparse global attention and sliding-window attention (leaf package).

Public ops (packed "varlen" layout, differentiable):
    conditional_attention(q, k, v, route, *, cu_seqlens=None, scale=None, dense_forward=False, plan=None)
    sliding_window_attention(q, k, v, window, *, cu_seqlens=None, scale=None, plan=None)
Launch plans (frozen; the ops use `default_plan(head_dim, INTERPRETED)` when none is passed):
    LaunchPlan, KernelConfig, default_plan (l2a_kernels.plan).
INTERPRETED: whether the kernels run in the Triton interpreter (TRITON_INTERPRET=1 at import).
ATTENTION_FORWARD_OP: the registered operator of the forward kernel, for checkpoint policies.
Ground truth in pure PyTorch: l2a_kernels.reference. Benchmark and tuning: python -m l2a_kernels.bench.
Registers and spills of the launch configs, no GPU needed: python -m l2a_kernels.resources.
"""

from . import reference
from .ops import ATTENTION_FORWARD_OP, INTERPRETED, conditional_attention, sliding_window_attention
from .plan import KernelConfig, LaunchPlan, default_plan

__all__ = [
    "ATTENTION_FORWARD_OP",
    "INTERPRETED",
    "KernelConfig",
    "LaunchPlan",
    "conditional_attention",
    "default_plan",
    "reference",
    "sliding_window_attention",
]
