"""The L2A decoder layer (docs/METHOD.md), built from transformers' own Qwen modules.

    h   = x + SWA(RMSNorm(x))
    u   = RMSNorm_g(h);  p = sigmoid(w.u / tau);  d = 1[p >= threshold] + (p - sg(p))
    y   = h + O_g(d * GlobalAttn(u))
    out = y + MLP(RMSNorm(y))

Weights keep the base model's names (`self_attn`, `input_layernorm`, `mlp`, ...), so a base
checkpoint loads into an L2A model directly: `self_attn` is the sliding-window attention of
converted layers and the full attention of unconverted ones; `global_attn`, `global_layernorm`
and `router` are the new modules. We reuse the Qwen attention modules for their projections and
q/k norms only, and call our own attention backends (document masks, query-sparse kernel).
Norms and MLPs are transformers' classes too, subclassed in `fused_ops` so that on CUDA they
run liger-kernel's fused kernels (`l2a.fused_ops`).
"""

from __future__ import annotations

import random

import torch
from torch import nn

from . import attention as attn_ops
from . import fused_ops
from .documents import DocumentLayout


class Router(nn.Module):
    """z = w . u (no bias); zero-initialised so every token starts routed (p = 0.5)."""

    def __init__(self, hidden_size: int):
        super().__init__()
        self.weight = nn.Parameter(torch.zeros(1, hidden_size))

    def forward(self, u: torch.Tensor) -> torch.Tensor:
        return (u @ self.weight.to(u.dtype).t()).squeeze(-1)


def project_qkv(module: nn.Module, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, rotary, config):
    """q [B, L, HQ, D], k/v [B, L, H, D] with the module's projections, q/k norms and RoPE."""
    shape = (*x.shape[:-1], -1, module.head_dim)
    q = module.q_proj(x).view(shape)
    k = module.k_proj(x).view(shape)
    v = module.v_proj(x).view(shape)
    if hasattr(module, "q_norm"):  # Qwen3 normalises q and k per head; Qwen2 does not
        q, k = module.q_norm(q), module.k_norm(k)
    q, k = fused_ops.rotary(rotary, q, k, cos, sin, config)
    return q, k, v


def dense_path_drawn(p_dense: float, routing_step: int, layer_idx: int) -> bool:
    """One draw per layer call, a pure function of (step, layer): identical on every rank and
    when gradient checkpointing recomputes the layer."""
    if p_dense <= 0.0:
        return False
    return random.Random(routing_step * 1_000_003 + layer_idx).random() < p_dense


def straight_through(p: torch.Tensor, threshold: float) -> torch.Tensor:
    """Forward: the hard decision 1[p >= threshold]; backward: the gradient of p."""
    hard = (p >= threshold).to(p.dtype)
    return hard + (p - p.detach())


def _attention(modules, config, layer_idx: int) -> nn.Module:
    """The family's attention module (for its projections); Qwen3's q/k norms made fusable."""
    attn = modules.Attention(config, layer_idx)
    if hasattr(attn, "q_norm"):
        attn.q_norm = modules.RMSNorm(attn.head_dim, eps=config.rms_norm_eps, config=config)
        attn.k_norm = modules.RMSNorm(attn.head_dim, eps=config.rms_norm_eps, config=config)
    return attn


class L2ADecoderLayer(nn.Module):
    def __init__(self, config, layer_idx: int, modules):
        super().__init__()
        self.layer_idx = layer_idx
        self.layer_type = config.l2a_layer_types[layer_idx]
        self.config = config
        self.rotary = modules.apply_rotary_pos_emb
        self.self_attn = _attention(modules, config, layer_idx)
        self.input_layernorm = modules.RMSNorm(config.hidden_size, eps=config.rms_norm_eps, config=config)
        self.post_attention_layernorm = modules.RMSNorm(config.hidden_size, eps=config.rms_norm_eps, config=config)
        self.mlp = modules.MLP(config)
        if self.layer_type == "l2a":
            self.global_attn = _attention(modules, config, layer_idx)
            self.global_layernorm = modules.RMSNorm(config.hidden_size, eps=config.rms_norm_eps, config=config)
            self.router = Router(config.hidden_size)
        # set by checkpointing.enable_checkpointing: the kernels keep this layer's attention
        # outputs for the recomputation of the layer (layout.kept_attention)
        self.keep_attention_outputs = False

    def forward(self, x, position_embeddings, layout: DocumentLayout, routing_step: int = 0, cache=None):
        """Returns (hidden, router_terms) with router_terms = float32 [3]:
        (mean over rows of sum over tokens of p^2, routed fraction, mean p).

        `cache`: this layer's `l2a_train.model.cache.LayerCache` for inference (None in training);
        the attentions then read and extend it instead of seeing only `x`."""
        cfg = self.config
        cos, sin = position_embeddings
        backend = layout.backend
        attn = self.self_attn
        keep = self.keep_attention_outputs and cache is None and torch.is_grad_enabled()

        q, k, v = project_qkv(attn, self.input_layernorm(x), cos, sin, self.rotary, cfg)
        if cache is not None:
            a = cache.self_attention(q, k, v, layout, attn.scaling, backend)
        elif self.layer_type == "global":
            a = attn_ops.causal(q, k, v, layout, attn.scaling, backend)
        else:
            a = attn_ops.sliding_window(q, k, v, layout, int(cfg.l2a_window), attn.scaling, backend,
                                        keep_key=(self.layer_idx, "swa") if keep else None)
        h = x + attn.o_proj(a.flatten(2))

        if self.layer_type == "l2a":
            h, terms = self._routed_global(h, cos, sin, layout, routing_step, backend, cache,
                                           keep_key=(self.layer_idx, "global") if keep else None)
        else:
            terms = torch.zeros(3, device=x.device)  # a fill, not a host-to-device copy
            terms[1:] = 1.0 if self.layer_type == "global" else 0.0

        out = h + self.mlp(self.post_attention_layernorm(h))
        return out, terms

    def _routed_global(self, h, cos, sin, layout, routing_step, backend, cache=None, keep_key=None):
        cfg = self.config
        u = self.global_layernorm(h)
        if cfg.l2a_routing == "random":
            seed = routing_step * 1_000_003 + self.layer_idx
            if cache is not None and cache.length > h.shape[1]:  # a step after prefill: a fresh draw per position
                seed += 7_919 * (cache.length - h.shape[1])
            gen = torch.Generator(device=h.device).manual_seed(seed)
            route = torch.rand(h.shape[:2], generator=gen, device=h.device) < float(cfg.l2a_random_rate)
            p = torch.full(h.shape[:2], float(cfg.l2a_random_rate), device=h.device)
            d = route.float()
            p_sq = torch.zeros((), device=h.device)  # nothing to regularise: no learned router
        else:
            p = torch.sigmoid(self.router(u).float() / float(cfg.l2a_temperature))
            d = straight_through(p, float(cfg.l2a_threshold))
            route = d.detach() > 0.5
            p_sq = (p * p).sum(-1).mean()

        dense = cfg.l2a_backend == "dense" or (
            self.training and dense_path_drawn(float(cfg.l2a_p_dense), routing_step, self.layer_idx)
        )
        if cache is None and not dense and self.global_attn.o_proj.bias is None:
            h = self._query_sparse_global(h, u, d, route, cos, sin, layout, backend, keep_key)
        else:
            q, k, v = project_qkv(self.global_attn, u, cos, sin, self.rotary, cfg)
            scale = self.global_attn.scaling
            if cache is not None:  # inference: skipped tokens' K/V are cached all the same
                g = cache.global_attention(q, k, v, layout, route, scale, backend, dense=dense)
            else:  # dense: every token attends, so skipped tokens get gradient through d
                g = attn_ops.conditional(q, k, v, layout, route, scale, backend, dense_forward=dense,
                                         key=self.layer_idx, keep_key=keep_key)
            g = g.flatten(2) * d.to(g.dtype)[..., None]
            h = h + self.global_attn.o_proj(g)
        terms = torch.stack([p_sq, route.float().mean(), p.mean()]).float()
        return h, terms

    def _query_sparse_global(self, h, u, d, route, cos, sin, layout, backend, keep_key=None):
        """h + O_g(d * GlobalAttn(u)), with the query and output projections of the routed tokens only.

        Exact (up to rounding: the matmuls run over fewer rows): a skipped token's global
        attention is exactly zero and O_g has no bias (Qwen checkpoints have none; a config with
        `attention_bias` takes the every-token path), so its rows add nothing and pass no
        gradient. Every token still needs its key and value. Projecting queries and outputs of
        the ~20% routed tokens only saves most of the second attention's matmuls (q_proj and
        o_proj: 2 x hidden x heads x head_dim of its weights; k_proj and v_proj: 2 x hidden x
        kv_heads x head_dim)."""
        attn, cfg = self.global_attn, self.config
        batch, length, hidden = u.shape
        routed = layout.routed_tokens(route, self.layer_idx)  # made once; reused when recomputed
        rows = routed.positions.long()
        q_routed = attn.q_proj(u.reshape(batch * length, hidden).index_select(0, rows))
        q_routed = q_routed.view(rows.numel(), attn.q_proj.out_features // attn.head_dim, attn.head_dim)
        k = attn.k_proj(u).view(batch, length, -1, attn.head_dim)
        v = attn.v_proj(u).view(batch, length, -1, attn.head_dim)
        if hasattr(attn, "q_norm"):
            q_routed, k = attn.q_norm(q_routed), attn.k_norm(k)
        # RoPE runs on q and k together (liger's kernel takes both): the queries go back to their
        # positions, zero elsewhere (the attention reads routed rows only)
        q = q_routed.new_zeros(batch * length, *q_routed.shape[1:]).index_copy(0, rows, q_routed)
        q, k = fused_ops.rotary(self.rotary, q.view(batch, length, *q_routed.shape[1:]), k, cos, sin, cfg)
        g = attn_ops.conditional(q, k, v, layout, route, attn.scaling, backend, key=self.layer_idx, keep_key=keep_key)
        g = g.reshape(batch * length, -1).index_select(0, rows) * d.reshape(-1).index_select(0, rows).to(g.dtype)[:, None]
        return h.reshape(batch * length, hidden).index_add(0, rows, attn.o_proj(g).to(h.dtype)).view_as(h)
