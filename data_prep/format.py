"""The on-disk packed format (`l2a-packed-v1`), shared by the writer and `l2a_train.data`.

A prepared directory holds:

    manifest.json             written last: its presence means the data set is complete
    prep.json                 the plan (config fingerprint) that resumed runs must match
    tokenizer/                the tokenizer the ids belong to (a HF tokenizer directory)
    <shard>.tokens.bin        int32, little-endian, [rows, seq_len]: memory-mapped by readers
    <shard>.index.npz         row_ptr int64[rows+1] into the segment arrays below;
                              doc_starts int32[segments]: offset in its row where a segment
                              starts (each row's list begins with 0); seg_doc int64: index of
                              the document in the prep's stream (-1: padding); seg_offset
                              int64: where the segment starts inside its document
    <shard>.done.json         completion marker with the shard's statistics
    <shard>.leftover.npz      the shard's last, partial row (packed into `tail` at the end)

Shards are `shard-00000`, `shard-00001`, ... then `tail`; the manifest lists them in order.
Every file is written under a temporary name and renamed, so a killed prep never leaves a
file that looks complete.
"""

from __future__ import annotations

import json
import os
import zipfile
from pathlib import Path

import numpy as np

FORMAT = "l2a-packed-v1"
MANIFEST = "manifest.json"
PLAN = "prep.json"
TOKENIZER_DIR = "tokenizer"
TAIL = "tail"
TOKEN_DTYPE = np.dtype("<i4")


def shard_name(index: int) -> str:
    return f"shard-{index:05d}"


def tokens_path(root: Path, shard: str) -> Path:
    return root / f"{shard}.tokens.bin"


def index_path(root: Path, shard: str) -> Path:
    return root / f"{shard}.index.npz"


def marker_path(root: Path, shard: str) -> Path:
    return root / f"{shard}.done.json"


def leftover_path(root: Path, shard: str) -> Path:
    return root / f"{shard}.leftover.npz"


def tmp(path: Path) -> Path:
    return path.with_name(f"{path.name}.tmp{os.getpid()}")


def write_json(path: Path, obj) -> None:
    part = tmp(path)
    part.write_text(json.dumps(obj, indent=2, sort_keys=False) + "\n")
    os.replace(part, path)


def save_npz(path: Path, **arrays) -> None:
    """Like np.savez, but byte-identical across runs (np.savez stamps the current time)."""
    part = tmp(path)
    with zipfile.ZipFile(part, "w", compression=zipfile.ZIP_STORED) as archive:
        for name, array in arrays.items():
            info = zipfile.ZipInfo(f"{name}.npy", date_time=(1980, 1, 1, 0, 0, 0))
            with archive.open(info, "w", force_zip64=True) as member:
                np.lib.format.write_array(member, np.asarray(array), allow_pickle=False)
    os.replace(part, path)


def load_index(root: Path, shard: str) -> dict[str, np.ndarray]:
    with np.load(index_path(root, shard)) as data:
        return {key: data[key] for key in data.files}


def open_tokens(root: Path, shard: str, rows: int, seq_len: int) -> np.ndarray:
    path = tokens_path(root, shard)
    expected = rows * seq_len * TOKEN_DTYPE.itemsize
    size = path.stat().st_size
    if size != expected:
        raise ValueError(f"{path}: {size} bytes, expected {expected} ({rows} rows x {seq_len} int32)")
    if rows == 0:
        return np.zeros((0, seq_len), dtype=TOKEN_DTYPE)
    return np.memmap(path, dtype=TOKEN_DTYPE, mode="r", shape=(rows, seq_len))
