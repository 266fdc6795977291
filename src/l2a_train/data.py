"""Reading packed rows (written by `l2a-prep`) for training: dataset, distributed loader.

    manifest = read_manifest(path, seq_len=None)   # validated, no shard opened (the trainer's checks)
    ds = PackedDataset(path, seq_len=None)
    loader = PackedLoader(ds, micro_batch_size=B, rank=r, world_size=W, seed=s, shuffle=True)
    batch = loader.next_batch()      # {"input_ids": Long[B, L], "position_ids": Long[B, L], "padding": Bool[B, L]}
    loader.state_dict() / loader.load_state_dict(sd)

The loader walks one global sequence of rows: epoch e is a permutation of all rows seeded by
(seed, e), epochs follow each other. A step takes the next B x W rows of that sequence and
rank r gets its B of them. The state is just the number of rows consumed, the same on every
rank, so a checkpoint resumes exactly at any world size or micro-batch size; within an epoch
the ranks' rows are disjoint.

Position ids restart at 0 at every segment start recorded for the row; the model finds
document boundaries from them. `padding` marks the filler at the end of the data set's last row
(its own segment, document -1 in the index): no loss is computed there.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

import numpy as np
import torch

from l2a_common import UserError
from l2a_data_prep import format as fmt

log = logging.getLogger(__name__)
STATE_VERSION = 1
REQUIRED = ("format", "seq_len", "num_rows", "shards", "tokenizer")


def read_manifest(path: str | Path, seq_len: int | None = None) -> dict:
    """The validated manifest.json of a prepared directory (no shard is opened); `seq_len`: the
    row length the caller expects (data.seq_len), None for any."""
    manifest_path = Path(path) / fmt.MANIFEST
    if not manifest_path.is_file():
        hint = " (a prep still running or stopped halfway: rerun the same l2a-prep command)" if (Path(path) / fmt.PLAN).exists() else ""
        raise UserError(
            f"data.path='{path}': no {fmt.MANIFEST} there{hint}; prepare data with `l2a-prep` "
            "(e.g. `l2a-prep prep=quickstart`) and point data.path at its output"
        )
    try:
        manifest = json.loads(manifest_path.read_text())
    except json.JSONDecodeError as err:
        raise UserError(f"{manifest_path}: not valid JSON ({err}); prepare the data again") from err
    missing = [k for k in REQUIRED if k not in manifest]
    if missing or manifest["format"] != fmt.FORMAT:
        raise UserError(
            f"{manifest_path}: not an {fmt.FORMAT} manifest (format={manifest.get('format')!r}, "
            f"missing {missing}); prepare the data again with this version's l2a-prep"
        )
    rows = int(manifest["seq_len"])
    if seq_len is not None and seq_len != rows:
        raise UserError(
            f"data.seq_len={seq_len} but '{path}' holds rows of {rows} tokens; set data.seq_len=null "
            f"or prepare the data with seq_len={seq_len}"
        )
    return manifest


def manifest_tokenizer_path(path: str | Path, manifest: dict) -> str:
    """The tokenizer directory that a prepared directory's manifest names."""
    return str(Path(path) / manifest["tokenizer"]["path"])


class PackedDataset:
    """Rows of a prepared directory: memory-mapped tokens, segment starts per row."""

    def __init__(self, path: str | Path, seq_len: int | None = None):
        self.root = Path(path)
        manifest_path = self.root / fmt.MANIFEST
        self.manifest = read_manifest(path, seq_len)
        self.seq_len = int(self.manifest["seq_len"])
        self.tokenizer_path = manifest_tokenizer_path(path, self.manifest)
        self._names = [s["name"] for s in self.manifest["shards"]]
        self._rows = [int(s["rows"]) for s in self.manifest["shards"]]
        self._start = np.cumsum([0] + self._rows)
        self.num_rows = int(self._start[-1])
        if self.num_rows != int(self.manifest["num_rows"]):
            raise UserError(f"{manifest_path}: shards hold {self.num_rows} rows, manifest says {self.manifest['num_rows']}")
        if self.num_rows == 0:
            raise UserError(f"data.path='{path}' holds no rows; prepare it with more input")
        self._row_ptr, self._doc_starts, self._seg_doc = [], [], []
        for name, rows in zip(self._names, self._rows):
            try:
                with np.load(fmt.index_path(self.root, name)) as index:
                    row_ptr, starts, seg_doc = index["row_ptr"], index["doc_starts"], index["seg_doc"]
            except (OSError, KeyError, ValueError) as err:
                raise UserError(f"data.path='{path}': shard {name} index unreadable ({err}); prepare the data again") from err
            if len(row_ptr) != rows + 1:
                raise UserError(f"data.path='{path}': shard {name} index has {len(row_ptr) - 1} rows, manifest {rows}")
            self._row_ptr.append(row_ptr)
            self._doc_starts.append(starts)
            self._seg_doc.append(seg_doc)
        self._tokens: list[np.ndarray | None] = [None] * len(self._names)  # opened on first use (after fork)

    def __len__(self) -> int:
        return self.num_rows

    def _locate(self, row: int) -> tuple[int, int]:
        if not 0 <= row < self.num_rows:
            raise IndexError(f"row {row} out of range [0, {self.num_rows})")
        shard = int(np.searchsorted(self._start, row, side="right") - 1)
        return shard, row - int(self._start[shard])

    def row(self, row: int) -> tuple[np.ndarray, np.ndarray]:
        """(token ids int32[seq_len], segment start offsets int32[k], the first being 0)."""
        shard, local = self._locate(row)
        tokens = self._tokens[shard]
        if tokens is None:
            try:
                tokens = fmt.open_tokens(self.root, self._names[shard], self._rows[shard], self.seq_len)
            except (OSError, ValueError) as err:
                raise UserError(f"data.path='{self.root}': {err}; prepare the data again") from err
            self._tokens[shard] = tokens
        ptr = self._row_ptr[shard]
        return np.asarray(tokens[local]), self._doc_starts[shard][ptr[local] : ptr[local + 1]]

    def padding_start(self, row: int) -> int:
        """Where the row's padding begins (seq_len: none). Only the data set's last row has any."""
        shard, local = self._locate(row)
        last = self._row_ptr[shard][local + 1] - 1
        return int(self._doc_starts[shard][last]) if self._seg_doc[shard][last] == -1 else self.seq_len


def check_tokenizer_matches(model_path, data: dict, allow: bool) -> None:
    """The packed data of each setting in `data` (setting -> path; None: not used) was tokenized
    with the model's own tokenizer. Otherwise its token ids mean other strings to the model:
    perplexity and calibration run and report numbers about nothing. Compared only when the
    checkpoint has a tokenizer (else the data's is the one used); `allow` (the setting
    data.allow_tokenizer_mismatch) turns the error into a warning. Cheap: before the model loads.
    Used by l2a-train, l2a-eval and l2a-prune."""
    from l2a_data_prep.tokenizer import has_tokenizer, mismatch

    model_dir = Path(model_path)
    if not has_tokenizer(model_dir):
        return
    for setting, path in data.items():
        if not path:
            continue
        data_dir = Path(manifest_tokenizer_path(path, read_manifest(path)))
        if not has_tokenizer(data_dir):
            raise UserError(f"{setting}={path}: its tokenizer directory {data_dir} is missing or empty; "
                            "prepare the data again with l2a-prep")
        try:
            difference = mismatch(data_dir, model_dir)
        except Exception as err:  # tokenizers raises many types for a broken file; the message is what matters
            raise UserError(f"cannot compare the tokenizers of {setting}={path} and model.path={model_path} ({err})") from None
        if difference is None:
            continue
        message = f"{setting}={path} was prepared with another tokenizer than model.path={model_path}: {difference}"
        if allow:
            log.warning("%s; going on because data.allow_tokenizer_mismatch=true", message)
            continue
        raise UserError(f"{message}; prepare it with the model's tokenizer (l2a-prep tokenizer.path={model_path}) "
                        "or pass data.allow_tokenizer_mismatch=true if the ids are known to agree")


def position_ids(doc_starts: np.ndarray, seq_len: int) -> np.ndarray:
    """0, 1, 2, ... restarting at each segment start."""
    seg_start = np.zeros(seq_len, dtype=np.int64)
    seg_start[doc_starts] = doc_starts
    return np.arange(seq_len, dtype=np.int64) - np.maximum.accumulate(seg_start)


class PackedLoader:
    """Deterministic, resumable, rank-aware batches of packed rows (see the module docstring)."""

    def __init__(self, dataset: PackedDataset, micro_batch_size: int, rank: int, world_size: int, seed: int, shuffle: bool):
        if micro_batch_size < 1 or world_size < 1 or not 0 <= rank < world_size:
            raise UserError(
                f"need micro_batch_size >= 1 and 0 <= rank < world_size, got {micro_batch_size}, {rank}, {world_size}"
            )
        self.dataset = dataset
        self.micro_batch_size, self.rank, self.world_size = micro_batch_size, rank, world_size
        self.seed, self.shuffle = int(seed), bool(shuffle)
        self.rows_consumed = 0  # global: rows handed to all ranks together
        self._perm_epoch, self._perm = -1, None

    @property
    def epoch(self) -> int:
        return self.rows_consumed // self.dataset.num_rows

    def _global_row(self, position: int) -> int:
        n = self.dataset.num_rows
        epoch, offset = divmod(position, n)
        if not self.shuffle:
            return offset
        if epoch != self._perm_epoch:
            self._perm = np.random.Generator(np.random.PCG64([self.seed, epoch])).permutation(n)
            self._perm_epoch = epoch
        return int(self._perm[offset])

    def next_batch(self) -> dict[str, torch.Tensor]:
        B, L = self.micro_batch_size, self.dataset.seq_len
        base = self.rows_consumed + self.rank * B
        ids = np.empty((B, L), dtype=np.int64)
        pos = np.empty((B, L), dtype=np.int64)
        padding = np.zeros((B, L), dtype=bool)
        for i in range(B):
            row = self._global_row(base + i)
            tokens, starts = self.dataset.row(row)
            ids[i] = tokens
            pos[i] = position_ids(starts, L)
            padding[i, self.dataset.padding_start(row):] = True
        self.rows_consumed += B * self.world_size
        return {"input_ids": torch.from_numpy(ids), "position_ids": torch.from_numpy(pos),
                "padding": torch.from_numpy(padding)}

    def __iter__(self):
        while True:
            yield self.next_batch()

    def state_dict(self) -> dict:
        return {
            "version": STATE_VERSION,
            "rows_consumed": self.rows_consumed,
            "seed": self.seed,
            "shuffle": self.shuffle,
            "num_rows": self.dataset.num_rows,
            "fingerprint": self.dataset.manifest.get("fingerprint"),
        }

    def load_state_dict(self, state: dict) -> None:
        if state.get("version") != STATE_VERSION:
            raise UserError(f"data loader state version {state.get('version')} is not {STATE_VERSION}")
        mismatched = [
            f"{key}: checkpoint {state[key]!r}, now {now!r}"
            for key, now in (
                ("num_rows", self.dataset.num_rows),
                ("fingerprint", self.dataset.manifest.get("fingerprint")),
                ("seed", self.seed),
                ("shuffle", self.shuffle),
            )
            if state.get(key) != now
        ]
        if mismatched:
            raise UserError(
                "cannot resume the data position exactly: " + "; ".join(mismatched)
                + " (use the data set and data/trainer seed of the checkpoint, or start a new run)"
            )
        self.rows_consumed = int(state["rows_consumed"])
