"""`l2a-prep` from the user's side, for four reported problems: a failed prep must never become a
complete (empty) data set; the manifest accounts for every input document (read, kept, skipped,
left unread, copies apart); tokenizer workers die with a killed prep; nothing is left in the
launch directory. Each runs the console script on a tiny corpus in a fresh directory."""

from __future__ import annotations

import json
import logging
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from omegaconf import OmegaConf

from l2a_common import UserError, compose
from l2a_data_prep import format as fmt
from l2a_data_prep import tokenizer
from l2a_data_prep.pipeline import prepare

pytestmark = pytest.mark.e2e  # runs the commands as a user does; `pytest -m "not e2e"` runs the unit tests

BIN = Path(sys.executable).parent / "l2a-prep"
WORDS = "alpha beta gamma delta epsilon zeta eta theta iota kappa lambda mu".split()
ENV = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "WANDB_MODE": "offline"}


def run(args, cwd):
    return subprocess.run([str(BIN), *args], cwd=cwd, env=ENV, capture_output=True, text=True, timeout=120)


@pytest.fixture(scope="module")
def tok_dir(tmp_path_factory):
    rng = random.Random(0)
    texts = [" ".join(rng.choice(WORDS) for _ in range(50)) + "\n" for _ in range(200)]
    return tokenizer.train_builtin(texts, 320, str(tmp_path_factory.mktemp("tok")))


def texts(seed: int, n: int, lo: int = 20, hi: int = 60) -> list[str]:
    rng = random.Random(seed)
    return [f"doc{seed}-{i} " + " ".join(rng.choice(WORDS) for _ in range(rng.randint(lo, hi))) for i in range(n)]


def write_jsonl(path: Path, docs: list[str], field: str = "text") -> Path:
    path.write_text("".join(json.dumps({field: t, "id": i}) + "\n" for i, t in enumerate(docs)))
    return path


def args_for(tok: str, *extra: str, out: str = "out") -> list[str]:
    """Your own corpus (prep=long_context), tiny rows, the test's tokenizer, no upsampling."""
    return ["prep=long_context", f"output={out}", "seq_len=64", "progress=false", f"tokenizer.path={tok}",
            "tokenizer.estimate_chars=5000", "upsample.min_tokens=null", "upsample.factor=1", *extra]


def error_line(result) -> str:
    assert result.returncode == 2, result.stdout + result.stderr
    assert "Traceback" not in result.stderr
    line = result.stderr.strip().splitlines()[-1]
    assert line.startswith("error: ")
    return line


def manifest_of(out: Path) -> dict:
    return json.loads((out / fmt.MANIFEST).read_text())


# ---------------------------------------------------------------- 1. a failed prep stays failed


def test_failed_prep_is_never_marked_complete(tmp_path, tok_dir):
    write_jsonl(tmp_path / "web.jsonl", texts(1, 107), field="body")  # the text is under "body"
    args = args_for(tok_dir, "+sources.web={type: jsonl, path: web.jsonl}")
    for attempt in (1, 2):  # the same command again fails the same way: no "complete already, 0 rows"
        result = run(args, tmp_path)
        error = error_line(result)
        assert error.startswith("error: no documents left to pack from the sources (skipped missing_text_field: 107)")
        assert "check sources.web.text_field" in error and "(fields: body, id)" in error, error
        assert "complete already" not in result.stdout + result.stderr
        assert not (tmp_path / "out" / fmt.MANIFEST).exists(), attempt
    # the failed prep left nothing behind: the corrected command runs without overwrite=true
    fixed = run(args[:-1] + ["+sources.web={type: jsonl, path: web.jsonl, text_field: body}"], tmp_path)
    assert fixed.returncode == 0, fixed.stderr
    assert manifest_of(tmp_path / "out")["documents"] == 107


def config(out: Path, tok: str, sources: dict, **top) -> dict:
    cfg = OmegaConf.to_container(compose("prep", [f"output={out}"]), resolve=True)
    cfg.update(sources=sources, mixture=[], max_tokens=None, progress=False, seq_len=64)
    cfg.update(top)
    cfg["tokenizer"].update(path=tok, estimate_chars=5000)
    return cfg


def test_empty_result_names_the_filter_and_an_old_empty_output_is_not_complete(tmp_path, tok_dir):
    src = {"a": {"type": "jsonl", "path": str(write_jsonl(tmp_path / "a.jsonl", texts(2, 5)))}}
    cfg = config(tmp_path / "out", tok_dir, src)
    cfg["filters"]["min_doc_tokens"] = 100000
    with pytest.raises(UserError, match=r"skipped too_short: 5\); check filters.min_doc_tokens \(5 too_short, e.g. "):
        prepare(cfg)
    assert list((tmp_path / "out").iterdir()) == []
    # an output that an older l2a-prep wrote and marked complete although it held no document
    cfg = config(tmp_path / "old", tok_dir, src)
    manifest = prepare(cfg)
    manifest.update(documents=0, skipped={"missing_text_field": 5},
                    skipped_examples={"missing_text_field": ["a.jsonl:1: no 'text' field"]})
    manifest["sources"]["a"].update(documents=0, skipped={"missing_text_field": 5})
    (tmp_path / "old" / fmt.MANIFEST).write_text(json.dumps(manifest))
    with pytest.raises(UserError, match=r"no documents left .*check sources.a.text_field"):
        prepare(cfg)
    assert prepare(cfg)["documents"] == 5  # discarded, so the rerun is a fresh prep


def test_a_source_that_gives_nothing_is_named_even_when_others_fill_the_data_set(tmp_path, tok_dir, caplog):
    good = write_jsonl(tmp_path / "a.jsonl", texts(11, 10))
    wrong = write_jsonl(tmp_path / "b.jsonl", texts(12, 10), field="content")
    sources = {"a": {"type": "jsonl", "path": str(good)}, "b": {"type": "jsonl", "path": str(wrong)}}
    with caplog.at_level(logging.WARNING, logger="l2a_data_prep"):
        manifest = prepare(config(tmp_path / "out", tok_dir, sources))
    assert manifest["sources"]["b"]["skipped"] == {"missing_text_field": 10}
    assert "source 'b' gave no documents: check sources.b.text_field (10 missing_text_field" in caplog.text


# ---------------------------------------------------------------- 2. every input document accounted for


def test_manifest_accounts_for_mixture_leftovers_and_copies(tmp_path, tok_dir):
    import pyarrow as pa
    import pyarrow.parquet as pq

    lines = [json.dumps({"text": t}) for t in texts(3, 107)]
    for at in (1, 4, 8):  # three bad lines early in the file: read, and skipped
        lines.insert(at, '{"text": "cut off')
    (tmp_path / "web.jsonl").write_text("\n".join(lines) + "\n")
    pq.write_table(pa.table({"text": texts(4, 20)}), tmp_path / "pq.parquet")
    sources = ["+sources.web={type: jsonl, path: web.jsonl}", "+sources.pq={type: parquet, path: pq.parquet}"]
    result = run(args_for(tok_dir, *sources, "mixture=[web@0.7,pq@0.3]"), tmp_path)
    assert result.returncode == 0, result.stderr
    manifest = manifest_of(tmp_path / "out")
    web, pq_ = manifest["sources"]["web"], manifest["sources"]["pq"]
    # pq runs out first; the web documents its share did not need are left unread, and counted
    assert web["left_unread"] > 0 and web["read"] + web["left_unread"] == 110
    assert web["skipped"] == {"malformed_json": 3} and web["read"] == web["kept"] + 3
    assert (pq_["read"], pq_["kept"], pq_["left_unread"], pq_["copies"]) == (20, 20, 0, 0)
    assert manifest["left_unread"] == web["left_unread"] and "domain 'pq' ran out" in manifest["ended"]
    assert manifest["documents"] == web["kept"] + pq_["kept"]
    last = result.stdout.strip().splitlines()[-1]  # the log's last line says what was left unread
    assert last.startswith(f"left unread: {web['left_unread']} records (web {web['left_unread']}); the stream ended: ")

    # upsampled copies of the long documents are counted apart from the input documents
    docs = texts(5, 97) + texts(6, 10, 400, 400)
    write_jsonl(tmp_path / "up.jsonl", docs)
    up = ["+sources.web={type: jsonl, path: up.jsonl}", "upsample.min_tokens=300", "upsample.factor=3"]
    result = run(args_for(tok_dir, *up, out="up-out"), tmp_path)
    assert result.returncode == 0, result.stderr
    manifest = manifest_of(tmp_path / "up-out")
    web = manifest["sources"]["web"]
    assert (web["read"], web["kept"], web["left_unread"], web["copies"]) == (107, 107, 0, 20)
    assert manifest["documents"] == web["documents"] == 127 and manifest["copies"] == 20
    assert "source web: read 107, kept 107, skipped 0, left unread 0; 20 copies" in result.stdout
    assert result.stdout.strip().splitlines()[-1] == "left unread: none (every source read to the end)"


def test_accounting_adds_up_with_max_tokens_epochs_dedup_and_filters(tmp_path, tok_dir):
    a = write_jsonl(tmp_path / "a.jsonl", texts(7, 40) + texts(7, 3))  # 3 exact duplicates
    b = write_jsonl(tmp_path / "b.jsonl", texts(8, 30))
    sources = {"a": {"type": "jsonl", "path": str(a)}, "b": {"type": "jsonl", "path": str(b)}}
    cfg = config(tmp_path / "out", tok_dir, sources, dedup=True, max_tokens=2800)
    cfg["filters"]["min_doc_tokens"] = 40
    manifest = prepare(cfg)
    for name, total in (("a", 43), ("b", 30)):
        st = manifest["sources"][name]
        assert st["read"] == st["kept"] + sum(st["skipped"].values()), name
        assert st["read"] + st["left_unread"] == total, name
    a_, b_ = manifest["sources"]["a"], manifest["sources"]["b"]
    assert a_["skipped"]["duplicate"] == 3 and a_["skipped"]["too_short"] > 0 and a_["left_unread"] == 0
    assert 0 < b_["read"] < 30 and manifest["ended"] == "max_tokens=2800 reached"
    # epochs: the repeats are copies, never input read twice
    cfg = config(tmp_path / "ep", tok_dir, {"b": sources["b"]}, max_epochs=3)
    st = prepare(cfg)["sources"]["b"]
    assert (st["read"], st["kept"], st["copies"], st["left_unread"]) == (30, 30, 60, 0)
    # count_unread=false: not counted, and said so
    cfg = config(tmp_path / "nc", tok_dir, sources, max_tokens=2800, count_unread=False)
    manifest = prepare(cfg)
    assert manifest["left_unread"] is None and manifest["sources"]["b"]["left_unread"] is None


# ---------------------------------------------------------------- 3. workers die with a killed prep


def children(pid: int) -> list[int]:
    found = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rpartition(")")[2].split()
        except OSError:
            continue
        if int(fields[1]) == pid:
            found.append(int(stat.parent.name))
    return found


def running(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()[0] != "Z"
    except OSError:
        return False


def wait_gone(pids: list[int], seconds: float) -> list[int]:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline and any(map(running, pids)):
        time.sleep(0.1)
    return [p for p in pids if running(p)]


def kill_survivors(pids: list[int]) -> None:
    for pid in pids:  # only processes this test started
        if running(pid):
            os.kill(pid, signal.SIGKILL)


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc")
def test_kill_9_of_the_prep_ends_its_tokenizer_workers(tmp_path, tok_dir):
    rng = random.Random(9)
    with open(tmp_path / "big.jsonl", "w") as handle:  # ~12 MB: far more than the test lets it pack
        for i in range(10000):
            handle.write(json.dumps({"text": " ".join(rng.choice(WORDS) for _ in range(200))}) + "\n")
    args = args_for(tok_dir, "+sources.web={type: jsonl, path: big.jsonl}", "workers=2", "batch_chars=100000",
                    "shards.tokens=100000")
    with open(tmp_path / "log.txt", "w") as log:
        prep = subprocess.Popen([str(BIN), *args], cwd=tmp_path, env=ENV, stdout=log, stderr=subprocess.STDOUT)
    kids: list[int] = []
    try:
        deadline = time.monotonic() + 60
        while not (tmp_path / "out" / "shard-00000.done.json").exists():  # the workers are tokenizing
            assert prep.poll() is None and time.monotonic() < deadline, (tmp_path / "log.txt").read_text()
            time.sleep(0.05)
        kids = children(prep.pid)
        assert len(kids) >= 2  # two workers (and multiprocessing's resource tracker)
        prep.send_signal(signal.SIGKILL)
        prep.wait()
        assert wait_gone(kids, 10) == []
    finally:
        prep.kill()
        kill_survivors(kids)


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc")
def test_without_pdeathsig_the_worker_watches_its_parent(tmp_path):
    """Where prctl is unavailable (not Linux), a watchdog thread ends the worker."""
    ready = tmp_path / "ready"
    worker = ("import os, sys, time\n"
              "from l2a_data_prep import parallel\n"
              "parallel._die_with_parent_linux = lambda: False\n"
              "parallel._exit_with_parent(int(sys.argv[1]))\n"
              f"open({str(ready)!r}, 'w').close()\n"
              "time.sleep(60)\n")
    parent = ("import os, subprocess, sys, time\n"
              f"subprocess.Popen([sys.executable, '-c', {worker!r}, str(os.getpid())])\n"
              "time.sleep(60)\n")
    proc = subprocess.Popen([sys.executable, "-c", parent], env=ENV)
    kids: list[int] = []
    try:
        deadline = time.monotonic() + 30
        while not ready.exists():
            assert proc.poll() is None and time.monotonic() < deadline
            time.sleep(0.05)
        kids = children(proc.pid)
        assert len(kids) == 1
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        assert wait_gone(kids, 5) == []
    finally:
        proc.kill()
        kill_survivors(kids)


# ---------------------------------------------------------------- 4. nothing left where you launch


def test_nothing_is_left_in_the_launch_directory(tmp_path, tok_dir):
    write_jsonl(tmp_path / "web.jsonl", texts(10, 30))
    ok = run(args_for(tok_dir, "+sources.web={type: jsonl, path: web.jsonl}"), tmp_path)
    assert ok.returncode == 0, ok.stderr
    assert "rows x 64 tokens" in ok.stdout  # the log goes to stdout, not to a file
    error_line(run(args_for(tok_dir, "+sources.web={type: jsonl, path: nope.jsonl}", out="out2"), tmp_path))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out", "web.jsonl"]  # no outputs/<timestamp>/
    assert not [p for p in tmp_path.rglob("*") if p.name == ".hydra" or p.suffix == ".log"]
