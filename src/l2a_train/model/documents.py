"""Document layout of a packed batch, derived once per forward and shared by every layer.

Rows are packed with several documents; position ids restart at 0 where a document starts
(that is how `l2a_data_prep` writes them and how Hugging Face marks packed sequences). No
token may attend across a document boundary, in either attention. Batch rows are flattened
into one varlen sequence for the kernels, so a row start is also a document start.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class DocumentLayout:
    doc_ids: torch.Tensor  # Long [B, L]: document index inside each row (0, 0, 1, 1, 1, ...)
    cu_seqlens: torch.Tensor  # Int32 [num_docs + 1]: document starts in the flattened B*L tokens
    batch: int
    length: int

    @classmethod
    def from_position_ids(cls, position_ids: torch.Tensor | None, batch: int, length: int, device) -> "DocumentLayout":
        if position_ids is None:
            starts = torch.zeros(batch, length, dtype=torch.bool, device=device)
        else:
            if position_ids.shape[-1] != length:
                raise ValueError(f"position_ids has length {position_ids.shape[-1]}, input has {length}")
            starts = (position_ids == 0).expand(batch, length)
        starts = starts.clone()
        starts[:, 0] = True
        return cls.from_starts(starts)

    @classmethod
    def from_document_ids(cls, document_ids: torch.Tensor) -> "DocumentLayout":
        """An explicit document index per token (any labels; a change of label starts a document)."""
        starts = torch.ones_like(document_ids, dtype=torch.bool)
        starts[:, 1:] = document_ids[:, 1:] != document_ids[:, :-1]
        return cls.from_starts(starts)

    @classmethod
    def from_starts(cls, starts: torch.Tensor) -> "DocumentLayout":
        batch, length = starts.shape
        doc_ids = starts.long().cumsum(-1) - 1
        flat = starts.reshape(-1).nonzero().squeeze(-1).to(torch.int32)
        total = torch.tensor([batch * length], dtype=torch.int32, device=starts.device)
        return cls(doc_ids=doc_ids, cu_seqlens=torch.cat([flat, total]), batch=batch, length=length)

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
