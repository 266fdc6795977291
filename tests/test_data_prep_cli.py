"""`l2a-prep` as users run it: the console script, the quickstart recipe, one-line errors."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from l2a_train.data import PackedDataset, PackedLoader

pytestmark = pytest.mark.e2e  # runs the commands as a user does; `pytest -m "not e2e"` runs the unit tests

BIN = Path(sys.executable).parent / "l2a-prep"


def run(args, cwd):
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"}
    return subprocess.run([str(BIN), *args], cwd=cwd, env=env, capture_output=True, text=True, timeout=300)


@pytest.fixture(scope="module")
def quick(tmp_path_factory):
    """The quickstart recipe, smaller (the full one is ~400K tokens, 5-10 s)."""
    tmp = tmp_path_factory.mktemp("cli")
    args = ["prep=quickstart", "output=qs", "tokenizer.train.cache_dir=tok", "max_tokens=40000",
            "tokenizer.train.sample_chars=200000", "tokenizer.estimate_chars=50000", "shards.tokens=16000"]
    return tmp, args, run(args, tmp)


def test_quickstart_recipe_end_to_end(quick):
    tmp, args, result = quick
    assert result.returncode == 0, result.stderr
    manifest = json.loads((tmp / "qs" / "manifest.json").read_text())  # relative to the launch directory
    assert manifest["seq_len"] == 1024 and manifest["tokenizer"]["vocab_size"] == 4096
    assert set(manifest["domains"]) == {"code", "retrieval"} and manifest["num_rows"] >= 30
    assert "rows x 1024 tokens" in result.stderr + result.stdout
    ds = PackedDataset(tmp / "qs")
    batch = PackedLoader(ds, micro_batch_size=4, rank=0, world_size=1, seed=0, shuffle=True).next_batch()
    assert batch["input_ids"].shape == (4, 1024) and int(batch["input_ids"].max()) < 4096
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(ds.tokenizer_path)
    assert (tok.bos_token_id, tok.eos_token_id, tok.pad_token_id) == (1, 0, 2)
    assert sorted(p.name for p in tmp.iterdir()) == ["qs", "tok"]  # no outputs/<timestamp>/, no .hydra
    assert result.stdout.strip().splitlines()[-1].startswith("left unread: ")  # max_tokens left some


def test_second_run_reuses_everything(quick):
    tmp, args, _ = quick
    before = {p.name: p.stat().st_mtime_ns for p in (tmp / "qs").iterdir()}
    result = run(args, tmp)
    assert result.returncode == 0, result.stderr
    assert "complete already" in result.stderr + result.stdout
    assert {p.name: p.stat().st_mtime_ns for p in (tmp / "qs").iterdir()} == before


@pytest.mark.parametrize(
    "args,message",
    [
        (["prep=nope"], "unknown prep option 'nope'"),
        (["prep=quickstart", "output=x", "tokenizer.path=/no/tok"], "tokenizer.path='/no/tok' does not exist"),
        (["prep=quickstart", "output=x", "mixture=[]", "+sources.web={type:jsonl,path:/no/web.jsonl}"], "sources.web.path"),
        (["prep=quickstart", "output=x", "mixture=[code@0.5]"], "no mixture entry"),
    ],
)
def test_bad_settings_give_one_line_and_exit_2(tmp_path, args, message):
    result = run(args, tmp_path)
    assert result.returncode == 2
    assert message in result.stderr and "Traceback" not in result.stderr
    assert result.stderr.strip().splitlines()[-1].startswith("error: ")
