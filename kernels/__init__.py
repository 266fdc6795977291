"""l2a_kernels: query-sparse global attention and sliding-window attention (leaf package).

Public ops (packed "varlen" layout, differentiable; they validate their inputs):
    conditional_attention(q, k, v, route, *, cu_seqlens=None, documents=None, scale=None, dense_forward=False,
                          plan=None)
    sliding_window_attention(q, k, v, window, *, cu_seqlens=None, documents=None, scale=None, plan=None)
Inputs prepared once for many calls, so that the calls need no host sync:
    document_bounds(cu_seqlens, T, device) -> DocumentBounds (validated; pass as documents=)
    routed_tokens(route) -> RoutedTokens (the routed positions; pass as route), RoutedTokens.every(T, device)
Launch plans (frozen; the ops use `default_plan(head_dim, INTERPRETED)` when none is passed):
    LaunchPlan, KernelConfig, default_plan (l2a_kernels.plan).
INTERPRETED: whether the kernels run in the Triton interpreter (TRITON_INTERPRET=1 at import).
ATTENTION_FORWARD_OP: the registered operator of the forward kernel, for checkpoint policies.
Ground truth in pure PyTorch: l2a_kernels.reference. Benchmark and tuning: python -m l2a_kernels.bench.
Registers and spills of the launch configs, no GPU needed: python -m l2a_kernels.resources.
"""

# Absolute imports on purpose: with the repository root on sys.path (`python -m ...` run from
# it) this folder is also importable as `kernels`, and transformers imports a package of that
# name to probe for Hugging Face's `kernels`. That copy then re-exports the one `l2a_kernels`
# instead of loading its modules a second time (a second registration of the attention
# operator, bound to a second copy of the kernels).
from l2a_kernels import reference
from l2a_kernels.ops import (
    ATTENTION_FORWARD_OP,
    INTERPRETED,
    DocumentBounds,
    RoutedTokens,
    conditional_attention,
    document_bounds,
    routed_tokens,
    sliding_window_attention,
)
from l2a_kernels.plan import KernelConfig, LaunchPlan, default_plan

__all__ = [
    "ATTENTION_FORWARD_OP",
    "INTERPRETED",
    "DocumentBounds",
    "KernelConfig",
    "LaunchPlan",
    "RoutedTokens",
    "conditional_attention",
    "default_plan",
    "document_bounds",
    "reference",
    "routed_tokens",
    "sliding_window_attention",
]
