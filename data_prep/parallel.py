"""Tokenization off the main thread, results in submission order, with bounded memory.

`workers=0`: threads in this process calling the Rust tokenizer, which releases the GIL and
parallelises a batch over all cores itself (the fastest choice on a few cores).
`workers=N`: N spawned processes with one tokenizer thread each (for many cores, where one
Python process cannot keep up with reading and packing). Spawned, not forked: a forked Rust
tokenizer that already used its thread pool would deadlock or go single-threaded.

Either way results come back in the order submitted, so the output never depends on the
number of workers; at most `window` batches are in flight, so memory does not grow with
the corpus.
"""

from __future__ import annotations

import multiprocessing
from collections import deque
from concurrent.futures import Executor, ProcessPoolExecutor, ThreadPoolExecutor
from typing import Any, Iterator

import numpy as np

from .tokenizer import Encoder

IN_FLIGHT = 4  # batches tokenized at once in threads mode (memory: this x batch_chars)
_encoder: Encoder | None = None


def _init(tokenizer_json: str, bos_id, eos_id, add_bos: bool) -> None:
    global _encoder
    _encoder = Encoder(tokenizer_json, bos_id, eos_id, add_bos, threads=False)


def _encode(texts: list[str]) -> list[np.ndarray]:
    return _encoder.encode_batch(texts)


class OrderedPipeline:
    """Submit batches (and markers) in order; get them back in the same order."""

    def __init__(self, encoder: Encoder, tokenizer_json: str, workers: int):
        self.encoder = encoder
        if workers > 0:
            self.pool: Executor = ProcessPoolExecutor(
                workers,
                mp_context=multiprocessing.get_context("spawn"),
                initializer=_init,
                initargs=(tokenizer_json, encoder.prefix[0] if encoder.prefix else None, encoder.eos_id, bool(encoder.prefix)),
            )
            self.fn = _encode
            self.window = 2 * workers
        else:
            # Several calls in flight share the Rust thread pool, which steals work across
            # them: one long document then no longer leaves the other cores idle.
            self.pool = ThreadPoolExecutor(IN_FLIGHT)
            self.fn = encoder.encode_batch
            self.window = IN_FLIGHT
        self.pending: deque = deque()
        self.in_flight = 0

    def submit(self, texts: list[str], meta: Any) -> Iterator[tuple[str, Any, Any]]:
        """Queue a batch; yields whatever became ready (waiting while the window is full)."""
        self.pending.append(("batch", self.pool.submit(self.fn, texts), meta))
        self.in_flight += 1
        while self.in_flight > self.window:
            yield self._pop()

    def mark(self, meta: Any) -> None:
        """A marker that comes back after every batch submitted before it."""
        self.pending.append(("mark", None, meta))

    def drain(self) -> Iterator[tuple[str, Any, Any]]:
        while self.pending:
            yield self._pop()

    def _pop(self) -> tuple[str, Any, Any]:
        kind, future, meta = self.pending.popleft()
        if kind == "batch":
            self.in_flight -= 1
            return kind, future.result(), meta
        return kind, None, meta

    def close(self) -> None:
        self.pool.shutdown(wait=True, cancel_futures=True)
