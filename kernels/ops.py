"""Public attention ops: validation, dispatch and autograd around the Triton kernels."""

from __future__ import annotations

import math
import numbers
from dataclasses import dataclass
from typing import Optional

import torch

from . import _triton_attn, reference
from .plan import HEAD_DIMS, KernelConfig, LaunchPlan, default_plan

__all__ = [
    "ATTENTION_FORWARD_OP", "INTERPRETED", "DocumentBounds", "RoutedTokens", "conditional_attention", "document_bounds",
    "routed_tokens", "sliding_window_attention",
]

# Whether the kernels run in the Triton interpreter (TRITON_INTERPRET=1 when l2a_kernels was
# first imported; see _triton_attn) instead of compiled for the GPU.
INTERPRETED = _triton_attn.INTERPRETED

# Name of the registered operator that launches the forward kernel. Selective activation
# checkpointing sees operators, not Python calls: a checkpoint policy that lists this one keeps
# the attention outputs instead of recomputing them (l2a_train.model.checkpointing does).
ATTENTION_FORWARD_OP = "l2a_kernels::attention_forward"


# ----------------------------------------------------------------------------- validation


def _check_qkv(q, k, v):
    for name, t in (("q", q), ("k", k), ("v", v)):
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
        if t.dim() != 3:
            raise ValueError(f"{name} must have shape [T, heads, head_dim], got {tuple(t.shape)}")
    if k.shape != v.shape:
        raise ValueError(f"k and v must have the same shape, got k {tuple(k.shape)} and v {tuple(v.shape)}")
    if q.shape[0] != k.shape[0]:
        raise ValueError(f"q and k must have the same length T, got q {q.shape[0]} and k {k.shape[0]}")
    if q.shape[2] != k.shape[2]:
        raise ValueError(f"q and k must have the same head_dim, got q {q.shape[2]} and k {k.shape[2]}")
    if q.shape[1] % k.shape[1] != 0:
        raise ValueError(
            f"q heads ({q.shape[1]}) must be a multiple of k/v heads ({k.shape[1]}) for grouped-query attention"
        )
    if not (q.dtype == k.dtype == v.dtype):
        raise TypeError(f"q, k, v must share a dtype, got q {q.dtype}, k {k.dtype}, v {v.dtype}")
    if q.dtype not in (torch.float16, torch.bfloat16, torch.float32):
        raise TypeError(f"q/k/v dtype must be float16, bfloat16 or float32, got {q.dtype}")
    if not (q.device == k.device == v.device):
        raise ValueError(f"q, k, v must be on one device, got q {q.device}, k {k.device}, v {v.device}")


def _check_cu_seqlens(cu_seqlens, T, device):
    """Validated int32 copy of cu_seqlens on `device`, or None. One host sync."""
    if cu_seqlens is None:
        return None
    if not isinstance(cu_seqlens, torch.Tensor):
        raise TypeError(f"cu_seqlens must be a torch.Tensor, got {type(cu_seqlens).__name__}")
    if cu_seqlens.dim() != 1 or cu_seqlens.numel() < 2:
        raise ValueError(f"cu_seqlens must be 1-D with num_docs + 1 >= 2 entries, got shape {tuple(cu_seqlens.shape)}")
    if cu_seqlens.dtype not in (torch.int32, torch.int64):
        raise TypeError(f"cu_seqlens must be int32 (or int64), got {cu_seqlens.dtype}")
    cu = cu_seqlens.to(device=device, dtype=torch.int32)
    first, last, decreasing = torch.stack([cu[0], cu[-1], (cu[1:] < cu[:-1]).any().int()]).tolist()
    if first != 0:
        raise ValueError(f"cu_seqlens must start at 0, got {first}")
    if last != T:
        raise ValueError(f"cu_seqlens must end at T = {T} (the length of q), got {last}")
    if decreasing:
        raise ValueError("cu_seqlens must be non-decreasing (document starts in order)")
    return cu


def _check_common(q, k, v, cu_seqlens, documents, scale) -> tuple["DocumentBounds", float]:
    """The validated document bounds (from cu_seqlens: one host sync; from documents: none)
    and the scale."""
    _check_qkv(q, k, v)
    if q.shape[2] not in HEAD_DIMS:
        raise ValueError(f"head_dim must be one of {HEAD_DIMS}, got {q.shape[2]}")
    if scale is not None and not (isinstance(scale, (int, float)) and math.isfinite(scale) and scale > 0):
        raise ValueError(f"scale must be a positive finite float or None, got {scale!r}")
    T = q.shape[0]
    if documents is None:
        documents = document_bounds(cu_seqlens, T, q.device)
    elif cu_seqlens is not None:
        raise ValueError("pass cu_seqlens or documents, not both (documents = document_bounds(cu_seqlens, T, device))")
    elif not isinstance(documents, DocumentBounds):
        raise TypeError(f"documents must be an l2a_kernels.DocumentBounds, got {type(documents).__name__}")
    elif documents.length != T or documents.docstart.device != q.device:
        raise ValueError(f"documents were made for {documents.length} tokens on {documents.docstart.device}, "
                         f"q has T = {T} on {q.device}")
    scale = 1.0 / math.sqrt(q.shape[2]) if scale is None else float(scale)
    return documents, scale


def _check_route(route, T, device) -> "RoutedTokens":
    """RoutedTokens from a bool route (one host sync: the routed count) or as passed."""
    if isinstance(route, RoutedTokens):
        if route.mask.shape != (T,) or route.mask.device != device:
            raise ValueError(f"route (RoutedTokens) was made for {tuple(route.mask.shape)} tokens on "
                             f"{route.mask.device}, q has T = {T} on {device}")
        return route
    if not isinstance(route, torch.Tensor):
        raise TypeError(f"route must be a torch.Tensor or l2a_kernels.RoutedTokens, got {type(route).__name__}")
    if route.shape != (T,):
        raise ValueError(f"route must have shape [T] = [{T}], got {tuple(route.shape)}")
    return routed_tokens(route.to(device))


def _use_triton(q) -> bool:
    return q.is_cuda or INTERPRETED


def _plan(plan, q) -> LaunchPlan:
    """The plan to launch with: the one passed, else the default for q's head dim."""
    if plan is None:
        return default_plan(q.shape[2], INTERPRETED)
    if not isinstance(plan, LaunchPlan):
        raise TypeError(f"plan must be an l2a_kernels.LaunchPlan or None, got {type(plan).__name__}")
    if not _use_triton(q):
        raise ValueError("plan= applies to the Triton kernels, which do not run on CPU tensors here: pass "
                         "CUDA tensors, or set TRITON_INTERPRET=1 before importing l2a_kernels")
    return plan


# ----------------------------------------------------------------------------- prepared inputs


@dataclass(frozen=True)
class DocumentBounds:
    """The validated documents of a packed sequence of `length` tokens, with each token's
    document start and end as the kernels read them. Made by `document_bounds` (one host sync
    to validate) and then passed as `documents=` to any number of op calls, which neither
    validate nor compute them again (a model makes one per forward)."""

    cu_seqlens: Optional[torch.Tensor]  # int32 [num_docs + 1], or None: one document
    docstart: torch.Tensor  # int32 [length]
    docend: torch.Tensor  # int32 [length]
    length: int


def document_bounds(cu_seqlens: Optional[torch.Tensor], length: int, device) -> DocumentBounds:
    """Validates cu_seqlens for a sequence of `length` tokens (one host sync; none for None,
    one document) and computes the per-token document bounds on `device`."""
    cu = _check_cu_seqlens(cu_seqlens, length, device)
    if cu is None:
        docstart = torch.zeros(length, dtype=torch.int32, device=device)
        docend = torch.full((length,), length, dtype=torch.int32, device=device)
    else:
        doc = torch.searchsorted(cu, torch.arange(length, dtype=torch.int32, device=device), right=True) - 1
        docstart, docend = cu[doc].contiguous(), cu[doc + 1].contiguous()
    return DocumentBounds(cu_seqlens=cu, docstart=docstart, docend=docend, length=length)


@dataclass(frozen=True)
class RoutedTokens:
    """A route and the positions of its routed tokens, in order, for `conditional_attention`.
    Made by `routed_tokens` (one host sync: the compact kernels size their launch by the count)
    or `RoutedTokens.every` (no sync), so a caller that needs the same route again (activation
    checkpointing recomputes a layer) can keep it instead of paying the sync twice."""

    mask: torch.Tensor  # bool [T]
    positions: torch.Tensor  # int32 [number routed], increasing

    @classmethod
    def every(cls, length: int, device) -> "RoutedTokens":
        """Every token routed."""
        return cls(mask=torch.ones(length, dtype=torch.bool, device=device),
                   positions=torch.arange(length, dtype=torch.int32, device=device))


def routed_tokens(route: torch.Tensor) -> RoutedTokens:
    """RoutedTokens of a bool [T] route (one host sync)."""
    if not isinstance(route, torch.Tensor):
        raise TypeError(f"route must be a torch.Tensor, got {type(route).__name__}")
    if route.dim() != 1:
        raise ValueError(f"route must have shape [T], got {tuple(route.shape)}")
    if route.dtype != torch.bool:
        raise TypeError(f"route must be a bool tensor, got {route.dtype}")
    # compaction: stable order, original positions kept for the masks
    return RoutedTokens(mask=route, positions=torch.nonzero(route).squeeze(1).to(torch.int32))


def _last_dim_contiguous(t):
    return t if t.stride(-1) == 1 else t.contiguous()


# ----------------------------------------------------------------------------- autograd


# The forward kernel launch is a registered operator (ATTENTION_FORWARD_OP), not a plain
# Python call. `launch` is the forward's part of the LaunchPlan as integers (an operator takes
# no Python objects): block_m, block_n, num_warps, num_stages, fwd_kv_tma.
@torch.library.custom_op(ATTENTION_FORWARD_OP, mutates_args=())
def _attention_forward(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, pos: Optional[torch.Tensor], docstart: torch.Tensor,
    window: Optional[int], scale: float, launch: list[int],
) -> tuple[torch.Tensor, torch.Tensor]:
    block_m, block_n, num_warps, num_stages, kv_tma = launch
    config = KernelConfig(block_m, block_n, num_warps, num_stages)
    return _triton_attn.forward(q, k, v, pos, docstart, window, scale, config, bool(kv_tma))


@_attention_forward.register_fake
def _(q, k, v, pos, docstart, window, scale, launch):
    n = q.shape[0] if pos is None else pos.shape[0]
    return torch.empty_like(q), q.new_empty((n, q.shape[1]), dtype=torch.float32)


class _Attention(torch.autograd.Function):
    """pos: the rows the forward computes (None: every token); grad_pos: the rows whose output
    gradient is propagated (the routed rows; None: every token). They differ only for the dense
    forward of conditional_attention. kept/key: see `_check_kept`."""

    @staticmethod
    def forward(ctx, q, k, v, pos, grad_pos, docstart, docend, window, scale, plan, kept, key):
        q, k, v = (_last_dim_contiguous(t) for t in (q, k, v))
        if kept is not None and key in kept:  # the recomputation of a kept call: its forward's result
            out, lse = kept.pop(key)
        else:
            cfg = plan.fwd
            launch = [cfg.block_m, cfg.block_n, cfg.num_warps, cfg.num_stages, int(plan.fwd_kv_tma)]
            out, lse = _attention_forward(q, k, v, pos, docstart, window, scale, launch)
            if pos is None and grad_pos is not None:
                lse = lse.index_select(0, grad_pos)
            if kept is not None:
                kept[key] = (out.detach(), lse)
        ctx.save_for_backward(q, k, v, out, lse, grad_pos, docstart, docend)
        ctx.window, ctx.scale, ctx.plan = window, scale, plan
        return out

    @staticmethod
    def backward(ctx, dout):
        q, k, v, out, lse, grad_pos, docstart, docend = ctx.saved_tensors
        dq, dk, dv = _triton_attn.backward(
            _last_dim_contiguous(dout), q, k, v, out, lse, grad_pos, docstart, docend, ctx.window, ctx.scale, ctx.plan
        )
        return dq, dk, dv, None, None, None, None, None, None, None, None, None


def _check_kept(kept, key):
    """kept: None, or a dict the caller owns, with key (any hashable) naming this call.

    The first call with a key runs the forward kernel and puts its result (output and softmax
    statistics) in kept; the next call with that key takes it out instead of running the kernel
    again. That is activation checkpointing's recomputation with the attention output kept: the
    caller recomputes everything else and passes the same q, k, v again (the backward reads the
    q, k, v of the second call with the output of the first, as torch's selective checkpointing
    would). Done here rather than with a selective-checkpointing policy because such a policy
    sees every operator of the recomputed layer on the host (a Python dispatch mode), which at
    32K tokens costs more host time than the GPU has work to hide it."""
    if kept is None:
        return
    if not isinstance(kept, dict):
        raise TypeError(f"kept must be a dict or None, got {type(kept).__name__}")
    if key is None:
        raise ValueError("kept= needs key= (a name for this call, e.g. (layer, 'global'))")


# ----------------------------------------------------------------------------- public ops


def conditional_attention(q, k, v, route, *, cu_seqlens=None, documents=None, scale=None, dense_forward=False,
                          plan=None, kept=None, key=None):
    """Query-sparse causal attention with documents and native grouped-query attention.

    Args:
        q: [T, HQ, D] queries; k, v: [T, H, D] keys and values, HQ a multiple of H.
            float16 / bfloat16 (float32 accepted: exact dots, slower). D in 16, 32, 64, 128.
        route: bool [T], one decision per token shared by all heads, or the `RoutedTokens` of
            one (`routed_tokens(route)`, made once for several calls).
        cu_seqlens: int32 [num_docs + 1] document boundaries, 0 first, T last, non-decreasing
            (empty documents allowed); None means one document.
        documents: instead of cu_seqlens, its `DocumentBounds` (`document_bounds(cu_seqlens,
            T, device)`, made once for several calls).
        scale: softmax scale, default 1 / sqrt(D).
        dense_forward: L2A's dense path. The forward computes causal attention for every token
            (no zeros), the backward propagates only the routed tokens' output gradient, as the
            query-sparse backward does. Exact when the caller multiplies the output by the 0/1
            route, which L2A does (out * d): the other rows' gradient is then zero anyway. The
            backward then costs ~density x that of causal attention instead of 1x.
        plan: the kernels' LaunchPlan (l2a_kernels.plan), default `default_plan(D, INTERPRETED)`.
        kept, key: keep the forward's result for a recomputation of this call (activation
            checkpointing): a dict and this call's name in it. The first call with the key fills
            it, the second takes it out and runs no forward kernel. Triton path only (the CPU
            fallback recomputes).

    Returns:
        out [T, HQ, D] in q's dtype: for a routed token, causal attention over the earlier keys
        (itself included) of its own document; exactly 0 for every other token. Differentiable
        with respect to q, k, v (route and cu_seqlens get no gradient).

    Runs the Triton kernels on CUDA tensors, and on CPU tensors when the kernels run
    interpreted (INTERPRETED: TRITON_INTERPRET=1 when l2a_kernels was first imported). CPU
    tensors without the interpreter fall back, explicitly, to the float32 PyTorch reference
    (l2a_kernels.reference), which is what the model uses on CPU. Host syncs: one to validate
    cu_seqlens (none with documents=), one to count the routed tokens of a bool route (none
    with RoutedTokens).
    """
    docs, scale = _check_common(q, k, v, cu_seqlens, documents, scale)
    tokens = _check_route(route, q.shape[0], q.device)
    plan = _plan(plan, q)
    _check_kept(kept, key)
    if not _use_triton(q):
        return reference.conditional_attention(q, k, v, tokens.mask, cu_seqlens=docs.cu_seqlens, scale=scale,
                                               dense_forward=dense_forward)
    pos = tokens.positions
    return _Attention.apply(q, k, v, None if dense_forward else pos, pos, docs.docstart, docs.docend, None, scale,
                            plan, kept, key)


def sliding_window_attention(q, k, v, window, *, cu_seqlens=None, documents=None, scale=None, plan=None,
                             kept=None, key=None):
    """Causal sliding-window attention with documents and native grouped-query attention.

    Each token attends to the last `window` keys of its own document, itself included
    (window=1: only itself; window >= T: full causal attention). Shapes, dtypes, cu_seqlens or
    documents, scale, plan, kept/key and the CPU fallback as in conditional_attention (no host
    sync with documents=). Uses the same Triton kernels
    with compaction off and the window bound on the key loops (measured against
    FlexAttention in docs/BENCHMARKS.md).
    """
    docs, scale = _check_common(q, k, v, cu_seqlens, documents, scale)
    if isinstance(window, bool) or not isinstance(window, numbers.Integral) or window < 1:
        raise ValueError(f"window must be an int >= 1, got {window!r}")
    T = q.shape[0]
    plan = _plan(plan, q)
    _check_kept(kept, key)
    if not _use_triton(q):
        return reference.sliding_window_attention(q, k, v, window, cu_seqlens=docs.cu_seqlens, scale=scale)
    window = int(window)
    return _Attention.apply(q, k, v, None, None, docs.docstart, docs.docend, window if window < T else None, scale,
                            plan, kept, key)
