"""The KV cache of an L2A model for inference (docs/METHOD.md, "Inference and pruning").

What each decoder layer keeps, by `l2a_layer_types`:

- "global": every position (the base model's full causal attention);
- "l2a":    the last `window` positions for the sliding-window attention, and every position
            for the global attention: a later routed token may attend to any earlier key, so a
            token that skipped global attention still appends its global K/V;
- "swa":    the last `window` positions only (SWA baseline, static-hybrid local layers and
            pruned layers: no global cache at all).

A step over new tokens (prefill, decode, or a continuation of a cached prompt):

- prefill (empty cache) runs the model's normal attention backends on the prompt (the Triton
  kernels on CUDA, SDPA with masks elsewhere) and then stores the K/V;
- a later step appends the new K/V (full caches grow GROWTH positions at a time, not by a copy
  of the whole cache per token) and attends from the new queries to the cached keys with SDPA (one query: no mask;
  several queries: a causal / window mask on absolute positions). In L2A layers, if no new
  token is routed (d_t = 0 for all of them) the global attention is not computed at all; rows
  of a batch whose token is not routed are left out of it.

Design choice, and why. transformers' cache API moved between 5.17 (the GPU image) and 5.24
(pinned here): the keyword is `past_key_values` in one and `cache` in the other, per-layer
cache classes and their abstract methods changed, and generate's cache hooks changed names.
`L2ACache` therefore subclasses `transformers.cache_utils.Cache` only for the container
contract that `generate` relies on in both versions (isinstance checks, `get_seq_length`,
`is_compileable`, `crop`, beam reordering, the `_is_user_defined` flag) and overrides every one
of those methods; its per-layer storage (`LayerCache`) is our own plain class, so no abstract
per-layer API of either version is involved. The model never lets `generate` build a
`DynamicCache` (`_supports_default_dynamic_cache()` is False): the prefill forward creates an
`L2ACache` when `use_cache=True`, returns it in the output (under the field name of the
installed version), and both versions' generate carry the returned cache into the next step.
Padding is not supported: every row is one document at consecutive positions.
"""

from __future__ import annotations

import torch
from transformers.cache_utils import Cache

from . import attention as attn_ops


GROWTH = 1024  # positions added to a full cache's buffer when it is full (one copy per GROWTH decode steps)


def _append(buf: torch.Tensor, used: int, new: torch.Tensor) -> torch.Tensor:
    """Write `new` after the first `used` positions of `buf` (grown by GROWTH positions when
    needed: not a copy of the whole cache every step); returns the buffer."""
    need = used + new.shape[1]
    if need > buf.shape[1]:
        grown = buf.new_empty(buf.shape[0], need + GROWTH, *buf.shape[2:])
        grown[:, :used] = buf[:, :used]
        buf = grown
    buf[:, used:need] = new
    return buf


def _keep_last(t: torch.Tensor, n: int) -> torch.Tensor:
    """The last n positions of [B, L, H, D]; a copy when shorter, so the rest can be freed."""
    return t if t.shape[1] <= n else t[:, -n:].clone()


def attend_cached(q, k, v, q_start: int, k_start: int, scale: float, window: int | None = None):
    """q [B, Lq, HQ, D] at positions q_start.., k/v [B, Lk, H, D] at k_start..: causal attention
    (and inside the window when given) on absolute positions, with SDPA."""
    lq, lk = q.shape[1], k.shape[1]
    q_last, k_last = q_start + lq - 1, k_start + lk - 1
    if lq == 1 and k_last <= q_start and (window is None or q_start - k_start < window):
        mask = None  # one query that sees every cached key: the decode step
    else:
        qpos = torch.arange(q_start, q_last + 1, device=q.device)[:, None]
        kpos = torch.arange(k_start, k_last + 1, device=q.device)[None, :]
        mask = kpos <= qpos
        if window is not None:
            mask = mask & (qpos - kpos < window)
    return attn_ops._sdpa(q, k, v, mask, scale)


class LayerCache:
    """The K/V of one decoder layer, in the model's [B, L, heads, head_dim] layout.

    `local`: the last `window` positions (sliding-window attention of "swa" and "l2a" layers);
    `full`: every position (self-attention of "global" layers, global attention of "l2a" ones).
    """

    def __init__(self, kind: str, window: int):
        self.kind = kind
        self.window = int(window)
        self.local: tuple[torch.Tensor, torch.Tensor] | None = None
        self._full: tuple[torch.Tensor, torch.Tensor] | None = None  # buffers, first `length` positions used
        self.length = 0  # positions seen by this layer
        # global-attention work of "l2a" layers after prefill: queries attended vs skipped (d_t = 0)
        self.global_queries = 0
        self.skipped_queries = 0

    # -- the attentions (called by L2ADecoderLayer when a cache is passed) -------------------

    def self_attention(self, q, k, v, layout, scale: float, backend: str) -> torch.Tensor:
        """The layer's first attention: full causal for "global" layers, else sliding window.
        Advances `length` (the global attention of an "l2a" layer comes after, same step)."""
        past, window = self.length, self.window
        if self.kind == "global":
            out = self._attend_full(q, k, v, layout, scale, backend, route=None, dense=False)
        else:
            if self.local is None:
                out = attn_ops.sliding_window(q, k, v, layout, window, scale, backend)
                keys, values = k, v
            else:
                keys = torch.cat([self.local[0], k], 1)
                values = torch.cat([self.local[1], v], 1)
                out = attend_cached(q, keys, values, past, past + k.shape[1] - keys.shape[1], scale, window)
            self.local = (_keep_last(keys, window), _keep_last(values, window))
        self.length = past + q.shape[1]
        return out

    def global_attention(self, q, k, v, layout, route, scale: float, backend: str, dense: bool) -> torch.Tensor:
        """Global attention of an "l2a" layer for the routed tokens (exact zeros elsewhere); the
        K/V of every new token are appended. Call after `self_attention` of the same step."""
        return self._attend_full(q, k, v, layout, scale, backend, route=route, dense=dense, past=self.length - q.shape[1])

    @property
    def full(self) -> tuple[torch.Tensor, torch.Tensor] | None:
        """The full cache's keys and values [B, positions, H, D] (views of the buffers)."""
        if self._full is None:
            return None
        return self._full[0][:, : self.length], self._full[1][:, : self.length]  # between steps: all written

    def _attend_full(self, q, k, v, layout, scale, backend, route, dense, past=None):
        past = self.length if past is None else past
        if self._full is None:  # prefill: the model's own backends
            self._full = (k, v)
            if route is None or dense:
                out = attn_ops.causal(q, k, v, layout, scale, backend)
                return out if route is None else out.masked_fill(~route[:, :, None, None], 0.0)
            return attn_ops.conditional(q, k, v, layout, route, scale, backend)
        end = past + k.shape[1]
        self._full = (_append(self._full[0], past, k), _append(self._full[1], past, v))
        keys, values = self._full[0][:, :end], self._full[1][:, :end]
        if route is None:
            return attend_cached(q, keys, values, past, 0, scale)
        out = torch.zeros_like(q)
        routed = int(route.sum())  # one host sync per layer and step: it decides the skip
        self.global_queries += routed
        self.skipped_queries += route.numel() - routed
        if routed == 0:
            return out  # d_t = 0 for every new token: no global attention computed
        if routed == route.numel():
            return attend_cached(q, keys, values, past, 0, scale)
        if q.shape[1] == 1:  # decode: only the rows whose token is routed
            rows = route[:, 0].nonzero().squeeze(1)
            out[rows] = attend_cached(q[rows], keys[rows], values[rows], past, 0, scale)
            return out
        out = attend_cached(q, keys, values, past, 0, scale)
        return out.masked_fill(~route[:, :, None, None], 0.0)

    # -- bookkeeping ------------------------------------------------------------------------

    def tensors(self) -> list[torch.Tensor]:
        return [t for pair in (self.local, self.full) if pair is not None for t in pair]

    def nbytes(self) -> dict[str, int]:
        size = lambda pair: 0 if pair is None else sum(t.numel() * t.element_size() for t in pair)  # noqa: E731
        return {"local": size(self.local), "full": size(self.full)}

    def map_batch(self, fn) -> None:
        if self.local is not None:
            self.local = tuple(fn(t) for t in self.local)
        if self._full is not None:
            self._full = tuple(fn(t) for t in self.full)

    def reset(self) -> None:
        self.__init__(self.kind, self.window)


class L2ACache(Cache):
    """The whole model's cache: one `LayerCache` per decoder layer (see the module docstring)."""

    def __init__(self, config):
        self.layer_types = list(config.l2a_layer_types)
        self.window = int(config.l2a_window)
        super().__init__(layers=[LayerCache(kind, self.window) for kind in self.layer_types])

    # -- what generate and the model read ---------------------------------------------------

    def get_seq_length(self, layer_idx: int = 0) -> int:
        return self.layers[layer_idx].length if self.layers else 0

    def get_max_length(self, layer_idx: int | None = None) -> int:
        return -1  # grows without bound (the global caches keep every position)

    def get_mask_sizes(self, query_length: int, layer_idx: int = 0) -> tuple[int, int]:
        return self.get_seq_length(layer_idx) + query_length, 0

    def get_query_offset(self, layer_idx: int = 0) -> int:
        return self.get_seq_length(layer_idx)

    @property
    def batch_size(self) -> int:
        tensors = [t for layer in self.layers for t in layer.tensors()]
        return tensors[0].shape[0] if tensors else -1

    @property
    def is_compileable(self) -> bool:
        return False

    @property
    def is_initialized(self) -> bool:
        return self.get_seq_length() > 0

    @property
    def is_croppable(self) -> bool:
        return False  # the sliding-window caches drop positions for good

    @property
    def is_sliding(self) -> list[bool]:
        return [kind == "swa" for kind in self.layer_types]

    @property
    def is_linear(self) -> list[bool]:
        return [False] * len(self.layers)

    @property
    def is_dummy(self) -> list[bool]:
        return [False] * len(self.layers)

    def update(self, *args, **kwargs):
        raise NotImplementedError("L2A layers read and write their LayerCache directly (see l2a_train.model.cache)")

    def early_initialization(self, *args, **kwargs) -> None:
        pass  # allocated on the first forward

    def crop(self, tokens_to_remove: int) -> None:
        if tokens_to_remove == 0:
            return
        raise NotImplementedError(
            "an L2A cache cannot be cropped (its sliding-window caches drop old positions): assisted and "
            "speculative decoding are not supported"
        )

    def reorder_cache(self, beam_idx: torch.LongTensor) -> None:
        for layer in self.layers:
            layer.map_batch(lambda t: t.index_select(0, beam_idx.to(t.device)))

    def batch_repeat_interleave(self, repeats: int) -> None:
        for layer in self.layers:
            layer.map_batch(lambda t: t.repeat_interleave(repeats, dim=0))

    def batch_select_indices(self, indices: torch.Tensor) -> None:
        for layer in self.layers:
            layer.map_batch(lambda t: t[indices])

    def reset(self) -> None:
        for layer in self.layers:
            layer.reset()

    def activate_past_recording(self) -> None:
        raise NotImplementedError("an L2A cache cannot record its past: assisted decoding is not supported")

    # -- reporting ---------------------------------------------------------------------------

    def nbytes(self) -> dict[str, int]:
        """Bytes of the positions held: `local` (sliding-window caches), `global` (full caches),
        `total`. After decode steps a full cache's buffer may have up to GROWTH more allocated."""
        local = sum(layer.nbytes()["local"] for layer in self.layers)
        full = sum(layer.nbytes()["full"] for layer in self.layers)
        return {"local": local, "global": full, "total": local + full}

    def skipped_fraction(self) -> float | None:
        """Of the global-attention queries of L2A layers after prefill, the fraction skipped."""
        seen = sum(layer.global_queries + layer.skipped_queries for layer in self.layers)
        return None if seen == 0 else sum(layer.skipped_queries for layer in self.layers) / seen

    def __repr__(self) -> str:
        return f"L2ACache(length={self.get_seq_length()}, window={self.window}, layers={self.layer_types})"


def cache_field_name() -> str:
    """Name of the cache field of transformers' model outputs: `cache` (5.24) or `past_key_values` (5.17)."""
    import dataclasses

    from transformers.modeling_outputs import BaseModelOutputWithPast

    names = {f.name for f in dataclasses.fields(BaseModelOutputWithPast)}
    return "cache" if "cache" in names else "past_key_values"
