"""l2a-prep end to end on tiny generated corpora: exact round trip, determinism, resume,
shard ranges, mixing, filters, dedup, upsampling, every file source, the BOS convention."""

from __future__ import annotations

import gzip
import json
import random

import numpy as np
import pytest
from omegaconf import OmegaConf

from l2a_common import UserError, compose
from l2a_data_prep import format as fmt
from l2a_data_prep import pipeline, tokenizer
from l2a_data_prep.pipeline import prepare

WORDS = "alpha beta gamma delta epsilon zeta eta theta iota kappa lambda mu nu xi omicron pi rho sigma".split()


def sentence(rng: random.Random, n: int) -> str:
    return " ".join(rng.choice(WORDS) for _ in range(n))


@pytest.fixture(scope="module")
def tok_dir(tmp_path_factory):
    rng = random.Random(0)
    texts = [sentence(rng, 50) + "\n" for _ in range(200)]
    return tokenizer.train_builtin(texts, 320, str(tmp_path_factory.mktemp("tok")))


def docs_of(seed: int, n: int, lo: int = 1, hi: int = 120) -> list[str]:
    rng = random.Random(seed)
    return [f"doc{seed}-{i} " + sentence(rng, rng.randint(lo, hi)) for i in range(n)]


def write_jsonl(path, texts, gz: bool = False):
    lines = "".join(json.dumps({"text": t, "id": i}) + "\n" for i, t in enumerate(texts)).encode()
    path.write_bytes(gzip.compress(lines, mtime=0) if gz else lines)
    return str(path)


def make_config(out, tok, sources, **changes) -> dict:
    cfg = OmegaConf.to_container(compose("prep", [f"output={out}"]), resolve=True)
    cfg.update(sources=sources, mixture=[], max_tokens=None, progress=False, seq_len=64)
    cfg["tokenizer"]["path"] = tok
    cfg["tokenizer"]["estimate_chars"] = 20000
    cfg["shards"]["tokens"] = 600
    for key, value in changes.items():
        node = cfg
        *parents, leaf = key.split(".")
        for part in parents:
            node = node[part]
        node[leaf] = value
    return cfg


def expected_ids(tok, texts):
    info = tokenizer.load(tok, None, None)
    enc = tokenizer.Encoder(tokenizer.backend_json(tok), info.bos_token_id, info.eos_token_id, info.add_bos, threads=True)
    return [ids.tolist() for ids in enc.encode_batch(texts)]


def unpack(out) -> tuple[dict[int, list[int]], list[int], list[tuple[str, list[int]]]]:
    """Every document's tokens (by stream index) reassembled from the shards, the padding, per-shard doc order."""
    manifest = json.loads((out / fmt.MANIFEST).read_text())
    L = manifest["seq_len"]
    pieces: dict[int, list[tuple[int, list[int]]]] = {}
    padding: list[int] = []
    order = []
    for shard in manifest["shards"]:
        name, rows = shard["name"], shard["rows"]
        tokens = fmt.open_tokens(out, name, rows, L)
        index = fmt.load_index(out, name)
        ptr = index["row_ptr"]
        assert len(ptr) == rows + 1
        seen = []
        for r in range(rows):
            starts = index["doc_starts"][ptr[r] : ptr[r + 1]].tolist()
            assert starts[0] == 0 and starts == sorted(set(starts))
            ends = starts[1:] + [L]
            for k, (a, b) in enumerate(zip(starts, ends)):
                doc, off = int(index["seg_doc"][ptr[r] + k]), int(index["seg_offset"][ptr[r] + k])
                seg = tokens[r, a:b].tolist()
                if doc < 0:
                    padding.extend(seg)
                else:
                    pieces.setdefault(doc, []).append((off, seg))
                    seen.append(doc)
        order.append((name, seen))
    docs = {}
    for doc, parts in pieces.items():
        parts.sort()
        joined, at = [], 0
        for off, seg in parts:
            assert off == at, f"document {doc}: gap or overlap at {off} (expected {at})"
            joined.extend(seg)
            at += len(seg)
        docs[doc] = joined
    return docs, padding, order


def shard_bytes(out) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(out.iterdir()) if p.name.startswith(("shard-", "tail."))}


def test_round_trip_exact_tokens_and_boundaries(tmp_path, tok_dir):
    texts = docs_of(1, 60, hi=200) + ["x " * 300]  # some documents span several rows
    src = write_jsonl(tmp_path / "a.jsonl", texts)
    out = tmp_path / "out"
    manifest = prepare(make_config(out, tok_dir, {"a": {"type": "jsonl", "path": src}}))
    docs, padding, order = unpack(out)
    want = expected_ids(tok_dir, texts)
    assert sorted(docs) == list(range(len(texts)))
    assert [docs[i] for i in range(len(texts))] == want
    info = tokenizer.load(tok_dir, None, None)
    assert all(d[-1] == info.eos_token_id for d in docs.values())
    assert padding == [info.pad_token_id] * manifest["pad_tokens"]
    assert manifest["tokens"] == sum(map(len, want)) and manifest["documents"] == len(texts)
    assert manifest["num_rows"] * manifest["seq_len"] == manifest["tokens"] + manifest["pad_tokens"]
    assert manifest["pad_tokens"] < manifest["seq_len"]
    assert len(manifest["shards"]) > 3  # the test covers several shards and the tail
    for name, seen in order[:-1]:  # documents keep stream order inside each shard
        assert seen == sorted(seen), name


def test_output_identical_across_runs_and_worker_counts(tmp_path, tok_dir):
    src = write_jsonl(tmp_path / "a.jsonl.gz", docs_of(2, 80), gz=True)
    sources = {"a": {"type": "jsonl", "path": src}}
    outs = []
    for run, workers in enumerate([0, 0, 2]):
        out = tmp_path / f"out{run}"
        prepare(make_config(out, tok_dir, sources, workers=workers, batch_chars=500))
        outs.append(out)
    first = shard_bytes(outs[0])
    assert len(first) > 8
    for out in outs[1:]:
        assert shard_bytes(out) == first
    manifests = [json.loads((o / fmt.MANIFEST).read_text()) for o in outs]
    for m in manifests:
        m.pop("config")
        m["tokenizer"].pop("source_path")
    assert manifests[0] == manifests[1] == manifests[2]


def test_resume_after_kill_redoes_only_missing_shards(tmp_path, tok_dir, monkeypatch):
    src = write_jsonl(tmp_path / "a.jsonl", docs_of(3, 80))
    sources = {"a": {"type": "jsonl", "path": src}}
    clean = tmp_path / "clean"
    prepare(make_config(clean, tok_dir, sources))

    out = tmp_path / "killed"
    real_finish = pipeline._finish_shard
    calls = []

    def dying_finish(root, job, last, fingerprint):
        calls.append(job.index)
        if len(calls) == 3:
            raise KeyboardInterrupt  # killed while writing the third shard
        real_finish(root, job, last, fingerprint)

    monkeypatch.setattr(pipeline, "_finish_shard", dying_finish)
    with pytest.raises(KeyboardInterrupt):
        prepare(make_config(out, tok_dir, sources))
    assert not (out / fmt.MANIFEST).exists()
    done_before = sorted(p.name for p in out.glob("*.done.json"))
    assert done_before == ["shard-00000.done.json", "shard-00001.done.json"]
    assert not list(out.glob("*.tmp*"))  # an interrupted shard leaves no temporary file behind
    (out / "shard-00002.tokens.bin.tmp999").write_bytes(b"garbage from a SIGKILL")
    mtimes = {p: (out / p).stat().st_mtime_ns for p in ("shard-00000.tokens.bin", "shard-00001.tokens.bin")}

    calls.clear()
    monkeypatch.setattr(pipeline, "_finish_shard", lambda *a: (calls.append(a[1].index), real_finish(*a)))
    prepare(make_config(out, tok_dir, sources))
    assert calls and calls[0] == 2  # shards 0 and 1 were not redone
    assert all((out / p).stat().st_mtime_ns == t for p, t in mtimes.items())
    assert not list(out.glob("*.tmp*"))  # the killed attempt's temporaries are cleaned up
    assert shard_bytes(out) == shard_bytes(clean)
    docs, _, _ = unpack(out)
    assert sorted(docs) == list(range(80))


def test_shard_ranges_on_several_machines_make_the_same_data(tmp_path, tok_dir):
    src = write_jsonl(tmp_path / "a.jsonl", docs_of(4, 80))
    sources = {"a": {"type": "jsonl", "path": src}}
    whole = tmp_path / "whole"
    prepare(make_config(whole, tok_dir, sources))
    split = tmp_path / "split"
    assert prepare(make_config(split, tok_dir, sources, **{"shards.range": [2, 4]})) is None
    assert sorted(p.name for p in split.glob("*.done.json")) == ["shard-00002.done.json", "shard-00003.done.json"]
    assert prepare(make_config(split, tok_dir, sources, **{"shards.range": [0, 2]})) is None
    manifest = prepare(make_config(split, tok_dir, sources, **{"shards.range": [4, 1000]}))
    assert manifest is not None  # the run that completes the set writes the manifest
    assert shard_bytes(split) == shard_bytes(whole)


def test_rerun_with_other_settings_refuses_unless_overwrite(tmp_path, tok_dir):
    src = write_jsonl(tmp_path / "a.jsonl", docs_of(5, 20))
    sources = {"a": {"type": "jsonl", "path": src}}
    out = tmp_path / "out"
    prepare(make_config(out, tok_dir, sources))
    with pytest.raises(UserError, match="seq_len differ.*overwrite=true"):
        prepare(make_config(out, tok_dir, sources, seq_len=32))
    manifest = prepare(make_config(out, tok_dir, sources, seq_len=32, overwrite=True))
    assert manifest["seq_len"] == 32
    (tmp_path / "foreign").mkdir()
    (tmp_path / "foreign" / "notes.txt").write_text("mine")
    with pytest.raises(UserError, match="not an l2a-prep output"):
        prepare(make_config(tmp_path / "foreign", tok_dir, sources))


def test_mixture_proportions_within_tolerance(tmp_path, tok_dir):
    short = write_jsonl(tmp_path / "short.jsonl", docs_of(6, 400, 5, 30))
    long = write_jsonl(tmp_path / "long.jsonl", docs_of(7, 200, 80, 300))
    sources = {"s": {"type": "jsonl", "path": short, "domain": "chat"}, "l": {"type": "jsonl", "path": long}}
    out = tmp_path / "out"
    manifest = prepare(make_config(out, tok_dir, sources, mixture=["chat@0.3", "l@0.7"], max_tokens=20000))
    domains = manifest["domains"]
    assert domains["chat"]["requested"] == pytest.approx(0.3) and domains["l"]["requested"] == pytest.approx(0.7)
    assert domains["chat"]["achieved"] == pytest.approx(0.3, abs=0.03)
    assert domains["l"]["achieved"] == pytest.approx(0.7, abs=0.03)
    assert manifest["tokens"] == pytest.approx(20000, rel=0.1)
    assert manifest["sources"]["s"]["domain"] == "chat"
    with pytest.raises(UserError, match="domain@proportion"):
        prepare(make_config(tmp_path / "bad", tok_dir, sources, mixture=["chat:0.3", "l@0.7"]))
    with pytest.raises(UserError, match="no mixture entry"):
        prepare(make_config(tmp_path / "bad", tok_dir, sources, mixture=["chat@1"]))


def test_mixture_ends_when_a_domain_runs_out(tmp_path, tok_dir):
    few = write_jsonl(tmp_path / "few.jsonl", docs_of(8, 10, 50, 60))
    many = write_jsonl(tmp_path / "many.jsonl", docs_of(9, 500, 50, 60))
    sources = {"few": {"type": "jsonl", "path": few}, "many": {"type": "jsonl", "path": many}}
    manifest = prepare(make_config(tmp_path / "out", tok_dir, sources, mixture=["few@0.5", "many@0.5"]))
    assert manifest["sources"]["few"]["documents"] == 10
    assert manifest["sources"]["many"]["documents"] <= 12
    # with epochs allowed, the small domain is repeated to keep its share
    manifest = prepare(
        make_config(tmp_path / "out2", tok_dir, sources, mixture=["few@0.5", "many@0.5"], max_epochs=3, max_tokens=4000)
    )
    assert manifest["sources"]["few"]["documents"] > 10
    assert manifest["domains"]["few"]["achieved"] == pytest.approx(0.5, abs=0.05)


def test_length_filters_dedup_and_upsampling(tmp_path, tok_dir):
    texts = docs_of(10, 30, 5, 40)
    long_doc = "long " + sentence(random.Random(1), 400)
    dupes = [texts[3], texts[7], texts[3]]
    src = write_jsonl(tmp_path / "a.jsonl", texts + dupes + [long_doc])
    sources = {"a": {"type": "jsonl", "path": src}}
    ids = expected_ids(tok_dir, texts + [long_doc])
    lengths = [len(i) for i in ids]

    manifest = prepare(make_config(tmp_path / "dedup", tok_dir, sources, dedup=True))
    assert manifest["skipped"] == {"duplicate": 3}
    assert manifest["documents"] == 31

    lo, hi = sorted(lengths)[5], sorted(lengths)[-3]
    manifest = prepare(
        make_config(tmp_path / "filt", tok_dir, sources, **{"filters.min_doc_tokens": lo, "filters.max_doc_tokens": hi})
    )
    all_lengths = lengths[:-1] + [lengths[i] for i in (3, 7, 3)] + lengths[-1:]
    assert manifest["skipped"] == {
        k: v
        for k, v in {"too_short": sum(n < lo for n in all_lengths), "too_long": sum(n > hi for n in all_lengths)}.items()
        if v
    }
    assert manifest["documents"] == sum(lo <= n <= hi for n in all_lengths)

    out = tmp_path / "up"
    prepare(make_config(out, tok_dir, sources, dedup=True, **{"upsample.min_tokens": 300, "upsample.factor": 3}))
    docs, _, _ = unpack(out)
    contents = [tuple(d) for d in docs.values()]
    assert contents.count(tuple(ids[-1])) == 3  # the long document, three times
    assert all(contents.count(tuple(i)) == 1 for i in ids[:-1])  # short ones once, duplicates still dropped


def test_every_file_source_type_reads_the_same_documents(tmp_path, tok_dir):
    import pyarrow as pa
    import pyarrow.parquet as pq
    from datasets import Dataset, DatasetDict

    texts = docs_of(11, 12)
    (tmp_path / "txt" / "sub").mkdir(parents=True)
    for i, t in enumerate(texts):
        (tmp_path / "txt" / ("sub" if i % 2 else "") / f"{i:02d}.txt").write_text(t)
    (tmp_path / "txt" / "ignored.bin").write_bytes(b"\x00")
    pq.write_table(pa.table({"body": texts[:5]}), tmp_path / "p1.parquet")
    pq.write_table(pa.table({"body": texts[5:]}), tmp_path / "p2.parquet")
    DatasetDict({"train": Dataset.from_dict({"text": texts})}).save_to_disk(str(tmp_path / "arrow"))
    write_jsonl(tmp_path / "j.jsonl.gz", texts, gz=True)
    want = expected_ids(tok_dir, texts)
    by_name = sorted(range(len(texts)), key=lambda i: str(tmp_path / "txt" / ("sub" if i % 2 else "") / f"{i:02d}.txt"))
    cases = {
        "jsonl": ({"type": "jsonl", "path": str(tmp_path / "*.jsonl.gz")}, list(range(12))),
        "parquet": ({"type": "parquet", "path": str(tmp_path), "text_field": "body"}, list(range(12))),
        "text": ({"type": "text", "path": str(tmp_path / "txt")}, by_name),
        "arrow": ({"type": "arrow", "path": str(tmp_path / "arrow")}, list(range(12))),
    }
    for kind, (spec, order) in cases.items():
        out = tmp_path / f"out-{kind}"
        manifest = prepare(make_config(out, tok_dir, {kind: spec}))
        docs, _, _ = unpack(out)
        assert [docs[i] for i in range(12)] == [want[j] for j in order], kind
        assert manifest["sources"][kind]["type"] == kind


def test_hub_source_needs_the_network(tmp_path, tok_dir, monkeypatch):
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    with pytest.raises(UserError, match="needs the network"):
        prepare(make_config(tmp_path / "o", tok_dir, {"web": {"type": "hub", "path": "someone/corpus"}}))


def test_bos_convention_follows_the_tokenizer_family(tmp_path, tok_dir):
    from tokenizers import Tokenizer, processors
    from transformers import PreTrainedTokenizerFast

    # A Llama-like tokenizer: its post-processor puts BOS before every text.
    llama = Tokenizer.from_file(f"{tok_dir}/tokenizer.json")
    bos = "<|startoftext|>"
    llama.post_processor = processors.TemplateProcessing(single=f"{bos} $A", special_tokens=[(bos, llama.token_to_id(bos))])
    PreTrainedTokenizerFast(tokenizer_object=llama, bos_token=bos, eos_token="<|endoftext|>").save_pretrained(
        str(tmp_path / "llama")
    )
    src = write_jsonl(tmp_path / "a.jsonl", docs_of(12, 5))
    sources = {"a": {"type": "jsonl", "path": src}}
    for tok, setting, first in ((tok_dir, None, False), (str(tmp_path / "llama"), None, True), (str(tmp_path / "llama"), False, False)):
        out = tmp_path / f"out-{first}-{setting}"
        manifest = prepare(make_config(out, tok, sources, **{"tokenizer.add_bos": setting}))
        assert manifest["tokenizer"]["add_bos"] is first
        docs, _, _ = unpack(out)
        bos_id = manifest["tokenizer"]["bos_token_id"]
        assert all((d[0] == bos_id) is first and d[-1] == manifest["tokenizer"]["eos_token_id"] for d in docs.values())
    manifest = prepare(make_config(tmp_path / "eos", tok_dir, sources, **{"tokenizer.eos_token": "<|pad|>"}))
    assert manifest["tokenizer"]["eos_token_id"] == manifest["tokenizer"]["pad_token_id"]
    with pytest.raises(UserError, match="tokenizer.eos_token='<nope>' is not a token"):
        prepare(make_config(tmp_path / "eos2", tok_dir, sources, **{"tokenizer.eos_token": "<nope>"}))


def test_tokenizer_read_without_transformers_agrees_with_transformers(tmp_path, tok_dir):
    """The tokenizers-only reading of a directory gives what transformers' AutoTokenizer gives,
    for a tokenizer without BOS, one whose post-processor adds BOS, and one whose config says so;
    and it does not import transformers or torch (2 s of start-up)."""
    import subprocess
    import sys

    from tokenizers import Tokenizer, processors
    from transformers import AutoTokenizer, PreTrainedTokenizerFast

    bos = "<|startoftext|>"
    llama = Tokenizer.from_file(f"{tok_dir}/tokenizer.json")
    llama.post_processor = processors.TemplateProcessing(single=f"{bos} $A", special_tokens=[(bos, llama.token_to_id(bos))])
    PreTrainedTokenizerFast(tokenizer_object=llama, bos_token=bos, eos_token="<|endoftext|>").save_pretrained(
        str(tmp_path / "llama"))
    for path in (tok_dir, str(tmp_path / "llama")):
        info = tokenizer.load(path, None, None)
        auto = AutoTokenizer.from_pretrained(path, local_files_only=True)
        assert (info.bos_token_id, info.eos_token_id, info.vocab_size) == (auto.bos_token_id, auto.eos_token_id, len(auto))
        assert info.pad_token_id == (auto.pad_token_id if auto.pad_token_id is not None else auto.eos_token_id)
        assert info.add_bos == (auto("a")["input_ids"][0] == auto.bos_token_id)
        assert tokenizer.backend_json(path) == auto.backend_tokenizer.to_str()
    config = json.loads((tmp_path / "llama" / "tokenizer_config.json").read_text())
    (tmp_path / "llama" / "tokenizer_config.json").write_text(json.dumps({**config, "add_bos_token": False}))
    assert tokenizer.load(str(tmp_path / "llama"), None, None).add_bos is False

    code = (f"import sys; from l2a_data_prep import tokenizer; tokenizer.load({tok_dir!r}, None, None); "
            "sys.exit(int('transformers' in sys.modules or 'torch' in sys.modules))")
    assert subprocess.run([sys.executable, "-c", code]).returncode == 0


def test_builtin_corpus_and_cached_tokenizer(tmp_path, monkeypatch):
    # Two tiny "packages" stand in for the standard library: the code path is the real one.
    root = tmp_path / "lib"
    (root / "pkg" / "sub").mkdir(parents=True)
    (root / "pkg" / "__init__.py").write_text("from .core import run\n")
    (root / "pkg" / "core.py").write_text("def run(x):\n    return x * 2\n" * 30)
    (root / "pkg" / "sub" / "__init__.py").write_text("")
    (root / "pkg" / "tests").mkdir()
    (root / "pkg" / "tests" / "test_x.py").write_text("assert False\n")
    (root / "single.py").write_text("import os\nprint(os.sep)\n" * 20)
    cfg = OmegaConf.to_container(compose("prep", [f"output={tmp_path / 'out'}"]), resolve=True)
    cfg["sources"]["code"]["root"] = str(root)
    cfg["sources"]["retrieval"].update(num_docs=8, length=[300, 600])
    cfg.update(max_tokens=None, seq_len=128, progress=False)
    cfg["tokenizer"]["train"].update(vocab_size=300, sample_chars=20000, cache_dir=str(tmp_path / "cache"))
    manifest = prepare(cfg)
    assert manifest["sources"]["code"]["documents"] == 2  # one per package / top-level module
    assert manifest["sources"]["retrieval"]["documents"] >= 1
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(tmp_path / "out" / manifest["tokenizer"]["path"]))
    assert tok.eos_token_id == manifest["tokenizer"]["eos_token_id"] and tok.pad_token_id is not None
    docs, _, _ = unpack(tmp_path / "out")
    text = tok.decode(docs[0])
    assert text.startswith("# ===== pkg/__init__.py =====") and "# ===== pkg/core.py =====" in text
    assert "test_x" not in text and "pkg/sub/__init__.py" in text
    cache = sorted(p.name for p in (tmp_path / "cache").iterdir())
    import transformers

    def no_training(*args, **kwargs):
        raise AssertionError("the cached tokenizer should have been reused")

    monkeypatch.setattr(transformers, "PreTrainedTokenizerFast", no_training)  # what training saves with
    cfg["output"] = str(tmp_path / "out2")
    manifest2 = prepare(cfg)
    assert sorted(p.name for p in (tmp_path / "cache").iterdir()) == cache
    assert manifest2["tokenizer"]["sha256"] == manifest["tokenizer"]["sha256"]
    assert shard_bytes(tmp_path / "out") == shard_bytes(tmp_path / "out2")
