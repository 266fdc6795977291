"""The prep: sources -> mixed document stream -> tokenized -> packed shards -> manifest.

Shards are cut from the document stream before tokenization (a shard closes once its
documents add up to about `shards.tokens` estimated tokens), so where a shard starts never
depends on tokenization, workers or earlier runs. That is what makes the prep:
- resumable: a rerun replays the stream cheaply, skips shards whose `.done.json` marker
  exists and redoes the rest (no document lost or duplicated);
- splittable: `shards.range=[a,b]` packs shards a..b-1 only, on any machine;
- deterministic: identical bytes whatever `workers` is.
The manifest is written once every shard is done, by whichever run completes the set.
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

from l2a_configs import UserError

from . import format as fmt
from . import mixture, sources, tokenizer
from .packing import ShardWriter, pack_tail
from .parallel import OrderedPipeline
from .records import Doc, Skip, SkipCounter

log = logging.getLogger("l2a_data_prep")
BUILTIN_NAME = "l2a-builtin-bpe-{vocab}"


@dataclass
class ShardJob:
    """One shard being packed, with its statistics (written into its marker)."""

    index: int
    writer: ShardWriter | None          # None: the shard is done already or outside the range
    skips: SkipCounter
    first_doc: int = -1
    documents: int = 0
    tokens: int = 0
    sources: dict = field(default_factory=dict)
    domains: dict = field(default_factory=dict)

    def add(self, tokens: np.ndarray, doc: int, source: str, domain: str) -> None:
        self.writer.add(tokens, doc)
        self.documents += 1
        self.tokens += len(tokens)
        stats = self.sources.setdefault(source, {"documents": 0, "tokens": 0})
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
        for path in out.iterdir():  # only what a prep writes
            if path.name.startswith(("shard-", fmt.TAIL + ".")) or path.name in (fmt.MANIFEST, fmt.PLAN):
                path.unlink()
        shutil.rmtree(out / fmt.TOKENIZER_DIR, ignore_errors=True)
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

        base = stdlib_corpus.stdlib_root(spec["root"])
        units = stdlib_corpus.units(base, list(spec["exclude"]))
        return sum(f.stat().st_size for u in units for f in stdlib_corpus.package_files(u, list(spec["exclude"])))
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
        "fingerprint": fingerprint,
    }
    fmt.write_json(fmt.marker_path(out, fmt.shard_name(job.index)), marker)


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
        if not (first <= index < last) or fmt.marker_path(out, name).exists():
            return ShardJob(index, None, SkipCounter(strict=False, announce=False))
        _remove_partial(out, name)
        writer = ShardWriter(out, name, seq_len)
        return ShardJob(index, writer, SkipCounter(strict=False, announce=False))

    def handle(kind, result, meta) -> None:
        if kind == "mark":  # every document of shard `meta[0]` is packed
            index, is_last = meta
            if jobs[index].writer is not None:
                _finish_shard(out, jobs[index], is_last, plan["fingerprint"])
            del jobs[index]
            return
        for ids, (index, doc, source, domain, ref) in zip(result, meta):
            job = jobs[index]
            if job.first_doc < 0:
                job.first_doc = doc
            n = len(ids)
            if n < filters["min_doc_tokens"] or filters["max_doc_tokens"] is not None and n > filters["max_doc_tokens"]:
                reason = "too_short" if n < filters["min_doc_tokens"] else "too_long"
                skip = Skip(reason, ref, f"{n} tokens")
                job.skips.add(skip, source)
                console.add(skip, source)
                continue
            job.add(ids, doc, source, domain)
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
                job.skips.add(event.record, event.source)
                console.add(event.record, event.source)
                continue
            batch.append(event.record.text)
            metas.append((index, doc, event.source, event.domain, event.record.ref))
            chars += len(event.record.text)
            if chars >= cfg["batch_chars"]:
                flush()
        else:
            if current < 0:  # no record at all: an empty shard 0 still ends the data set
                current = 0
                jobs[0] = open_job(0)
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
    found = []
    for path in sorted(out.glob("shard-*.done.json")):
        found.append(json.loads(path.read_text()))
    return found


def _finalize(out: Path, cfg: dict, plan: dict, info: tokenizer.TokenizerInfo, weights: dict) -> dict | None:
    markers = _markers(out)
    if not markers or not markers[-1]["last"] or [m["index"] for m in markers] != list(range(len(markers))):
        return None
    stale = [m["shard"] for m in markers if m["fingerprint"] != plan["fingerprint"]]
    if stale:
        raise UserError(f"{out}: shards {', '.join(stale)} come from another prep plan; rerun with overwrite=true")
    names = [m["shard"] for m in markers]
    _remove_partial(out, fmt.TAIL)
    _remove_partial(out, "manifest")
    tail_rows, pad_tokens = pack_tail(out, names, cfg["seq_len"], info.pad_token_id)
    skips = SkipCounter(strict=False, announce=False)
    sources_stats: dict[str, dict] = {}
    domain_tokens: dict[str, int] = {}
    for m in markers:
        skips.merge(m["skipped"])
        for name, st in m["sources"].items():
            agg = sources_stats.setdefault(name, {"documents": 0, "tokens": 0})
            agg["documents"] += st["documents"]
            agg["tokens"] += st["tokens"]
        for domain, n in m["domains"].items():
            domain_tokens[domain] = domain_tokens.get(domain, 0) + n
    specs = plan["plan"]["sources"]
    for name, spec in specs.items():
        stats = sources_stats.setdefault(name, {"documents": 0, "tokens": 0})
        stats.update(type=spec["type"], domain=spec["domain"], skipped=skips.as_dict()["by_source"].get(name, {}))
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
    shard_list = [{"name": m["shard"], "rows": m["rows"]} for m in markers] + [{"name": fmt.TAIL, "rows": tail_rows}]
    num_rows = sum(s["rows"] for s in shard_list)
    tok = info.manifest()
    tok.update(path=fmt.TOKENIZER_DIR, source_path=info.path)
    manifest = {
        "format": fmt.FORMAT,
        "seq_len": cfg["seq_len"],
        "num_rows": num_rows,
        "dtype": "int32",
        "tokens": total_tokens,
        "pad_tokens": pad_tokens,
        "documents": sum(m["documents"] for m in markers),
        "tokenizer": tok,
        "shards": shard_list,
        "sources": sources_stats,
        "domains": domains,
        "skipped": skips.totals(),
        "skipped_examples": skips.as_dict()["examples"],
        "fingerprint": plan["fingerprint"],
        "config": cfg,
    }
    fmt.write_json(out / fmt.MANIFEST, manifest)
    return manifest


# ---------------------------------------------------------------- entry


def prepare(cfg: dict) -> dict | None:
    """Run a prep described by a resolved config dict; returns the manifest (None if incomplete)."""
    _check(cfg)
    out = Path(cfg["output"])
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
        log.info("%s is complete already (same settings); nothing to do", out)
        return json.loads((out / fmt.MANIFEST).read_text())
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
    if manifest is not None and manifest["documents"] == 0:
        skipped = ", ".join(f"{r}: {n}" for r, n in manifest["skipped"].items()) or "none"
        raise UserError(f"no documents left to pack from the sources (skipped {skipped}); check the inputs and filters")
    if manifest is None:
        log.info("shards %s done; the manifest is written once every shard of %s is", cfg["shards"]["range"], out)
    return manifest
