"""Tokenization off the main thread, results in submission order, with bounded memory.

`workers=0`: threads in this process calling the Rust tokenizer, which releases the GIL and
parallelises a batch over all cores itself (the fastest choice on a few cores).
`workers=N`: N spawned processes with one tokenizer thread each (for many cores, where one
Python process cannot keep up with reading and packing). Spawned, not forked: a forked Rust
tokenizer that already used its thread pool would deadlock or go single-threaded.

Either way results come back in the order submitted, so the output never depends on the
number of workers; at most `window` batches are in flight, so memory does not grow with
the corpus. Workers end with the prep, even one killed with SIGKILL (`_exit_with_parent`).
"""

from __future__ import annotations

import ctypes
import multiprocessing
import os
import signal
import sys
import threading
import time
from collections import deque
from concurrent.futures import Executor, ProcessPoolExecutor, ThreadPoolExecutor
from typing import Any, Iterator

import numpy as np

from .tokenizer import Encoder

IN_FLIGHT = 4  # batches tokenized at once in threads mode (memory: this x batch_chars)
PARENT_POLL_S = 0.5  # how often a worker without PR_SET_PDEATHSIG checks that the prep is alive
PR_SET_PDEATHSIG = 1  # <linux/prctl.h>
_encoder: Encoder | None = None


def _die_with_parent_linux() -> bool:
    """Ask the kernel to SIGKILL this process when its parent dies; False where unavailable.

    SIGKILL because a worker has nothing to save (its results only go to the dead parent) and
    it must also stop while inside the Rust tokenizer. The kernel means the parent *thread*:
    the pool's processes are started by the thread that calls `submit`, which in l2a-prep is
    the main thread, and the pool is shut down before that thread could end.
    """
    if not sys.platform.startswith("linux"):
        return False
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        return libc.prctl(ctypes.c_int(PR_SET_PDEATHSIG), ctypes.c_ulong(signal.SIGKILL),
                          ctypes.c_ulong(0), ctypes.c_ulong(0), ctypes.c_ulong(0)) == 0
    except (OSError, AttributeError):
        return False


def _watch_parent(parent: int) -> None:
    """Elsewhere: a daemon thread that ends the worker once it has been re-parented."""
    while os.getppid() == parent:
        time.sleep(PARENT_POLL_S)
    os._exit(1)


def _exit_with_parent(parent: int) -> None:
    """A worker must not outlive the prep. A prep that ends or fails shuts its pool down, but
    one killed with SIGKILL (or the OOM killer) gets no chance to, and its workers would wait
    on the pool's queue forever, each holding a tokenizer (a user found 2 x ~190 MB left running).
    A parent that died before this ran shows as a changed os.getppid()."""
    if not _die_with_parent_linux():
        threading.Thread(target=_watch_parent, args=(parent,), name="l2a-prep-parent-watch", daemon=True).start()
    if os.getppid() != parent:
        os._exit(1)


def _init(tokenizer_json: str, bos_id, eos_id, add_bos: bool, parent: int) -> None:
    global _encoder
    _exit_with_parent(parent)
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
                initargs=(tokenizer_json, encoder.prefix[0] if encoder.prefix else None, encoder.eos_id,
                          bool(encoder.prefix), os.getpid()),
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
