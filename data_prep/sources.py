"""Readers: each source type yields `Doc` / `Skip` records, in a fixed order, streaming.

Types (config `sources.<name>.type`, defaults per type in `source_defaults`):
  jsonl      files, folders or globs of .jsonl / .jsonl.gz (one JSON object per line)
  parquet    files, folders or globs of .parquet
  text       a folder of plain-text files (one document per file)
  arrow      a `datasets` dataset written with `save_to_disk`
  hub        a Hugging Face hub dataset by name (needs the network; streamed)
  stdlib     built in: the Python standard library (and, with site_packages: true, the installed
             packages) as code-repository documents; held-out splits by package (holdout, split)
  retrieval  built in: synthetic RULER-style retrieval documents

Files of a source are read in sorted path order, so the record order never depends on the
file system; bad records become `Skip`s naming file and line.
"""

from __future__ import annotations

import glob as globlib
import gzip
import json
import os
import zlib
from pathlib import Path
from typing import Iterator

from l2a_common import UserError

from . import stdlib_corpus, synthetic
from .records import Doc, Skip

Record = Doc | Skip
TYPES = ("jsonl", "parquet", "text", "arrow", "hub", "stdlib", "retrieval")


def _setting(spec: dict, key: str, name: str):
    if key not in spec or spec[key] is None:
        raise UserError(f"sources.{name}.{key} is required for a source of type '{spec.get('type')}'")
    return spec[key]


def expand_paths(spec: dict, name: str, suffixes: tuple[str, ...]) -> list[Path]:
    """A file, a folder (searched recursively for `suffixes`) or a glob; sorted; must match."""
    raw = _setting(spec, "path", name)
    patterns = list(raw) if isinstance(raw, (list, tuple)) else [raw]
    files: set[Path] = set()
    for pattern in patterns:
        pattern = os.path.expanduser(str(pattern))
        path = Path(pattern)
        if path.is_dir():
            # Broken links are kept: reading them fails and is counted, never silently dropped.
            files.update(p for p in path.rglob("*") if (p.is_file() or p.is_symlink()) and p.name.endswith(suffixes))
        elif path.is_file():
            files.add(path)
        elif globlib.has_magic(pattern):
            files.update(Path(p) for p in globlib.glob(pattern, recursive=True) if Path(p).is_file())
        else:
            raise UserError(f"sources.{name}.path: '{pattern}' does not exist (a file, a folder or a glob)")
    if not files:
        raise UserError(f"sources.{name}.path: no {'/'.join(suffixes)} files match {raw}")
    return sorted(files)


def _text_checks(text, ref: str, field: str) -> Record:
    if text is None:
        return Skip("missing_text_field", ref, f"'{field}' is null")
    if not isinstance(text, str):
        return Skip("text_not_string", ref, f"'{field}' is a {type(text).__name__}, not a string")
    if not text or text.isspace():  # no strip(): it would copy every document
        return Skip("empty_document", ref, "empty or whitespace-only text")
    try:  # lone surrogates from JSON escapes like "\udc80" cannot be tokenized
        text.encode("utf-8")
    except UnicodeEncodeError as err:
        return Skip("invalid_utf8", ref, f"text holds an unpaired surrogate at character {err.start}")
    return Doc(text, ref)


def _jsonl_record(raw: bytes, ref: str, field: str) -> Record:
    if not raw.strip():
        return Skip("empty_document", ref, "blank line")
    try:
        line = raw.decode("utf-8").rstrip("\r\n")
    except UnicodeDecodeError as err:
        return Skip("invalid_utf8", ref, f"byte {err.start} of the line is not UTF-8")
    try:
        obj = json.loads(line)
    except json.JSONDecodeError as err:
        return Skip("malformed_json", ref, f"invalid JSON ({err.msg} at column {err.colno})")
    if not isinstance(obj, dict):
        return Skip("malformed_json", ref, f"a JSON {type(obj).__name__}, not an object")
    if field not in obj:  # the fields it does have point at the right text_field
        shown = ", ".join(list(obj)[:8]) + (", ..." if len(obj) > 8 else "")
        return Skip("missing_text_field", ref, f"no '{field}' field (fields: {shown or 'none'})")
    return _text_checks(obj[field], ref, field)


def read_jsonl(spec: dict, name: str) -> Iterator[Record]:
    field = spec["text_field"]
    for path in expand_paths(spec, name, (".jsonl", ".jsonl.gz", ".json", ".json.gz")):
        opener = gzip.open if path.name.endswith(".gz") else open
        # One line of look-ahead: a line is used only once the next read succeeded, so the
        # cut-off last line of a damaged file counts under unreadable_file, not as bad JSON.
        pending: tuple[int, bytes] | None = None
        try:
            with opener(path, "rb") as handle:
                for line_no, raw in enumerate(handle, start=1):
                    if pending is not None:
                        yield _jsonl_record(pending[1], f"{path}:{pending[0]}", field)
                    pending = (line_no, raw)
            if pending is not None:
                yield _jsonl_record(pending[1], f"{path}:{pending[0]}", field)
        except (OSError, EOFError, zlib.error) as err:
            where = f"{path}:{pending[0]}" if pending else str(path)
            yield Skip("unreadable_file", where, f"cannot read the file from here on ({type(err).__name__}: {err})")


def read_parquet(spec: dict, name: str) -> Iterator[Record]:
    import pyarrow as pa
    import pyarrow.parquet as pq

    field = spec["text_field"]
    for path in expand_paths(spec, name, (".parquet",)):
        row = 0
        try:
            handle = pq.ParquetFile(path)
            if field not in handle.schema_arrow.names:
                raise UserError(
                    f"{path}: no column '{field}' (columns: {', '.join(handle.schema_arrow.names)}); "
                    f"set sources.{name}.text_field"
                )
            for batch in handle.iter_batches(columns=[field], batch_size=spec["batch_rows"]):
                for text in batch.column(0).to_pylist():
                    yield _text_checks(text, f"{path}#row{row}", field)
                    row += 1
        except (OSError, pa.ArrowException) as err:
            yield Skip("unreadable_file", f"{path}#row{row}", f"cannot read the file ({type(err).__name__}: {err})")


def read_text(spec: dict, name: str) -> Iterator[Record]:
    suffixes = tuple(spec["suffixes"])
    for path in expand_paths(spec, name, suffixes):
        try:
            data = path.read_bytes()
        except OSError as err:
            yield Skip("unreadable_file", str(path), f"cannot read the file ({type(err).__name__}: {err})")
            continue
        try:
            text = data.decode("utf-8")
        except UnicodeDecodeError as err:
            line = data.count(b"\n", 0, err.start) + 1
            yield Skip("invalid_utf8", f"{path}:{line}", f"byte {err.start} is not UTF-8")
            continue
        yield _text_checks(text, str(path), "text")


def read_arrow(spec: dict, name: str) -> Iterator[Record]:
    from datasets import DatasetDict, load_from_disk

    path = Path(os.path.expanduser(str(_setting(spec, "path", name))))
    if not path.exists():
        raise UserError(f"sources.{name}.path: '{path}' does not exist (a folder written by save_to_disk)")
    try:
        data = load_from_disk(str(path))
    except Exception as err:  # datasets raises FileNotFoundError or its own errors
        raise UserError(f"sources.{name}.path: '{path}' is not a dataset saved with save_to_disk ({err})") from err
    if isinstance(data, DatasetDict):
        split = spec["split"]
        if split not in data:
            raise UserError(f"sources.{name}.split: '{split}' not in {path} (splits: {', '.join(data)})")
        data = data[split]
    yield from _iter_dataset(data, spec, name, str(path))


def _iter_dataset(data, spec: dict, name: str, label: str) -> Iterator[Record]:
    field = spec["text_field"]
    columns = data.column_names
    if columns is not None and field not in columns:
        raise UserError(f"{label}: no column '{field}' (columns: {', '.join(columns)}); set sources.{name}.text_field")
    row = 0
    for batch in data.select_columns([field]).iter(batch_size=spec["batch_rows"]):
        for text in batch[field]:
            yield _text_checks(text, f"{label}#row{row}", field)
            row += 1


def read_hub(spec: dict, name: str) -> Iterator[Record]:
    from datasets import load_dataset

    dataset = _setting(spec, "path", name)
    if os.environ.get("HF_HUB_OFFLINE") == "1" or os.environ.get("HF_DATASETS_OFFLINE") == "1":
        raise UserError(
            f"sources.{name}: hub dataset '{dataset}' needs the network but HF_HUB_OFFLINE/HF_DATASETS_OFFLINE "
            "is set; download it elsewhere and use type=arrow (save_to_disk) or jsonl/parquet files"
        )
    try:
        data = load_dataset(dataset, spec["name"], split=spec["split"], streaming=True)
    except Exception as err:
        raise UserError(f"sources.{name}: cannot open hub dataset '{dataset}' ({err})") from err
    yield from _iter_dataset(data, spec, name, f"hub:{dataset}")


def read_stdlib(spec: dict, name: str) -> Iterator[Record]:
    try:
        holdout = float(spec["holdout"])
    except (TypeError, ValueError):
        raise UserError(f"sources.{name}.holdout={spec['holdout']!r}: give a fraction in [0, 1)") from None
    documents = stdlib_corpus.iter_documents(
        spec["root"], list(spec["exclude"]), bool(spec["site_packages"]), holdout, str(spec["split"]))
    for ref, text in documents:
        if isinstance(text, bytes):
            yield Skip("invalid_utf8", f"stdlib:{ref}", "a file of the package is not UTF-8")
        else:
            yield Doc(text, f"stdlib:{ref}")


def read_retrieval(spec: dict, name: str) -> Iterator[Record]:
    options = {k: spec[k] for k in ("length", "num_keys", "num_values", "num_queries", "key_type", "value_type", "haystack")}
    for index in range(int(spec["num_docs"])):
        yield Doc(synthetic.training_document(spec["seed"], index, options), f"retrieval:{name}#{index}")


READERS = {
    "jsonl": read_jsonl,
    "parquet": read_parquet,
    "text": read_text,
    "arrow": read_arrow,
    "hub": read_hub,
    "stdlib": read_stdlib,
    "retrieval": read_retrieval,
}


def resolve(name: str, spec: dict, defaults: dict) -> dict:
    """The source's settings: its type's `source_defaults` under its own; validated."""
    kind = spec.get("type")
    if kind not in READERS:
        raise UserError(f"sources.{name}.type must be one of {', '.join(TYPES)}, got '{kind}'")
    merged = {**dict(defaults.get(kind, {})), **spec}
    merged.setdefault("domain", name)
    if merged["domain"] is None:
        merged["domain"] = name
    return merged


def read(name: str, spec: dict) -> Iterator[Record]:
    return READERS[spec["type"]](spec, name)
