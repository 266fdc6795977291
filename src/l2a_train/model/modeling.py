"""L2A Qwen2 / Qwen3 models: transformers' Qwen classes with L2A decoder layers.

The model forward is our own (not Qwen's) because every layer needs the document layout of
the packed batch and returns router statistics; embeddings, rotary embedding, norms, MLP and
the causal-LM head are transformers' modules and forward.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from types import SimpleNamespace

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint
from transformers.modeling_outputs import BaseModelOutputWithPast
from transformers.models.qwen2 import modeling_qwen2 as qwen2
from transformers.models.qwen3 import modeling_qwen3 as qwen3

from .cache import L2ACache, cache_field_name
from .config import L2AQwen2Config, L2AQwen3Config
from . import fused_ops
from .attention import resolve_backend
from .documents import DocumentLayout
from .layer import L2ADecoderLayer, Router


def _family_modules(module):
    prefix = "Qwen2" if module is qwen2 else "Qwen3"
    return SimpleNamespace(
        Attention=getattr(module, f"{prefix}Attention"),
        MLP=fused_ops.fusable(getattr(module, f"{prefix}MLP")),
        RMSNorm=fused_ops.fusable(getattr(module, f"{prefix}RMSNorm")),
        RotaryEmbedding=getattr(module, f"{prefix}RotaryEmbedding"),
        apply_rotary_pos_emb=module.apply_rotary_pos_emb,
    )


@dataclass
class L2AModelOutput(BaseModelOutputWithPast):
    router_reg: torch.Tensor | None = None  # R of docs/METHOD.md (differentiable scalar)
    routed_fraction: torch.Tensor | None = None  # float32 [num_layers], detached
    mean_prob: torch.Tensor | None = None  # float32 [num_layers], detached


CACHE_FIELD = cache_field_name()  # `cache` (transformers 5.24) or `past_key_values` (5.17)


class L2AModelMixin:
    """The decoder stack. Set by the subclasses: `_modules_ns` (the family's module classes)."""

    _no_split_modules = ["L2ADecoderLayer"]
    _can_record_outputs = {}

    def _build(self, config):
        ns = self._modules_ns
        self.padding_idx = config.pad_token_id
        self.vocab_size = config.vocab_size
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size, self.padding_idx)
        self.layers = nn.ModuleList(L2ADecoderLayer(config, i, ns) for i in range(config.num_hidden_layers))
        self.norm = ns.RMSNorm(config.hidden_size, eps=config.rms_norm_eps, config=config)
        self.rotary_emb = ns.RotaryEmbedding(config=config)
        self.gradient_checkpointing = False
        self.routing_step = 0
        self.post_init()

    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.LongTensor | None = None,
        inputs_embeds: torch.Tensor | None = None,
        document_ids: torch.LongTensor | None = None,
        use_cache: bool | None = None,
        cache=None,
        past_key_values=None,
        **kwargs,
    ) -> L2AModelOutput:
        if (input_ids is None) == (inputs_embeds is None):
            raise ValueError("pass exactly one of input_ids or inputs_embeds")
        if attention_mask is not None and not bool(attention_mask.all()):
            raise ValueError(
                "padding masks are not supported: pack rows and mark documents with position_ids "
                "(for generate: a batch of prompts of equal length, no padding)"
            )
        x = self.embed_tokens(input_ids) if inputs_embeds is None else inputs_embeds
        batch, length = x.shape[:2]
        cache = self._inference_cache(cache if cache is not None else past_key_values, use_cache)
        if cache is not None:
            position_ids = self._check_cached_positions(cache, position_ids, document_ids, batch, length, x.device)
        if position_ids is None:
            position_ids = torch.arange(length, device=x.device).expand(batch, length)
        # one layout per forward: documents, the backend and the kernels' inputs, shared by every layer
        backend = resolve_backend(self.config.l2a_backend, x.device)
        if document_ids is not None:
            layout = DocumentLayout.from_document_ids(document_ids, backend)
        else:
            layout = DocumentLayout.from_position_ids(position_ids, batch, length, x.device, backend)
        position_embeddings = self.rotary_emb(x, position_ids)

        terms = []
        for i, layer in enumerate(self.layers):
            if cache is not None:
                x, t = layer(x, position_embeddings, layout, self.routing_step, cache=cache.layers[i])
            elif self.gradient_checkpointing and self.training and torch.is_grad_enabled():
                x, t = self._checkpointed(layer, x, position_embeddings, layout, self.routing_step)
            else:
                x, t = layer(x, position_embeddings, layout, self.routing_step)
            terms.append(t)
        terms = torch.stack(terms)  # [num_layers, 3]
        return L2AModelOutput(
            last_hidden_state=self.norm(x),
            router_reg=terms[:, 0].sum() / len(self.layers),
            routed_fraction=terms[:, 1].detach(),
            mean_prob=terms[:, 2].detach(),
            **({CACHE_FIELD: cache} if cache is not None and use_cache is not False else {}),
        )

    def _checkpointed(self, layer, *args):
        """Run `layer` under its own checkpoint function if it has one, else the one transformers
        installed on the model (their kwargs, e.g. the selective policy of
        `checkpointing.enable_checkpointing`), always non-reentrant: reentrant checkpointing
        loses the gradient of layers whose input needs none."""
        func = getattr(layer, "_gradient_checkpointing_func", None) or getattr(self, "_gradient_checkpointing_func", None)
        kwargs = dict(func.keywords) if isinstance(func, functools.partial) else {}
        kwargs["use_reentrant"] = False
        return checkpoint(layer, *args, **kwargs)

    def _inference_cache(self, cache, use_cache) -> L2ACache | None:
        """The cache to read and extend: the one passed, a new one for `use_cache=True`, or None.

        An empty cache of another class (e.g. a `DynamicCache()` made by the caller) is replaced
        by an `L2ACache`; a filled one cannot be used and is refused."""
        if cache is not None and not isinstance(cache, L2ACache):
            if not (hasattr(cache, "get_seq_length") and cache.get_seq_length() == 0):
                raise TypeError(
                    f"L2A models need an L2ACache (l2a_train.model.cache), got a filled {type(cache).__name__}; "
                    "pass cache=None with use_cache=True and the model creates one"
                )
            cache, use_cache = None, True
        if cache is None and use_cache:
            cache = L2ACache(self.config)
        return cache

    @staticmethod
    def _check_cached_positions(cache, position_ids, document_ids, batch, length, device):
        """With a cache every row is one document continuing at the cache's length (no padding,
        no packing): returns the position ids, made if None, refused if they disagree."""
        past = cache.get_seq_length()
        if past and cache.batch_size not in (-1, batch):
            raise ValueError(f"the cache holds {cache.batch_size} rows, the input has {batch}")
        expected = (torch.arange(length, device=device) + past).expand(batch, length)
        if position_ids is not None and position_ids.shape[-1] == length:
            position_ids = position_ids.to(device).expand(batch, length)
        if document_ids is not None or (position_ids is not None and not torch.equal(position_ids, expected)):
            raise ValueError(
                f"with a KV cache each row must be one document at consecutive positions continuing at {past} "
                "(no packed documents, no padding); run packed rows without a cache"
            )
        return expected


class L2ACausalLMMixin:
    """Causal-LM head on the L2A stack; `forward` (logits, loss, generate) is transformers'."""

    _no_split_modules = ["L2ADecoderLayer"]

    @classmethod
    def _supports_default_dynamic_cache(cls) -> bool:
        """False: generate must not build a DynamicCache; the prefill forward creates the
        L2ACache (use_cache=True) and generate carries it on (see l2a_train.model.cache)."""
        return False

    def _build_lm(self, config, model_cls):
        self.model = model_cls(config)
        self.vocab_size = config.vocab_size
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        self.post_init()

    def set_routing_step(self, step: int) -> None:
        """Seeds the stochastic dense-path draw; call before each micro-step (same on all ranks)."""
        self.model.routing_step = int(step)

    def _init_weights(self, module):
        if isinstance(module, Router):
            nn.init.zeros_(module.weight)  # p = 0.5 >= threshold: every token starts routed
        else:
            super()._init_weights(module)


class L2AQwen2Model(L2AModelMixin, qwen2.Qwen2PreTrainedModel):
    config_class = L2AQwen2Config
    _modules_ns = _family_modules(qwen2)

    def __init__(self, config):
        qwen2.Qwen2PreTrainedModel.__init__(self, config)
        self._build(config)


class L2AQwen3Model(L2AModelMixin, qwen3.Qwen3PreTrainedModel):
    config_class = L2AQwen3Config
    _modules_ns = _family_modules(qwen3)

    def __init__(self, config):
        qwen3.Qwen3PreTrainedModel.__init__(self, config)
        self._build(config)


class L2AQwen2ForCausalLM(L2ACausalLMMixin, qwen2.Qwen2ForCausalLM):
    config_class = L2AQwen2Config

    def __init__(self, config):
        qwen2.Qwen2PreTrainedModel.__init__(self, config)
        self._build_lm(config, L2AQwen2Model)


class L2AQwen3ForCausalLM(L2ACausalLMMixin, qwen3.Qwen3ForCausalLM):
    config_class = L2AQwen3Config

    def __init__(self, config):
        qwen3.Qwen3PreTrainedModel.__init__(self, config)
        self._build_lm(config, L2AQwen3Model)


MODEL_BY_FAMILY = {"qwen2": L2AQwen2ForCausalLM, "qwen3": L2AQwen3ForCausalLM}
