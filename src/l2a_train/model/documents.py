"""Document layout of a packed batch, derived once per forward and shared by every layer.

Rows are packed with several documents; position ids restart at 0 where a document starts
(that is how `l2a_data_prep` writes them and how Hugging Face marks packed sequences). No
token may attend across a document boundary, in either attention. Batch rows are flattened
into one varlen sequence for the kernels, so a row start is also a document start.

The layout also carries what every layer of one forward shares, so that it is worked out once:
the attention backend, the kernels' validated document bounds, and the routed positions of each
L2A layer (kept for activation checkpointing's recomputation of the layer), and, for layers that
keep their attention outputs through checkpointing, those outputs until the recomputation
(`kept_attention`, filled and emptied by the kernels' `kept=` argument).
"""

from __future__ import annotations

import functools
from dataclasses import dataclass, field

import torch

BACKENDS = ("reference", "kernels")  # resolved backends (l2a_train.model.attention.resolve_backend)


@dataclass
class DocumentLayout:
    doc_ids: torch.Tensor  # Long [B, L]: document index inside each row (0, 0, 1, 1, 1, ...)
    cu_seqlens: torch.Tensor  # Int32 [num_docs + 1]: document starts in the flattened B*L tokens
    batch: int
    length: int
    backend: str  # "reference" or "kernels", for every layer of this forward
    _routed: dict = field(default_factory=dict, init=False, repr=False, compare=False)
    kept_attention: dict = field(default_factory=dict, init=False, repr=False, compare=False)

    def __post_init__(self):
        if self.backend not in BACKENDS:
            raise ValueError(f"DocumentLayout.backend must be a resolved backend, one of {BACKENDS}, "
                             f"got {self.backend!r} (see attention.resolve_backend)")

    @classmethod
    def from_position_ids(cls, position_ids: torch.Tensor | None, batch: int, length: int, device,
                          backend: str) -> "DocumentLayout":
        if position_ids is None:
            starts = torch.zeros(batch, length, dtype=torch.bool, device=device)
        else:
            if position_ids.shape[-1] != length:
                raise ValueError(f"position_ids has length {position_ids.shape[-1]}, input has {length}")
            starts = (position_ids == 0).expand(batch, length)
        starts = starts.clone()
        starts[:, 0] = True
        return cls.from_starts(starts, backend)

    @classmethod
    def from_document_ids(cls, document_ids: torch.Tensor, backend: str) -> "DocumentLayout":
        """An explicit document index per token (any labels; a change of label starts a document)."""
        starts = torch.ones_like(document_ids, dtype=torch.bool)
        starts[:, 1:] = document_ids[:, 1:] != document_ids[:, :-1]
        return cls.from_starts(starts, backend)

    @classmethod
    def from_starts(cls, starts: torch.Tensor, backend: str) -> "DocumentLayout":
        """One host sync (the number of documents)."""
        batch, length = starts.shape
        doc_ids = starts.long().cumsum(-1) - 1
        flat = starts.reshape(-1).nonzero().squeeze(-1).to(torch.int32)
        total = torch.tensor([batch * length], dtype=torch.int32, device=starts.device)
        return cls(doc_ids=doc_ids, cu_seqlens=torch.cat([flat, total]), batch=batch, length=length, backend=backend)

    @functools.cached_property
    def kernel_documents(self):
        """The kernels' `DocumentBounds` of the flattened batch: validated (one host sync) and
        computed on first use, then shared by every kernel call of this forward."""
        from l2a_kernels import document_bounds

        return document_bounds(self.cu_seqlens, self.batch * self.length, self.cu_seqlens.device)

    def routed_tokens(self, route: torch.Tensor, key=None):
        """The kernels' `RoutedTokens` of a bool [B, L] route (one host sync: the routed count).
        With a key (the layer index), made once per forward: activation checkpointing recomputes
        the layer with the same route, and then reuses these instead of syncing again."""
        from l2a_kernels import routed_tokens

        if key is None:
            return routed_tokens(route.reshape(-1))
        if key not in self._routed:
            self._routed[key] = routed_tokens(route.reshape(-1))
        tokens = self._routed[key]
        if tokens.mask.shape != (route.numel(),):
            raise ValueError(f"routed tokens for key {key!r} were made for {tokens.mask.numel()} tokens, this route "
                             f"has {route.numel()}: one key per layer and forward")
        return tokens

    @property
    def one_document_per_row(self) -> bool:
        """No boundary inside any row (known on the host: cu_seqlens' size came from nonzero)."""
        return self.cu_seqlens.numel() - 1 == self.batch

    def mask(self, window: int | None = None) -> torch.Tensor:
        """Bool [B, 1, L, L]: key j visible to query i (same document, causal, inside the window).

        Only for the reference backend: it is quadratic in memory.
        """
        idx = torch.arange(self.length, device=self.doc_ids.device)
        allowed = idx[None, :] <= idx[:, None]
        if window is not None:
            allowed = allowed & (idx[:, None] - idx[None, :] < window)
        same_doc = self.doc_ids[:, :, None] == self.doc_ids[:, None, :]
        return (allowed[None] & same_doc)[:, None]
