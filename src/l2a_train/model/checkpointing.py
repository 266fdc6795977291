"""Activation checkpointing of the decoder layers, optionally keeping the attention outputs.

Plain checkpointing recomputes each layer's forward in the backward pass, attention included:
at 128K that recomputation is about a fifth of an L2A training step. `keep_attention=True`
keeps the attention outputs from the forward and recomputes everything else (projections,
norms, MLP). Cost: each attention output, T x heads x head_dim values per attention call, kept
per layer until its backward (about 0.8 GB per L2A layer at 128K for Qwen2.5-1.5B).

Two mechanisms, the same result:
- L2A and SWA layers on the kernels backend: plain checkpointing, and the kernels keep their
  own outputs (their `kept=` argument; the layer's `keep_attention_outputs`). torch's selective
  checkpointing would do the same through a Python dispatch mode that sees every operator of
  the layer, forward and recomputation, on the host: about 4,000-7,000 operators a step for
  Qwen2.5-1.5B, which at 32K tokens is host time the GPU cannot hide (docs/BENCHMARKS.md).
- every other layer (global layers, transformers' own models, the reference backend): torch's
  selective activation checkpointing, keeping the outputs of the attention operators (our
  kernels' forward, the operator named `l2a_kernels.ATTENTION_FORWARD_OP`, and torch's fused
  SDPA kernels).
`keep_attention=N` keeps them in the last N decoder layers only, for a model where keeping
every layer's would not fit (every kept output is alive when the backward starts, so which N
layers does not change the peak).

Works for L2A models and for transformers' own models (the full-attention baseline), both
through transformers' checkpointing hook; always non-reentrant (reentrant checkpointing gives
no gradient to a layer whose input does not require one, e.g. after frozen embeddings).
"""

from __future__ import annotations

import functools

import torch
from torch.utils.checkpoint import checkpoint, create_selective_checkpoint_contexts

_SDPA_OPS = (
    "_scaled_dot_product_cudnn_attention",
    "_scaled_dot_product_flash_attention",
    "_scaled_dot_product_efficient_attention",
    "_scaled_dot_product_flash_attention_for_cpu",
)


@functools.cache
def attention_ops() -> tuple:
    """The operators whose outputs `keep_attention` saves."""
    from l2a_kernels import ATTENTION_FORWARD_OP  # importing l2a_kernels registers the operator

    namespace, name = ATTENTION_FORWARD_OP.split("::")
    ops = [getattr(getattr(torch.ops, namespace), name).default]
    ops += [getattr(torch.ops.aten, name).default for name in _SDPA_OPS if hasattr(torch.ops.aten, name)]
    return tuple(ops)


def keep_attention_context():
    """A `context_fn` for torch.utils.checkpoint: save attention outputs, recompute the rest."""
    return create_selective_checkpoint_contexts(list(attention_ops()))


def kept_layers(keep_attention: bool | int, num_layers: int) -> int:
    """How many decoder layers keep their attention outputs: False none, True all, N the last N."""
    if isinstance(keep_attention, bool):
        return num_layers if keep_attention else 0
    return min(int(keep_attention), num_layers)


def _on_kernels(model) -> bool:
    """Whether `model` is an L2A model whose attention backend is the kernels on its device (its
    L2A and SWA layers then keep their attention outputs themselves)."""
    backend = getattr(model.config, "l2a_backend", None)
    if backend is None:  # a transformers model
        return False
    from .attention import resolve_backend

    return resolve_backend(backend, next(model.parameters()).device) == "kernels"


def enable_checkpointing(model, keep_attention: bool | int = False) -> None:
    """Checkpoint every decoder layer of `model` (an L2A or a transformers model); keep the
    attention outputs of all of them (True), none (False) or the last N (an int)."""
    layers = model.model.layers
    kept = kept_layers(keep_attention, len(layers))
    for layer in layers:  # an earlier call's per-layer choice (transformers sets its layers' own again)
        layer.__dict__.pop("_gradient_checkpointing_func", None)
        if hasattr(layer, "keep_attention_outputs"):
            layer.keep_attention_outputs = False
    kwargs = {"use_reentrant": False}
    if kept == len(layers):
        kwargs["context_fn"] = keep_attention_context
    if hasattr(model, "activation_checkpointing_enable"):  # transformers >= 5.2x; 5.17 has only the old name
        model.activation_checkpointing_enable(activation_checkpointing_kwargs=kwargs)
    else:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)
    # the per-layer checkpoint function: transformers' layers call their own, and so does
    # L2AModel (modeling.py) when a layer has one
    selective = functools.partial(checkpoint, use_reentrant=False, context_fn=keep_attention_context)
    plain = functools.partial(checkpoint, use_reentrant=False)
    on_kernels = kept > 0 and _on_kernels(model)
    for layer in layers[len(layers) - kept:] if kept else ():
        if on_kernels and getattr(layer, "layer_type", None) in ("l2a", "swa"):
            layer.keep_attention_outputs = True
            layer._gradient_checkpointing_func = plain
        elif kept < len(layers):
            layer._gradient_checkpointing_func = selective
