"""scripts/replicate.sh --tiny: the replication recipe (docs/RESULTS.md) end to end on CPU, through
the real commands: l2a-prep (base / long / held-out rows) -> l2a-train of a full-attention base
from scratch -> l2a-convert of five arms -> l2a-train of each -> l2a-eval at C, 2C, 4C ->
l2a-prune -> the summary table. Also: a second run skips every finished stage, a spent time
budget stops with exit 3, and the held-out package split shares no package with training.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from stage_table import stage_rows

pytestmark = pytest.mark.e2e  # runs the commands as a user does; `pytest -m "not e2e"` runs the unit tests

ROOT = Path(__file__).resolve().parent.parent
BIN = Path(sys.executable).parent
ARMS = ["full", "l2a", "l2a_strong", "swa", "random", "static"]
LABELS = ["full attention", "L2A (learned router)", "L2A, stronger regularizer", "SWA only", "random routing", "static hybrid", "L2A, pruned"]
STAGES = ["prep-base", "train-base", "prep-long", "prep-heldout", "convert-main", "train-l2a",
          "train-l2a_strong", "train-full", "density", "convert-matched", "train-swa", "train-random", "train-static", "prune",
          *(f"eval-{arm}" for arm in ["l2a", "l2a_strong", "full", "swa", "l2a_pruned", "random", "static"]), "report"]


def replicate(work: Path, *args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "PATH": f"{BIN}:{os.environ['PATH']}", "OMP_NUM_THREADS": "1"}
    return subprocess.run(["bash", str(ROOT / "scripts" / "replicate.sh"), "--tiny", "--dir", str(work), *args],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=900)


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    work = tmp_path_factory.mktemp("replicate")
    return work, replicate(work)


def test_every_stage_ok_and_wrote_its_outputs(run):
    work, proc = run
    assert proc.returncode == 0, proc.stdout + proc.stderr[-4000:]
    rows = stage_rows(proc.stdout, STAGES)
    assert list(rows) == STAGES and all(r[0] == "ok" for r in rows.values()), proc.stdout
    for name in ("base", "long", "heldout"):
        manifest = json.loads((work / "data" / name / "manifest.json").read_text())
        assert manifest["seq_len"] == (256 if name == "base" else 1024)
        assert manifest["tokenizer"]["sha256"] == json.loads((work / "data" / "base" / "manifest.json").read_text())["tokenizer"]["sha256"]
    base = json.loads((work / "runs" / "replicate_base" / "hf" / "config.json").read_text())
    assert set(base["l2a_layer_types"]) == {"global"} and base["max_position_embeddings"] == 256  # full attention
    density = json.loads((work / "density.json").read_text())
    expected = {"full": {"global"}, "l2a": {"l2a"}, "swa": {"swa"}, "random": {"l2a"}}
    assert set(density["arms"]) == {"l2a", "l2a_strong"} and density["arm"] in density["arms"]
    assert density["density"] == density["arms"][density["arm"]]["density"]
    assert density["rule"].startswith("within 3% of full's LM loss")  # the tiny arms' losses are close
    assert all(abs(v["lm_loss"] / density["full_lm_loss"] - 1 - v["lm_loss_vs_full"]) < 1e-9 for v in density["arms"].values())
    lambdas = {arm: yaml.safe_load((work / "runs" / f"replicate_{arm}" / "config.yaml").read_text())["l2a"]["regularizer"]["lambda_max"]
               for arm in ("l2a", "l2a_strong")}
    assert lambdas == {"l2a": 1e-3, "l2a_strong": 4e-2}  # the two L2A arms differ in their regularizer weight only
    for arm in ARMS:
        config = json.loads((work / "ckpt" / ("l2a" if arm == "l2a_strong" else arm) / "config.json").read_text())
        assert config["max_position_embeddings"] == 1024 and config["rope_parameters"]["rope_theta"] == 2.0e5
        if arm in expected:
            assert set(config["l2a_layer_types"]) == expected[arm], (arm, config["l2a_layer_types"])
        summary = json.loads((work / "runs" / f"replicate_{arm}" / "summary.json").read_text())
        assert summary["status"] == "done" and summary["tokens_per_s"] > 0
        assert (work / "runs" / f"replicate_{arm}" / "hf" / "model.safetensors").is_file()
    random_config = json.loads((work / "ckpt" / "random" / "config.json").read_text())
    assert random_config["l2a_routing"] == "random" and random_config["l2a_random_rate"] == density["random_rate"]
    static = json.loads((work / "ckpt" / "static" / "config.json").read_text())["l2a_layer_types"]
    assert static.count("global") == density["static_global_layers"] and set(static) == {"global", "swa"}
    prune = json.loads((work / "runs" / "replicate_l2a_pruned" / "hf" / "prune_report.json").read_text())
    assert len(prune["pruned_layers"]) == 2 and prune["kv_cache"]["after"] < prune["kv_cache"]["before"]
    for arm in [*ARMS, "l2a_pruned"]:
        result = json.loads((work / "eval" / arm / "eval.json").read_text())
        assert result["retrieval"]["lengths"] == [256, 512, 1024]
        assert set(result["retrieval"]["tasks"]) == {"single_needle", "multi_key", "multi_value", "multi_query"}
        assert [b["bucket"] for b in result["perplexity"]["buckets"]] == ["0-256", "256-512", "512-1K"]
    assert "router" in json.loads((work / "eval" / "l2a" / "eval.json").read_text())


def test_summary_table_has_a_row_per_arm(run):
    work, proc = run
    table = (work / "results.md").read_text()
    assert table in proc.stdout
    rows = {}
    for line in table.splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if line.startswith("| ") and cells[0] in LABELS:
            rows[cells[0]] = cells[1:]
    assert list(rows) == LABELS, table
    header = [c.strip() for c in table.splitlines()[2].strip("|").split("|")]
    assert header[1:4] == ["retrieval 256", "retrieval 512", "retrieval 1K"] and "ppl 512-1K" in header
    for label, cells in rows.items():
        numbers = cells[:6]  # retrieval per length, mean, ppl last bucket, ppl all
        assert all(c != "-" for c in numbers), (label, cells)
        trained = cells[header.index("train tokens/s") - 1]
        assert (trained == "-") == (label == "L2A, pruned"), (label, cells)
    results = json.loads((work / "results.json").read_text())
    assert [r["arm"] for r in results] == [*ARMS, "l2a_pruned"]
    assert results[3]["skip_rate_train"] == 1.0 and results[0]["skip_rate_train"] == 0.0


def test_second_run_skips_finished_stages(run):
    work, first = run
    assert first.returncode == 0
    proc = replicate(work)
    assert proc.returncode == 0, proc.stdout + proc.stderr[-3000:]
    rows = stage_rows(proc.stdout, STAGES)
    assert all(rows[s][0].startswith("done (outputs complete") for s in STAGES[:-1]), proc.stdout
    assert rows["report"][0] == "ok"


def test_spent_budget_stops_with_exit_3(tmp_path):
    proc = replicate(tmp_path, "--budget", "5")
    assert proc.returncode == 3, proc.stdout + proc.stderr[-2000:]
    rows = stage_rows(proc.stdout, STAGES)
    assert rows["prep-base"][0].startswith("not run: time budget spent") and rows["train-base"][0] == "not run"


def test_heldout_packages_are_disjoint_from_training():
    from l2a_data_prep import stdlib_corpus

    exclude = ["test", "tests", "__pycache__", "_vendor"]
    picked = {split: [(prefix, stdlib_corpus.unit_name(unit)) for _, unit, prefix in
                      stdlib_corpus.selected_units(None, exclude, True, 0.1, split)] for split in ("all", "train", "heldout")}
    train = {name for _, name in picked["train"]}
    heldout = {name for _, name in picked["heldout"]}
    assert heldout and train and not train & heldout
    assert sorted(picked["train"] + picked["heldout"]) == sorted(picked["all"])
    assert any(prefix == "site-packages/" for prefix, _ in picked["all"])  # site_packages: true adds them
    # the split is a function of the name alone: the same with or without site-packages
    alone = {stdlib_corpus.unit_name(u) for _, u, _ in stdlib_corpus.selected_units(None, exclude, False, 0.1, "heldout")}
    assert alone == {name for prefix, name in picked["heldout"] if not prefix}
    assert stdlib_corpus.is_heldout("json", 0.1) == stdlib_corpus.is_heldout("json", 0.1)
    from l2a_common import UserError

    with pytest.raises(UserError, match="split=heldout needs holdout > 0"):
        stdlib_corpus.selected_units(None, exclude, False, 0.0, "heldout")


def test_bad_jobs_is_one_line_and_writes_nothing(tmp_path):
    work = tmp_path / "never"
    proc = replicate(work, "--jobs", "0")
    assert proc.returncode == 2 and proc.stderr.strip() == "error: --jobs 0: give a number of stages at a time, at least 1"
    assert not work.exists()
