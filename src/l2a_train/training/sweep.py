"""Run and sweep summaries.

Every finished run writes `summary.json` into its directory (final loss, skip rate, tokens/s).
A multirun (`l2a-train -m a=1,2 b=3,4`) runs each job into its own directory under the sweep
directory; `SweepSummary` (a Hydra callback registered in configs/train.yaml) rewrites
`summary.md` there after every job and at the end of the sweep:

    | job | overrides | steps | final loss | skip rate | tokens/s | status |
"""

from __future__ import annotations

import json
import os
import re
import sys
from pathlib import Path

from .metrics import read_metrics

SUMMARY_JSON = "summary.json"
SUMMARY_MD = "summary.md"


def run_summary(run_dir, total_steps: int | None = None, status: str | None = None) -> dict:
    """Final numbers of a run from its metrics.jsonl; the final loss is the mean LM loss of the
    last 10% of logged steps (at least one), which is less noisy than the last step alone."""
    metrics = [m for m in read_metrics(run_dir) if m.get("lm_loss") is not None]
    if not metrics:
        return {"steps": 0, "final_loss": None, "final_skip_rate": None, "tokens_per_s": None,
                "status": status or "no metrics"}
    tail = metrics[-max(1, len(metrics) // 10):]
    speeds = [m["tokens_per_s"] for m in metrics[1:] if m.get("tokens_per_s")] or \
             [m["tokens_per_s"] for m in metrics if m.get("tokens_per_s")]
    last = metrics[-1]
    done = total_steps is not None and last["step"] >= total_steps
    return {
        "steps": last["step"],
        "tokens": last.get("tokens"),
        "final_loss": sum(m["lm_loss"] for m in tail) / len(tail),
        "last_loss": last["lm_loss"],
        "final_skip_rate": last.get("skip_rate"),
        "tokens_per_s": sum(speeds) / len(speeds) if speeds else None,
        "peak_mem_gib": max((m.get("peak_mem_gib") or 0.0) for m in metrics),
        "status": status or ("done" if done else "incomplete"),
    }


def write_run_summary(run_dir, total_steps: int, status: str, extra: dict | None = None) -> dict:
    summary = {**run_summary(run_dir, total_steps, status), **(extra or {})}
    path = Path(run_dir) / SUMMARY_JSON
    path.write_text(json.dumps(summary, indent=2) + "\n")
    return summary


def _overrides(job_dir: Path) -> list[str]:
    path = job_dir / ".hydra" / "overrides.yaml"
    if not path.is_file():
        return []
    return [line[2:].strip() for line in path.read_text().splitlines() if line.startswith("- ")]


def _common_overrides(jobs: list[Path]) -> str:
    """Overrides every job shares (the varying ones name the job folders)."""
    lists = [_overrides(j) for j in jobs]
    if not lists or not lists[0]:
        return ""
    return " ".join(o for o in lists[0] if all(o in other for other in lists[1:]))


def _fmt(value, spec: str) -> str:
    return "-" if value is None else format(value, spec)


def write_sweep_summary(sweep_dir) -> Path | None:
    """summary.md: one row per job directory (any folder holding metrics.jsonl or summary.json)."""
    sweep_dir = Path(sweep_dir)
    if not sweep_dir.is_dir():
        return None
    jobs = sorted({p.parent for p in sweep_dir.glob("*/metrics.jsonl")} | {p.parent for p in sweep_dir.glob(f"*/{SUMMARY_JSON}")})
    rows = ["| job | steps | final loss | skip rate | tokens/s | peak mem (GiB) | status |",
            "|---|---:|---:|---:|---:|---:|---|"]
    for job in jobs:
        path = job / SUMMARY_JSON
        s = json.loads(path.read_text()) if path.is_file() else run_summary(job, status="running or killed")
        rows.append(f"| {job.name} | {s.get('steps', 0)} | {_fmt(s.get('final_loss'), '.4f')} | "
                    f"{_fmt(s.get('final_skip_rate'), '.3f')} | {_fmt(s.get('tokens_per_s'), '.0f')} | "
                    f"{_fmt(s.get('peak_mem_gib'), '.2f')} | {s.get('status')} |")
    common = _common_overrides(jobs)
    text = (f"# Sweep summary: {sweep_dir}\n\n" + (f"common overrides: `{common}`\n\n" if common else "") + "final loss: mean LM loss of the last 10% of steps; skip rate: fraction of "
            "tokens skipping global attention in L2A layers at the last step; tokens/s: mean over steps.\n\n"
            + "\n".join(rows) + "\n")
    out = sweep_dir / SUMMARY_MD
    tmp = out.with_name(out.name + ".tmp")
    tmp.write_text(text)
    os.replace(tmp, out)
    return out


def swept_keys(argv: list[str] | None = None) -> set[str]:
    """Keys that the running multirun sweeps over: `a=1,2`, `range(...)`, `choice(...)` on the
    command line, plus `hydra.sweeper.params`."""
    keys = set()
    try:
        from hydra.core.override_parser.overrides_parser import OverridesParser

        args = [a for a in (sys.argv[1:] if argv is None else argv) if not a.startswith("-")]
        keys |= {o.key_or_group for o in OverridesParser.create().parse_overrides(args) if o.is_sweep_override()}
    except Exception:  # noqa: BLE001  (a name is a nicety; never fail the job over it)
        pass
    try:
        from hydra.core.hydra_config import HydraConfig

        keys |= set((HydraConfig.get().sweeper.get("params") or {}).keys())
    except Exception:  # noqa: BLE001
        pass
    return keys


def job_dirname(task_overrides, limit: int = 120) -> str:
    """A sweep job's folder: its values of the swept keys (`l2a.window=1024,trainer.lr=1e-4`),
    made safe for paths; all its overrides if the swept keys cannot be told."""
    items = [str(o) for o in task_overrides]
    swept = swept_keys()
    chosen = [o for o in items if o.split("=", 1)[0].lstrip("+~") in swept] or items
    name = re.sub(r"[/\\\s]+", "_", ",".join(chosen)).strip("_") or "default"
    if len(name) > limit:
        import hashlib

        name = name[: limit - 9] + "-" + hashlib.sha1(name.encode()).hexdigest()[:8]
    return name


try:
    from hydra.experimental.callback import Callback
except ImportError:  # pragma: no cover
    Callback = object


class SweepSummary(Callback):
    """Hydra callback: keeps `<sweep dir>/summary.md` current during a multirun (rank 0 only)."""

    @staticmethod
    def _main() -> bool:
        return int(os.environ.get("RANK", 0)) == 0

    def on_job_end(self, config, job_return, **kwargs) -> None:
        from hydra.core.hydra_config import HydraConfig
        from hydra.types import RunMode

        hydra_cfg = HydraConfig.get()
        if hydra_cfg.mode != RunMode.MULTIRUN or not self._main():
            return
        write_sweep_summary(hydra_cfg.sweep.dir)

    def on_multirun_end(self, config, **kwargs) -> None:
        if self._main():
            out = write_sweep_summary(config.hydra.sweep.dir)
            if out is not None:
                print(f"sweep summary: {out}", flush=True)
