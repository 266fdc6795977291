"""Pure-PyTorch ground truth for the two attention ops (packed "varlen" layout).

Computes in float32 (or `compute_dtype`: float64 for ground truth in tests, the input's own
precision to measure PyTorch's error at that precision), returns the input dtype. Used on CPU by the model and as the ground truth in tests. Memory-aware but simple:
queries are processed in blocks, each block only looks at the key span its rows can see, and
the block's scores are recomputed in the backward pass (checkpoint) instead of being kept, so
a few-thousand-token test never holds [HQ, T, T] scores. GQA is handled by grouping query
heads ([B, H, G, D] against [K, H, D]), never by repeating K/V.
"""

from __future__ import annotations

import math

import torch
from torch.utils.checkpoint import checkpoint

__all__ = ["attention", "conditional_attention", "sliding_window_attention", "doc_starts"]

_QUERY_BLOCK = 128


def doc_starts(cu_seqlens: torch.Tensor | None, T: int, device) -> torch.Tensor:
    """Start position of each token's document, int64 [T]. cu_seqlens None: one document."""
    t = torch.arange(T, device=device)
    if cu_seqlens is None:
        return torch.zeros(T, dtype=torch.long, device=device)
    cu = cu_seqlens.to(device=device, dtype=torch.long)
    # right=True: with empty documents (repeated boundaries) a token belongs to the last
    # document starting at or before it.
    doc = torch.searchsorted(cu, t, right=True) - 1
    return cu[doc]


def _block(q, k, v, qpos, qdoc, lo, window, scale, dtype):
    """Attention of one query block ([B, HQ, D], positions qpos) over keys lo..lo+K-1."""
    B, HQ, D = q.shape
    Kn, H, _ = k.shape
    G = HQ // H
    kpos = torch.arange(lo, lo + Kn, device=q.device)
    vis = (kpos[None, :] <= qpos[:, None]) & (kpos[None, :] >= qdoc[:, None])
    if window is not None:
        vis &= kpos[None, :] > qpos[:, None] - window
    qg = q.to(dtype).view(B, H, G, D)
    s = torch.einsum("bhgd,khd->hgbk", qg, k.to(dtype)) * scale
    s = s.masked_fill(~vis, float("-inf"))
    p = torch.softmax(s, dim=-1)  # every row sees at least its own key: no all -inf row
    o = torch.einsum("hgbk,khd->bhgd", p, v.to(dtype))
    return o.reshape(B, HQ, D)


def attention(q, k, v, query_idx, cu_seqlens, window, scale, dtype=torch.float32):
    """The common form of both ops: rows query_idx (sorted int64) attend causally within their
    document, to the last `window` keys (None: no window); the other rows get 0. Computed in
    `dtype`, returned in q's dtype."""
    T, HQ, D = q.shape
    if HQ % k.shape[1]:
        raise ValueError("q heads must be a multiple of k heads")
    scale = 1.0 / math.sqrt(D) if scale is None else scale
    docs = doc_starts(cu_seqlens, T, q.device)
    out = torch.zeros(T, HQ, D, dtype=dtype, device=q.device)
    if query_idx.numel() == 0:
        # keep the graph connected so that backward yields zero gradients
        return (out + (q[:0].sum() + k[:0].sum() + v[:0].sum()).to(dtype)).to(q.dtype)
    use_ckpt = torch.is_grad_enabled() and any(t.requires_grad for t in (q, k, v))
    chunks = []
    for i in range(0, query_idx.numel(), _QUERY_BLOCK):
        idx = query_idx[i : i + _QUERY_BLOCK]
        qdoc = docs[idx]
        lo = int(qdoc.min())
        if window is not None:
            lo = max(lo, int(idx.min()) - window + 1)
        hi = int(idx.max()) + 1
        args = (q[idx], k[lo:hi], v[lo:hi], idx, qdoc, lo, window, scale, dtype)
        chunks.append(checkpoint(_block, *args, use_reentrant=False) if use_ckpt else _block(*args))
    out = out.index_copy(0, query_idx, torch.cat(chunks))
    return out.to(q.dtype)


def conditional_attention(q, k, v, route, *, cu_seqlens=None, scale=None, dense_forward=False,
                          compute_dtype=torch.float32):
    """Routed tokens: causal attention over earlier keys of their document; others: 0.

    q [T, HQ, D], k/v [T, H, D] (HQ a multiple of H), route bool [T], cu_seqlens int [docs+1].
    dense_forward: every token gets its causal attention; only routed rows pass gradient back.
    """
    route = route.to(torch.bool)
    if dense_forward:
        out = attention(q, k, v, torch.arange(q.shape[0], device=q.device), cu_seqlens, None, scale, compute_dtype)
        return torch.where(route[:, None, None], out, out.detach())
    idx = torch.nonzero(route).squeeze(1)
    return attention(q, k, v, idx, cu_seqlens, None, scale, compute_dtype)


def sliding_window_attention(q, k, v, window, *, cu_seqlens=None, scale=None, compute_dtype=torch.float32):
    """Causal attention over the last `window` keys (query itself included) of the document."""
    idx = torch.arange(q.shape[0], device=q.device)
    return attention(q, k, v, idx, cu_seqlens, int(window), scale, compute_dtype)
