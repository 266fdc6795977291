"""Attention backends of the L2A layer, all in the [B, L, heads, head_dim] layout.

- `reference`: torch SDPA with explicit boolean masks (document, causal, window). Runs on any
  device; quadratic memory, so it is for CPU runs, tests and short sequences.
- `kernels`: the `l2a_kernels` ops (query-sparse global attention, sliding-window attention)
  on the flattened varlen batch. CUDA only (or CPU under TRITON_INTERPRET=1, for tests).
  Full causal attention of global layers on rows of one document goes to fused SDPA instead,
  which is faster than the query-sparse kernel at density 1.

`conditional` returns exactly zero for tokens that are not routed, and gives those tokens' queries
no gradient, in every backend: that is what the query-sparse kernel computes. Its dense form
(L2A's dense path) computes every token's attention but likewise passes gradient back through
the routed rows only.
"""

from __future__ import annotations

import contextlib

import torch
import torch.nn.functional as F

from .documents import DocumentLayout

BACKENDS = ("auto", "reference", "kernels", "dense")


def resolve_backend(backend: str, device: torch.device) -> str:
    """`auto` picks the kernels on CUDA and the reference elsewhere; `dense` computes like `auto`
    but always takes the dense global path (see L2ADecoderLayer). Resolved once per forward,
    carried by the DocumentLayout."""
    if backend not in BACKENDS:
        raise ValueError(f"l2a.backend must be one of {BACKENDS}, got '{backend}'")
    if backend in ("auto", "dense"):
        return "kernels" if device.type == "cuda" else "reference"
    return backend


def _sdpa(q, k, v, mask, scale, is_causal=False):
    out = F.scaled_dot_product_attention(
        q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), attn_mask=mask, scale=scale,
        is_causal=is_causal, enable_gqa=q.shape[2] != k.shape[2],
    )
    return out.transpose(1, 2)


def _fused_sdpa_backends(device: torch.device):
    """cuDNN first: on H100/H200 its causal kernel is the fastest (~1.7x FlashAttention-2), and
    FlashAttention has failed in our runs under non-reentrant activation checkpointing."""
    if device.type != "cuda":
        return contextlib.nullcontext()
    from torch.nn.attention import SDPBackend, sdpa_kernel

    order = [SDPBackend.CUDNN_ATTENTION, SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION, SDPBackend.MATH]
    return sdpa_kernel(order, set_priority=True)


def _flat(x):
    return x.reshape(-1, *x.shape[2:])


def _kept(layout: DocumentLayout, keep_key):
    """The kernels' kept=/key= for a call whose output is kept through checkpointing (keep_key:
    its name, e.g. (layer, "swa")), or none."""
    return {} if keep_key is None else {"kept": layout.kept_attention, "key": keep_key}


def sliding_window(q, k, v, layout: DocumentLayout, window: int, scale: float, backend: str, keep_key=None):
    """keep_key: keep this call's output for activation checkpointing's recomputation (kernels
    backend; the reference backend recomputes it)."""
    if backend == "reference":
        return _sdpa(q, k, v, layout.mask(window), scale)
    from l2a_kernels import sliding_window_attention

    out = sliding_window_attention(_flat(q), _flat(k), _flat(v), window, documents=layout.kernel_documents,
                                   scale=scale, **_kept(layout, keep_key))
    return out.view_as(q)


def causal(q, k, v, layout: DocumentLayout, scale: float, backend: str):
    """Full causal attention inside each document (layers that stay global)."""
    if backend == "reference":
        return _sdpa(q, k, v, layout.mask(), scale)
    if layout.one_document_per_row:
        # Plain causal attention, no document mask: the fused SDPA kernels beat the query-sparse
        # kernel at density 1.
        with _fused_sdpa_backends(q.device):
            return _sdpa(q, k, v, None, scale, is_causal=True)
    from l2a_kernels import RoutedTokens, conditional_attention

    every = RoutedTokens.every(q.shape[0] * q.shape[1], q.device)  # no host sync
    out = conditional_attention(_flat(q), _flat(k), _flat(v), every, documents=layout.kernel_documents, scale=scale)
    return out.view_as(q)


def conditional(q, k, v, layout: DocumentLayout, route: torch.Tensor, scale: float, backend: str,
                dense_forward: bool = False, key=None, keep_key=None):
    """Global attention for routed tokens (route: bool [B, L]); exact zeros for the others.

    dense_forward (L2A's dense path): every token gets its attention in the forward, and only
    the routed rows pass gradient back. The caller multiplies the output by the 0/1 route, so
    the other rows' gradient is zero anyway: the backward is the query-sparse one, ~density x
    the cost of a dense backward, with the same gradients.

    key (the layer index): the routed positions are worked out once per forward and key (one
    host sync), and reused when activation checkpointing recomputes the layer. keep_key: as in
    sliding_window."""
    if backend == "reference":
        out = _sdpa(q, k, v, layout.mask(), scale)
        if dense_forward:
            return torch.where(route[:, :, None, None], out, out.detach())
        return out.masked_fill(~route[:, :, None, None], 0.0)
    from l2a_kernels import conditional_attention

    out = conditional_attention(
        _flat(q), _flat(k), _flat(v), layout.routed_tokens(route, key), documents=layout.kernel_documents,
        scale=scale, dense_forward=dense_forward, **_kept(layout, keep_key),
    )
    return out.view_as(q)
