"""The GPU benchmark scripts run end to end on CPU with a tiny shape and print their table."""

from __future__ import annotations

import json
import os
import statistics
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.e2e  # runs the commands as a user does; `pytest -m "not e2e"` runs the unit tests

SCRIPTS = Path(__file__).resolve().parent.parent / "scripts"
TINY = ["--shape", "tiny", "--lengths", "128", "--device", "cpu", "--dtype", "float32", "--repeats", "1", "--warmup", "0"]


def _run(script, *args):
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    env.pop("TRITON_INTERPRET", None)  # the reference backend on CPU: seconds, not minutes
    return subprocess.run([sys.executable, str(SCRIPTS / script), *args], capture_output=True, text=True, env=env,
                          timeout=300)


@pytest.mark.parametrize("script, variants", [("bench_train.py", "full-hf,full,l2a,l2a:keep"),
                                              ("bench_inference.py", "full-hf,l2a,pruned")])
def test_benchmark_runs_on_cpu_and_writes_json(tmp_path, script, variants):
    out = _run(script, *TINY, "--window", "32", "--variants", variants, "--json", str(tmp_path / "r.json"))
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.startswith("| variant | length |")
    rows = json.loads((tmp_path / "r.json").read_text())["rows"]
    assert [r["variant"] for r in rows] == variants.split(",")


def test_benchmark_rejects_bad_arguments():
    out = _run("bench_train.py", "--variants", "full,flash")
    assert out.returncode == 2 and "unknown variants ['flash']" in out.stderr


def test_real_trainer_benchmark_reads_its_figures_from_l2a_train(tmp_path):
    """bench_trainer.py prepares rows with l2a-prep, trains with l2a-train, and its table's
    figures are those of the run's metrics.jsonl (a failed run would be reported, not hidden)."""
    out = _run("bench_trainer.py", "--suite", "tiny", "--cases", "tiny-l2a-long", "--work", str(tmp_path / "w"),
               "--out", str(tmp_path / "out"), "--profile")
    assert out.returncode == 0, (out.stdout + out.stderr)[-2000:]
    (result,) = json.loads((tmp_path / "out" / "bench_trainer_tiny.json").read_text())
    records = [json.loads(line) for line in (tmp_path / "w/runs/tiny-l2a-long/metrics.jsonl").read_text().splitlines()]
    timed = [r["tokens_per_s"] for r in records if 1 < r.get("step", 0) < 3]  # the profiled last step left out
    assert result["rc"] == 0 and result["steps_done"] == 3
    assert result["tokens_per_s"] == statistics.median(timed) and len(timed) == 1
    assert [(r["step"], r["tokens_per_s"]) for r in result["per_step"]] == [
        (r["step"], r["tokens_per_s"]) for r in records if "tokens_per_s" in r]  # every step, the profiled one too
    assert (tmp_path / "out" / "tiny-l2a-long-profile.md").read_text().startswith("# Profile of optimizer step 3")
    assert abs(result["routed"] - 0.2) < 0.1  # l2a=random at 0.2
    assert "| tiny-l2a-long | tiny | 1K | 1 | long (" in out.stdout


def test_real_trainer_benchmark_starts_a_case_from_an_earlier_cases_weights(tmp_path):
    """A learned-router case timed from the weights an earlier case trained (trainer.init_from, as
    a curriculum's next stage starts), at its own rows per optimizer step; vs-full ratios compare
    equal rows per step only."""
    work = tmp_path / "w"
    out = _run("bench_trainer.py", "--suite", "tiny", "--cases", "tiny-learned-train,tiny-learned-next",
               "--work", str(work), "--out", str(tmp_path / "out"))
    assert out.returncode == 0, (out.stdout + out.stderr)[-2000:]
    first, second = json.loads((tmp_path / "out" / "bench_trainer_tiny.json").read_text())
    assert (first["batch"], second["batch"], second["init_from"]) == (1, 2, "tiny-learned-train")
    log = (work / "tiny-learned-next.log").read_text()
    assert f"initialised from {work / 'runs/tiny-learned-train/checkpoints/step_00000002'} (weights)" in log
    assert "| tiny-learned-next | tiny | 1K | 2 | long (" in out.stdout and "learned (from tiny-learned-train)" in out.stdout


def test_real_trainer_benchmark_needs_the_case_it_starts_from(tmp_path):
    out = _run("bench_trainer.py", "--suite", "tiny", "--cases", "tiny-learned-next", "--work", str(tmp_path))
    assert out.returncode == 2
    assert "tiny-learned-next starts from tiny-learned-train's weights; add tiny-learned-train before it" in out.stderr


def test_real_trainer_benchmark_names_unknown_cases(tmp_path):
    out = _run("bench_trainer.py", "--suite", "tiny", "--cases", "nope", "--work", str(tmp_path))
    assert out.returncode == 2 and "--cases: unknown ['nope']" in out.stderr
