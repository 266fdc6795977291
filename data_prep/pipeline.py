"""The prep: sources -> mixed document stream -> tokenized -> packed shards -> manifest.

Shards are cut from the document stream before tokenization (a shard closes once its
documents add up to about `shards.tokens` estimated tokens), so where a shard starts never
depends on tokenization, workers or earlier runs. That is what makes the prep:
- resumable: a rerun replays the stream cheaply, skips shards whose `.done.json` marker
  exists and redoes the rest (no document lost or duplicated);
- splittable: `shards.range=[a,b]` packs shards a..b-1 only, on any machine;
- deterministic: identical bytes whatever `workers` is.
The manifest is written once every shard is done, by whichever run completes the set, and
only if the data set holds documents: an empty result is an error, never a complete output.
It accounts for every input record (per source: read, kept, skipped by reason, left unread;
copies made by upsampling or later epochs apart), from the shards' markers.
"""

from __future__ import annotations

import hashlib
import json
import logging
import shutil
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator

import numpy as np

from l2a_common import UserError

from . import format as fmt
from . import mixture, sources, tokenizer
from .packing import ShardWriter, pack_tail
from .parallel import OrderedPipeline
from .records import SETTING_TO_CHECK, Doc, Skip, SkipCounter

log = logging.getLogger("l2a_data_prep")
BUILTIN_NAME = "l2a-builtin-bpe-{vocab}"
# Markers of another version lack statistics the manifest needs: their shards are redone
# (same bytes) rather than trusted. 2: per-source read / kept / copies, left unread.
MARKER_VERSION = 2
SOURCE_COUNTS = ("read", "kept", "copies", "documents", "tokens")
PATH_TYPES = ("jsonl", "parquet", "text", "arrow", "hub")  # sources whose input is named by `path`


def _quiet_counter() -> SkipCounter:
    return SkipCounter(strict=False, announce=False)


@dataclass
class ShardJob:
    """One shard being packed, with its statistics (written into its marker).

    Input records and copies are counted apart: `read` = `kept` + `skipped` holds for the
    input, and a copy (upsampling pass, later epoch) filtered out counts under `copy_skips`.
    """

    index: int
    writer: ShardWriter | None          # None: the shard is done already or outside the range
    skips: SkipCounter = field(default_factory=_quiet_counter)       # input records, by source and reason
    copy_skips: SkipCounter = field(default_factory=_quiet_counter)  # copies filtered by length
    first_doc: int = -1
    documents: int = 0
    tokens: int = 0
    sources: dict = field(default_factory=dict)
    domains: dict = field(default_factory=dict)
    ended: str | None = None            # the last shard only: why the stream stopped
    left_unread: dict | None = None     # the last shard only: records never reached, per source

    def source(self, name: str) -> dict:
        return self.sources.setdefault(name, dict.fromkeys(SOURCE_COUNTS, 0))

    def add(self, tokens: np.ndarray, doc: int, source: str, domain: str, copy: bool = False) -> None:
        self.writer.add(tokens, doc)
        self.documents += 1
        self.tokens += len(tokens)
        stats = self.source(source)
        stats["copies" if copy else "kept"] += 1
        stats["documents"] += 1
        stats["tokens"] += len(tokens)
        self.domains[domain] = self.domains.get(domain, 0) + len(tokens)


# ---------------------------------------------------------------- configuration


def _check(cfg: dict) -> None:
    if not isinstance(cfg["seq_len"], int) or cfg["seq_len"] < 2:
        raise UserError(f"seq_len must be an integer >= 2, got {cfg['seq_len']!r}")
    if not cfg["sources"]:
        raise UserError("no sources: add one, e.g. `+sources.web={type:jsonl,path:/data/web}` or use prep=quickstart")
    if cfg["workers"] < 0:
        raise UserError(f"workers must be >= 0, got {cfg['workers']}")
    if cfg["upsample"]["factor"] < 1:
        raise UserError(f"upsample.factor must be >= 1, got {cfg['upsample']['factor']}")
    if cfg["max_epochs"] < 1:
        raise UserError(f"max_epochs must be >= 1, got {cfg['max_epochs']}")
    if cfg["shards"]["tokens"] <= 0:
        raise UserError(f"shards.tokens must be > 0, got {cfg['shards']['tokens']}")
    if cfg["max_tokens"] is not None and cfg["max_tokens"] <= 0:
        raise UserError(f"max_tokens must be > 0 or null (all of the data), got {cfg['max_tokens']}")
    rng = cfg["shards"]["range"]
    if rng is not None and (len(rng) != 2 or not 0 <= rng[0] < rng[1]):
        raise UserError(f"shards.range must be [first, last) with 0 <= first < last, got {rng}")


def _by_domain(specs: dict[str, dict]) -> dict[str, dict[str, dict]]:
    grouped: dict[str, dict[str, dict]] = {}
    for name, spec in specs.items():
        grouped.setdefault(spec["domain"], {})[name] = spec
    return grouped


def _first_texts(specs: dict[str, dict], chars: int, doc_chars: int) -> Iterator[str]:
    """Up to `chars` characters from the first documents of these sources (each cut at `doc_chars`)."""
    used = 0
    for name, spec in specs.items():
        for record in sources.read(name, spec):
            if used >= chars:
                return
            if isinstance(record, Doc):
                piece = record.text[: min(doc_chars, chars - used)]
                used += len(piece)
                yield piece


def _tokenizer(cfg: dict, by_domain: dict, weights: dict) -> tokenizer.TokenizerInfo:
    tcfg = cfg["tokenizer"]
    if tcfg["path"] is not None:
        return tokenizer.load(tcfg["path"], tcfg["eos_token"], tcfg["add_bos"])
    train = tcfg["train"]
    texts = []
    for domain, specs in by_domain.items():  # each domain by its share of the mixture
        share = weights.get(domain, 1.0 / len(by_domain))
        texts.extend(_first_texts(specs, int(train["sample_chars"] * share), train["sample_doc_chars"]))
    log.info("training the built-in BPE (vocab %d) on %d characters", train["vocab_size"], sum(map(len, texts)))
    path = tokenizer.train_builtin(texts, train["vocab_size"], train["cache_dir"])
    info = tokenizer.load(path, tcfg["eos_token"], tcfg["add_bos"])
    return tokenizer.TokenizerInfo(**{**info.manifest(), "name": BUILTIN_NAME.format(vocab=train["vocab_size"])})


def _chars_per_token(by_domain: dict, encoder: tokenizer.Encoder, cfg: dict) -> dict[str, float]:
    ratios = {}
    for domain, specs in by_domain.items():
        texts = list(_first_texts(specs, cfg["tokenizer"]["estimate_chars"], cfg["tokenizer"]["train"]["sample_doc_chars"]))
        tokens = sum(len(ids) - 1 - len(encoder.prefix) for ids in encoder.encode_batch(texts)) if texts else 0
        ratios[domain] = round(sum(map(len, texts)) / tokens, 4) if tokens else 1.0
    return ratios


def _plan(cfg: dict, specs: dict, weights: dict, info: tokenizer.TokenizerInfo, ratios: dict) -> dict:
    """Everything the shards' bytes depend on; a resumed or split prep must match it."""
    keys = ("seq_len", "seed", "max_tokens", "max_epochs", "upsample", "filters", "dedup")
    body = {k: cfg[k] for k in keys}
    tok = info.manifest()
    del tok["path"], tok["name"]  # same files, other location: same data
    body.update(
        format=fmt.FORMAT,
        sources=specs,
        mixture=weights,
        shard_tokens=cfg["shards"]["tokens"],
        tokenizer=tok,
        chars_per_token=ratios,
    )
    digest = hashlib.sha256(json.dumps(body, sort_keys=True, default=str).encode()).hexdigest()
    return {"fingerprint": digest, "plan": body}


def _remove_prep_files(out: Path) -> None:
    """Delete what a prep writes into `out`, and nothing else."""
    for path in out.iterdir():
        if path.name.startswith(("shard-", fmt.TAIL + ".")) or path.name in (fmt.MANIFEST, fmt.PLAN):
            path.unlink()
    shutil.rmtree(out / fmt.TOKENIZER_DIR, ignore_errors=True)


def _claim_output(out: Path, plan: dict, overwrite: bool) -> None:
    """Create `out`, or check that it holds this same prep (then resume), or replace it."""
    plan_path = out / fmt.PLAN
    if plan_path.exists():
        old = json.loads(plan_path.read_text())
        if old.get("fingerprint") == plan["fingerprint"]:
            return
        if not overwrite:
            changed = sorted(k for k in plan["plan"] if old.get("plan", {}).get(k) != plan["plan"][k])
            raise UserError(
                f"output '{out}' holds a prep with other settings ({', '.join(changed) or 'format'} differ); "
                "use another output directory, or overwrite=true to replace it"
            )
        _remove_prep_files(out)
    elif out.exists() and any(out.iterdir()):
        raise UserError(f"output '{out}' exists and is not an l2a-prep output; choose a new or empty directory")
    out.mkdir(parents=True, exist_ok=True)
    fmt.write_json(plan_path, plan)


def _source_chars(spec: dict, name: str) -> float | None:
    """About how many characters a source holds (for the progress bar's ETA); None: unknown."""
    kind = spec["type"]
    if kind in ("jsonl", "parquet", "text"):
        # compressed inputs hold a few times their size in text
        scale = {"jsonl": 1.0, "parquet": 3.0, "text": 1.0}[kind]
        paths = sources.expand_paths(spec, name, (".jsonl", ".jsonl.gz", ".json", ".json.gz", ".parquet", *spec.get("suffixes", ())))
        return sum(p.stat().st_size * (4.0 if p.name.endswith(".gz") else scale) for p in paths if p.exists())
    if kind == "stdlib":
        from . import stdlib_corpus

        return stdlib_corpus.source_chars(spec)
    if kind == "retrieval":
        return spec["num_docs"] * sum(spec["length"]) / 2
    return None


def _expected_tokens(cfg: dict, by_domain: dict, weights: dict, ratios: dict) -> float | None:
    if cfg["max_tokens"] is not None:
        return cfg["max_tokens"]
    per_domain = {}
    for domain, specs in by_domain.items():
        chars = [_source_chars(spec, name) for name, spec in specs.items()]
        if None in chars:
            return None
        per_domain[domain] = sum(chars) / ratios[domain] * cfg["max_epochs"]
    if weights:  # the mixture ends when its first domain runs out
        return min(per_domain[d] / w for d, w in weights.items())
    return sum(per_domain.values())


# ---------------------------------------------------------------- the shard loop


def _shard_stream(events: Iterator[mixture.Event], shard_tokens: float) -> Iterator[tuple[int, int, mixture.Event]]:
    """(shard, document index or -1 for a skip, event); a shard closes at its first document over budget."""
    shard, filled, doc = 0, 0.0, 0
    for event in events:
        if isinstance(event.record, Skip):
            yield shard, -1, event
            continue
        if filled >= shard_tokens:
            shard, filled = shard + 1, 0.0
        yield shard, doc, event
        doc += 1
        filled += event.est_tokens


def _remove_partial(out: Path, name: str) -> None:
    """Files of an unfinished earlier attempt at this shard (a killed run's temporaries)."""
    for path in out.glob(f"{name}.*.tmp*"):
        path.unlink(missing_ok=True)


def _finish_shard(out: Path, job: ShardJob, last: bool, fingerprint: str) -> None:
    rows = job.writer.finish()
    marker = {
        "version": MARKER_VERSION,
        "shard": fmt.shard_name(job.index),
        "index": job.index,
        "last": last,
        "rows": rows,
        "documents": job.documents,
        "tokens": job.tokens,
        "first_doc": job.first_doc,
        "sources": job.sources,
        "domains": job.domains,
        "skipped": job.skips.as_dict(),
        "copies_skipped": job.copy_skips.as_dict(),
        "ended": job.ended,
        "left_unread": job.left_unread,
        "fingerprint": fingerprint,
    }
    fmt.write_json(fmt.marker_path(out, fmt.shard_name(job.index)), marker)


def _read_marker(path: Path) -> dict | None:
    """A shard's marker, or None if there is none or it is of another version (redo the shard)."""
    if not path.exists():
        return None
    marker = json.loads(path.read_text())
    return marker if marker.get("version") == MARKER_VERSION else None


def _record_end(job: ShardJob, events: mixture.Mixture, count_unread: bool) -> None:
    """The last shard's marker says why the stream stopped and what it never reached, so the
    manifest accounts for input left unread too (a filled mixture share, `max_tokens`).
    Counting means reading the rest of the sources; count_unread=false spares a huge corpus that."""
    job.ended = events.ended
    if not count_unread:
        return
    if events.ended != mixture.READ_TO_THE_END:
        log.info("the stream ended (%s); counting the records left unread (count_unread=false skips this)", events.ended)
    job.left_unread = events.unread()


def _pack(out: Path, cfg: dict, plan: dict, info, encoder, tokenizer_json: str, events, progress) -> None:
    seq_len, filters = cfg["seq_len"], cfg["filters"]
    first, last = cfg["shards"]["range"] or (0, sys.maxsize)
    console = SkipCounter(cfg["strict"], announce=True)
    jobs: dict[int, ShardJob] = {}
    pipe = OrderedPipeline(encoder, tokenizer_json, cfg["workers"])
    batch: list[str] = []
    metas: list[tuple] = []
    chars = 0

    def open_job(index: int) -> ShardJob:
        name = fmt.shard_name(index)
        if not (first <= index < last) or _read_marker(fmt.marker_path(out, name)) is not None:
            return ShardJob(index, None)
        _remove_partial(out, name)
        return ShardJob(index, ShardWriter(out, name, seq_len))

    def handle(kind, result, meta) -> None:
        if kind == "mark":  # every document of shard `meta[0]` is packed
            index, is_last = meta
            if jobs[index].writer is not None:
                _finish_shard(out, jobs[index], is_last, plan["fingerprint"])
            del jobs[index]
            return
        for ids, (index, doc, source, domain, ref, copy) in zip(result, meta):
            job = jobs[index]
            if job.first_doc < 0:
                job.first_doc = doc
            n = len(ids)
            if n < filters["min_doc_tokens"] or filters["max_doc_tokens"] is not None and n > filters["max_doc_tokens"]:
                reason = "too_short" if n < filters["min_doc_tokens"] else "too_long"
                skip = Skip(reason, ref, f"{n} tokens")
                if copy:  # not an input record: the input document was counted on its first pass
                    job.copy_skips.add(skip, source)
                else:
                    job.skips.add(skip, source)
                    console.add(skip, source)
                continue
            job.add(ids, doc, source, domain, copy)
            progress.update(n)

    def flush() -> None:
        nonlocal batch, metas, chars
        if batch:
            for ready in pipe.submit(batch, metas):
                handle(*ready)
        batch, metas, chars = [], [], 0

    current = -1
    try:
        for index, doc, event in _shard_stream(events, cfg["shards"]["tokens"]):
            if index != current:
                if current >= 0:  # a document of the next shard: the current one is complete
                    flush()
                    pipe.mark((current, False))
                if index >= last:
                    break  # the selected range ends here
                current = index
                jobs[index] = open_job(index)
            job = jobs[index]
            if job.writer is None:
                continue  # replayed only to find where later shards start
            if doc < 0:
                job.source(event.source)["read"] += event.record.count
                job.skips.add(event.record, event.source)
                console.add(event.record, event.source)
                continue
            if not event.copy:
                job.source(event.source)["read"] += 1
            batch.append(event.record.text)
            metas.append((index, doc, event.source, event.domain, event.record.ref, event.copy))
            chars += len(event.record.text)
            if chars >= cfg["batch_chars"]:
                flush()
        else:
            if current < 0:  # no record at all: an empty shard 0 still ends the data set
                current = 0
                jobs[0] = open_job(0)
            if jobs[current].writer is not None:  # this run packs the last shard
                _record_end(jobs[current], events, cfg["count_unread"])
            flush()
            pipe.mark((current, True))  # the stream ended: this is the data set's last shard
        flush()
        for ready in pipe.drain():
            handle(*ready)
    except BaseException:
        for job in jobs.values():
            if job.writer is not None:
                job.writer.abort()
        raise
    finally:
        pipe.close()


# ---------------------------------------------------------------- finishing


def _markers(out: Path) -> list[dict]:
    """The shards' markers in order; one of another version counts as missing (redone)."""
    found = []
    for path in sorted(out.glob("shard-*.done.json")):
        marker = _read_marker(path)
        if marker is not None:
            found.append(marker)
    return found


def _source_stats(markers: list[dict], specs: dict, skips: SkipCounter, copy_skips: SkipCounter) -> dict[str, dict]:
    """Per source, every input record accounted for: `read` (= `kept` + `skipped`) and
    `left_unread` (null when count_unread=false), then the copies apart, and what was packed."""
    counts: dict[str, dict] = {}
    for m in markers:
        for name, st in m["sources"].items():
            agg = counts.setdefault(name, dict.fromkeys(SOURCE_COUNTS, 0))
            for key in SOURCE_COUNTS:
                agg[key] += st[key]
    unread = markers[-1]["left_unread"]
    skipped, copies_skipped = skips.as_dict()["by_source"], copy_skips.as_dict()["by_source"]
    stats = {}
    for name, spec in specs.items():
        c = counts.get(name, dict.fromkeys(SOURCE_COUNTS, 0))
        stats[name] = {
            "type": spec["type"],
            "domain": spec["domain"],
            "read": c["read"],
            "kept": c["kept"],
            "skipped": skipped.get(name, {}),
            "left_unread": None if unread is None else unread.get(name, 0),
            "copies": c["copies"],                    # upsampling passes and epochs after the first
            "copies_skipped": copies_skipped.get(name, {}),
            "documents": c["documents"],              # packed: kept + copies
            "tokens": c["tokens"],
        }
    return stats


def _what_to_check(name: str, st: dict, examples: dict) -> str:
    """The setting that most likely cost a source its documents, with an example record."""
    if st["skipped"]:
        reason = max(st["skipped"], key=st["skipped"].get)
        example = (examples.get(reason) or ["?"])[0]
        return f"{SETTING_TO_CHECK[reason].format(source=name)} ({st['skipped'][reason]} {reason}, e.g. {example})"
    where = f"sources.{name}.path" if st["type"] in PATH_TYPES else f"sources.{name}"
    return f"{where} (no records in it)"


def _nothing_packed(out: Path, stats: dict[str, dict], skipped: dict, examples: dict) -> str:
    """One line for a prep that kept no document, naming the settings to fix."""
    counts = ", ".join(f"{r}: {n}" for r, n in skipped.items()) or "none"
    empty = [name for name, st in stats.items() if not st["documents"]]
    fixes = "; ".join(_what_to_check(name, stats[name], examples) for name in empty)
    return (f"no documents left to pack from the sources (skipped {counts}); check {fixes}; "
            f"no data set was written to '{out}'")


def _warn_empty_sources(stats: dict[str, dict], examples: dict) -> None:
    """A source that was read and gave nothing (a wrong text_field, say) while others did."""
    for name, st in stats.items():
        if st["read"] and not st["documents"]:
            log.warning("source '%s' gave no documents: check %s", name, _what_to_check(name, st, examples))


def _domains(specs: dict, domain_tokens: dict, weights: dict, plan: dict) -> dict:
    total_tokens = sum(domain_tokens.values())
    domains = {}
    for domain in dict.fromkeys(s["domain"] for s in specs.values()):
        achieved = domain_tokens.get(domain, 0) / total_tokens if total_tokens else 0.0
        domains[domain] = {
            "requested": weights.get(domain),
            "achieved": round(achieved, 6),
            "tokens": domain_tokens.get(domain, 0),
            "chars_per_token": plan["plan"]["chars_per_token"][domain],
        }
    return domains


def _finalize(out: Path, cfg: dict, plan: dict, info: tokenizer.TokenizerInfo, weights: dict) -> dict | None:
    """Write the manifest once every shard is done; an empty data set is discarded instead
    (an error, never a complete output that a rerun would report as done)."""
    markers = _markers(out)
    if not markers or not markers[-1]["last"] or [m["index"] for m in markers] != list(range(len(markers))):
        return None
    stale = [m["shard"] for m in markers if m["fingerprint"] != plan["fingerprint"]]
    if stale:
        raise UserError(f"{out}: shards {', '.join(stale)} come from another prep plan; rerun with overwrite=true")
    skips, copy_skips = _quiet_counter(), _quiet_counter()
    domain_tokens: dict[str, int] = {}
    for m in markers:
        skips.merge(m["skipped"])
        copy_skips.merge(m["copies_skipped"])
        for domain, n in m["domains"].items():
            domain_tokens[domain] = domain_tokens.get(domain, 0) + n
    specs = plan["plan"]["sources"]
    stats = _source_stats(markers, specs, skips, copy_skips)
    examples = skips.as_dict()["examples"]
    if not sum(m["documents"] for m in markers):
        _remove_prep_files(out)  # a corrected rerun then starts afresh, without overwrite=true
        raise UserError(_nothing_packed(out, stats, skips.totals(), examples))
    _warn_empty_sources(stats, examples)
    names = [m["shard"] for m in markers]
    _remove_partial(out, fmt.TAIL)
    _remove_partial(out, "manifest")
    tail_rows, pad_tokens = pack_tail(out, names, cfg["seq_len"], info.pad_token_id)
    shard_list = [{"name": m["shard"], "rows": m["rows"]} for m in markers] + [{"name": fmt.TAIL, "rows": tail_rows}]
    num_rows = sum(s["rows"] for s in shard_list)
    tok = info.manifest()
    tok.update(path=fmt.TOKENIZER_DIR, source_path=info.path)
    unread = [st["left_unread"] for st in stats.values()]
    manifest = {
        "format": fmt.FORMAT,
        "seq_len": cfg["seq_len"],
        "num_rows": num_rows,
        "dtype": "int32",
        "tokens": sum(domain_tokens.values()),
        "pad_tokens": pad_tokens,
        "documents": sum(m["documents"] for m in markers),
        "tokenizer": tok,
        "shards": shard_list,
        "read": sum(st["read"] for st in stats.values()),
        "kept": sum(st["kept"] for st in stats.values()),
        "left_unread": None if None in unread else sum(unread),
        "ended": markers[-1]["ended"],
        "copies": sum(st["copies"] for st in stats.values()),
        "sources": stats,
        "domains": _domains(specs, domain_tokens, weights, plan),
        "skipped": skips.totals(),
        "skipped_examples": examples,
        "copies_skipped": copy_skips.totals(),
        "fingerprint": plan["fingerprint"],
        "config": cfg,
    }
    fmt.write_json(out / fmt.MANIFEST, manifest)
    return manifest


# ---------------------------------------------------------------- entry


def _complete_already(out: Path) -> dict:
    """The manifest of a finished prep with these settings. One without documents was written
    by an older l2a-prep, which marked failed preps complete: discard it and fail again."""
    manifest = json.loads((out / fmt.MANIFEST).read_text())
    if not manifest["documents"]:
        _remove_prep_files(out)
        stats = {name: {"read": 0, "documents": 0, **st} for name, st in manifest["sources"].items()}
        raise UserError(_nothing_packed(out, stats, manifest["skipped"], manifest["skipped_examples"]))
    log.info("%s is complete already (same settings); nothing to do", out)
    return manifest


def prepare(cfg: dict) -> dict | None:
    """Run a prep described by a resolved config dict; returns the manifest (None if incomplete)."""
    _check(cfg)
    out = Path(cfg["output"])
    if out.exists() and not out.is_dir():  # before any work (tokenizer training takes a while)
        raise UserError(f"output '{out}' exists and is a file, not a directory; choose a new or empty directory")
    specs = {name: sources.resolve(name, dict(spec), cfg["source_defaults"]) for name, spec in cfg["sources"].items()}
    by_domain = _by_domain(specs)
    weights = mixture.parse_mixture(cfg["mixture"], list(by_domain))
    cache = Path(cfg["tokenizer"]["train"]["cache_dir"]).resolve()
    if cfg["tokenizer"]["path"] is None and cache.is_relative_to(out.resolve()):
        # the trained tokenizer would land in the output first and make it look foreign
        raise UserError(f"tokenizer.train.cache_dir='{cfg['tokenizer']['train']['cache_dir']}' lies inside "
                        f"output '{out}'; choose another output directory or cache_dir")
    info = _tokenizer(cfg, by_domain, weights)
    tokenizer_json = tokenizer.backend_json(info.path)
    encoder = tokenizer.Encoder(tokenizer_json, info.bos_token_id, info.eos_token_id, info.add_bos, threads=True)
    ratios = _chars_per_token(by_domain, encoder, cfg)
    plan = _plan(cfg, specs, weights, info, ratios)
    _claim_output(out, plan, cfg["overwrite"])
    if (out / fmt.MANIFEST).exists():
        return _complete_already(out)
    if not (out / fmt.TOKENIZER_DIR / "tokenizer.json").exists():
        tokenizer.copy_files(info.path, out / fmt.TOKENIZER_DIR)
    events = mixture.mix(by_domain, weights, ratios, cfg)
    from tqdm import tqdm

    expected = _expected_tokens(cfg, by_domain, weights, ratios) if cfg["progress"] else None
    bar = tqdm(
        total=None if expected is None else int(expected),
        unit="tok",
        unit_scale=True,
        desc=f"l2a-prep {out.name}",
        disable=not cfg["progress"],
        dynamic_ncols=True,
    )
    try:
        _pack(out, cfg, plan, info, encoder, tokenizer_json, events, bar)
        bar.total = bar.n  # the estimate was only an estimate: end at 100%
    finally:
        bar.close()
    manifest = _finalize(out, cfg, plan, info, weights)
    if manifest is None:
        log.info("shards %s done; the manifest is written once every shard of %s is", cfg["shards"]["range"], out)
    return manifest
