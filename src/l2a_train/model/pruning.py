"""Post-training pruning: a layer whose router (almost) never fires loses its global attention.

A pruned layer becomes an SWA layer ("swa" in `l2a_layer_types`): `global_attn`,
`global_layernorm` and `router` are deleted, so the checkpoint holds no global weights for it
and the inference cache keeps only the last `window` positions there.
"""

from __future__ import annotations

import torch


def prune_layers(model, layers: list[int]) -> list[int]:
    """Turn the given L2A layers into SWA layers in place; returns the layers pruned."""
    types = list(model.config.l2a_layer_types)
    for i in layers:
        if not 0 <= i < len(types):
            raise ValueError(f"layer {i} out of range (0..{len(types) - 1})")
        if types[i] != "l2a":
            raise ValueError(f"layer {i} is a '{types[i]}' layer; only L2A layers can be pruned")
    for i in layers:
        layer = model.model.layers[i]
        del layer.global_attn, layer.global_layernorm, layer.router
        layer.layer_type = types[i] = "swa"
    model.config.l2a_layer_types = types
    return sorted(layers)


def kv_cache_bytes(config, length: int, batch: int = 1, dtype: torch.dtype = torch.bfloat16) -> int:
    """KV-cache bytes for `length` positions: global and L2A layers keep every position for their
    global attention; SWA caches (SWA layers, and the local half of L2A layers) keep `window`."""
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    per_position = 2 * config.num_key_value_heads * head_dim * torch.tensor([], dtype=dtype).element_size()
    window = min(int(config.l2a_window), length)
    positions = 0
    for kind in config.l2a_layer_types:
        positions += {"global": length, "swa": window, "l2a": length + window}[kind]
    return batch * positions * per_position
