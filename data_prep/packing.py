"""Packing: documents' token ids -> fixed rows of `seq_len`, written as one shard.

Documents are concatenated; a document that does not fit continues at the start of the
next row as a new segment (its position ids restart there). Each shard's last, partial row
is kept aside (`leftover`) instead of padded; `pack_tail` packs all shards' leftovers into
the final `tail` shard, so only the very last row of a data set holds padding.
"""

from __future__ import annotations

import os
from array import array
from pathlib import Path

import numpy as np

from . import format as fmt


class ShardWriter:
    def __init__(self, root: Path, shard: str, seq_len: int):
        self.root, self.shard, self.seq_len = root, shard, seq_len
        self.path = fmt.tokens_path(root, shard)
        self.part = fmt.tmp(self.path)
        self.handle = open(self.part, "wb", buffering=1 << 22)
        self.row = np.empty(seq_len, dtype=fmt.TOKEN_DTYPE)
        self.fill = 0
        self.rows = 0
        # Compact growable arrays: a shard may hold millions of short documents.
        self.doc_starts = array("i")
        self.seg_doc = array("q")
        self.seg_offset = array("q")
        self.row_ptr = array("q", [0])

    def _segment(self, start: int, doc: int, offset: int) -> None:
        self.doc_starts.append(start)
        self.seg_doc.append(doc)
        self.seg_offset.append(offset)

    def _end_row(self) -> None:
        self.rows += 1
        self.row_ptr.append(len(self.doc_starts))

    def add(self, tokens: np.ndarray, doc: int, first_offset: int = 0) -> None:
        """Append one document (or a segment of one starting at `first_offset` in it)."""
        L, n, offset = self.seq_len, len(tokens), 0
        while offset < n:
            if self.fill == 0 and n - offset >= L:  # whole rows straight from the document
                full = (n - offset) // L
                self.handle.write(tokens[offset : offset + full * L].astype(fmt.TOKEN_DTYPE, copy=False).tobytes())
                for i in range(full):
                    self._segment(0, doc, first_offset + offset + i * L)
                    self._end_row()
                offset += full * L
                continue
            take = min(L - self.fill, n - offset)
            self.row[self.fill : self.fill + take] = tokens[offset : offset + take]
            self._segment(self.fill, doc, first_offset + offset)
            self.fill += take
            offset += take
            if self.fill == L:
                self.handle.write(self.row.tobytes())
                self.fill = 0
                self._end_row()

    def pad(self, pad_id: int) -> int:
        """Fill the partial row with one padding segment; returns the number of pad tokens."""
        if self.fill == 0:
            return 0
        count = self.seq_len - self.fill
        self.add(np.full(count, pad_id, dtype=fmt.TOKEN_DTYPE), doc=-1)
        return count

    def finish(self) -> int:
        """Write the index (and the partial last row as `leftover`); returns the row count."""
        self.handle.close()
        cut = self.row_ptr[-1]  # segments of the partial row, if any, start here
        if self.fill:
            fmt.save_npz(
                fmt.leftover_path(self.root, self.shard),
                tokens=self.row[: self.fill].copy(),
                doc_starts=np.asarray(self.doc_starts[cut:], dtype=np.int32),
                seg_doc=np.asarray(self.seg_doc[cut:], dtype=np.int64),
                seg_offset=np.asarray(self.seg_offset[cut:], dtype=np.int64),
            )
        fmt.save_npz(
            fmt.index_path(self.root, self.shard),
            row_ptr=np.asarray(self.row_ptr, dtype=np.int64),
            doc_starts=np.asarray(self.doc_starts[:cut], dtype=np.int32),
            seg_doc=np.asarray(self.seg_doc[:cut], dtype=np.int64),
            seg_offset=np.asarray(self.seg_offset[:cut], dtype=np.int64),
        )
        os.replace(self.part, self.path)
        return self.rows

    def abort(self) -> None:
        self.handle.close()
        self.part.unlink(missing_ok=True)


def pack_tail(root: Path, shards: list[str], seq_len: int, pad_id: int) -> tuple[int, int]:
    """Pack the leftovers of `shards`, in order, into the `tail` shard; (rows, pad tokens)."""
    writer = ShardWriter(root, fmt.TAIL, seq_len)
    for shard in shards:
        path = fmt.leftover_path(root, shard)
        if not path.exists():
            continue
        with np.load(path) as left:
            tokens, starts = left["tokens"], list(left["doc_starts"]) + [len(left["tokens"])]
            for i, (doc, offset) in enumerate(zip(left["seg_doc"], left["seg_offset"])):
                writer.add(tokens[starts[i] : starts[i + 1]], int(doc), int(offset))
    pad_tokens = writer.pad(pad_id)
    rows = writer.finish()
    return rows, pad_tokens
