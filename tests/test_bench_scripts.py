"""The GPU benchmark scripts run end to end on CPU with a tiny shape and print their table."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

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
