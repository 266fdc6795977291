"""scripts/acceptance.sh --tiny: the real commands end to end on CPU, as a user runs them.

prep -> convert -> train with the learned router (stopped by SIGTERM halfway, then resumed) ->
Hugging Face export -> eval -> prune -> generate, one Markdown table row per stage. The same
script with a Qwen2.5-1.5B-shaped model and 32K rows is the GPU acceptance run.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
from stage_table import stage_rows

pytestmark = pytest.mark.e2e  # runs the commands as a user does; `pytest -m "not e2e"` runs the unit tests

ROOT = Path(__file__).resolve().parent.parent
BIN = Path(sys.executable).parent
STAGES = ["prep", "convert", "train (to SIGTERM)", "train (resumed)", "export (hf)", "eval", "prune", "generate"]


def _acceptance(tmp_path, **env):
    environment = {**os.environ, "PATH": f"{BIN}:{os.environ['PATH']}", **env}
    return subprocess.run(["bash", str(ROOT / "scripts" / "acceptance.sh"), "--tiny", "--dir", str(tmp_path)],
                          cwd=ROOT, env=environment, capture_output=True, text=True, timeout=600)


def test_acceptance_tiny_every_stage_ok(tmp_path):
    proc = _acceptance(tmp_path)
    assert proc.returncode == 0, proc.stdout + proc.stderr[-3000:]
    rows = stage_rows(proc.stdout, STAGES)
    assert list(rows) == STAGES and all(r[0] == "ok" for r in rows.values()), proc.stdout
    first = re.search(r"routed fraction ([\d.]+) -> ([\d.]+)", rows["train (to SIGTERM)"][2])
    assert first and float(first.group(1)) == 1.0 and float(first.group(2)) < 0.9  # the router learned to skip
    assert re.search(r"resumed at step (\d+)", rows["train (resumed)"][2])
    assert "KV cache" in rows["prune"][2] and "tokens/s" in rows["generate"][2]
    assert (tmp_path / "acceptance.md").read_text().count("| ok |") == len(STAGES)


def test_acceptance_failed_stage_exits_nonzero_and_stops(tmp_path):
    """A stage that fails (here l2a-prep: its output path is taken by a file) is one table row with
    the command's error line; the later stages are not run and the script exits non-zero."""
    (tmp_path / "data").write_text("not a data set")
    proc = _acceptance(tmp_path)
    assert proc.returncode == 1, proc.stdout
    rows = stage_rows(proc.stdout, STAGES)
    assert rows["prep"][0].startswith("exit 2: error: output") and "is a file" in rows["prep"][0], rows["prep"]
    assert all(rows[s][0] == "not run" for s in STAGES[1:])


def test_generate_bad_prompt_one_line(tmp_path):
    proc = subprocess.run([str(BIN / "l2a-generate"), f"model.path={tmp_path}", "prompt=@/no/such/file"], cwd=tmp_path,
                          capture_output=True, text=True, timeout=120)
    errors = [l for l in proc.stderr.splitlines() if l.startswith("error:")]
    assert proc.returncode == 2 and len(errors) == 1, proc.stderr[-2000:]
    assert "prompt=@/no/such/file: no such file" in errors[0]
    from l2a_common import UserError
    from l2a_train.generation import read_prompt

    with pytest.raises(UserError, match="prompt is empty"):
        read_prompt("")
