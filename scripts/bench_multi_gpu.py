#!/usr/bin/env python
"""Multi-GPU runs on one node through the real commands: loss parity, scaling, resume across
GPU counts. Every run is `torchrun --standalone --nproc_per_node=N -m l2a_train.cli.train ...` on
rows written by `l2a-prep`; figures come from the runs' metrics.jsonl. One Markdown table:

    python scripts/bench_multi_gpu.py --work /tmp/mg                      # all parts, GPU counts 1 2 4 8 (those present)
    python scripts/bench_multi_gpu.py --work /tmp/mg --parts parity,resume --gpus 1,2
    python scripts/bench_multi_gpu.py --work /tmp/mg --tiny               # CPU (gloo), 1 and 2 processes, tiny model

Parts:
  parity   Qwen2.5-1.5B shape, 32K rows, learned router, ZeRO-2 and ZeRO-3: N GPUs against 1 GPU with
           the same global batch (4 rows) and data order, 10 steps; the largest relative difference of
           the per-step LM loss. Tolerance 1%: the runs differ only in the order in which bf16
           gradients are summed (bf16 keeps 8 significant bits, a relative rounding of 0.4% per sum),
           which changes the fp32 master weights by rounding-sized amounts that stay small over 10 steps.
  scaling  128K rows, full attention and L2A (random routing at 0.2), ZeRO-2, 4 rows per GPU per step:
           tokens/s per GPU at each GPU count and the efficiency against 1 GPU.
  resume   a ZeRO-2 run on 2 GPUs stops at step 3 (trainer.stop_at) and continues to step 6 on 1 and
           on 4 GPUs (DeepSpeed universal checkpoint); the continued losses against the 2-GPU run's own.

NCCL on one node: NVLink multicast stays off (NCCL_NVLS_ENABLE=0, set by scripts/gpu_env.sh), see README "Launch".
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_trainer import QWEN2_5_1_5B, TINY, command, prep_layout  # noqa: E402

TOLERANCE = 0.01


def settings(tiny: bool) -> dict:
    if tiny:
        return dict(shape=TINY, experiment="quickstart", family="qwen3", parity_len=1024, scale_len=1024,
                    parity_steps=4, scale_steps=3, device_count=2, extra=["l2a.window=128"])
    import torch

    return dict(shape=QWEN2_5_1_5B, experiment="qwen2_5_1_5b_32k", family="qwen2", parity_len=32768,
                scale_len=131072, parity_steps=10, scale_steps=3, device_count=torch.cuda.device_count(), extra=[])


def log(msg: str) -> None:
    print(f"[bench_multi_gpu {time.strftime('%H:%M:%S')}] {msg}", flush=True)


def prep(work: Path, seq_len: int, rows: int) -> Path:
    """Rows of one long document each (bench_trainer's `long` layout)."""
    return prep_layout(work, "long", seq_len, rows, log)


def train(work: Path, name: str, gpus: int, s: dict, data: Path, *overrides: str, run_root: Path | None = None,
          fresh: bool = True):
    """One l2a-train run under torchrun; (exit code, metrics by step). `fresh`: an earlier run of
    the same name is set aside (trainer.resume=never), else it is resumed."""
    run_root = run_root or work / "runs"
    torchrun = command("torchrun")
    args = [*torchrun, "--standalone", f"--nproc_per_node={gpus}", "-m", "l2a_train.cli.train",
            f"experiment={s['experiment']}", f"model.family={s['family']}", "model.path=null",
            f"model.config={s['shape']}", f"data.path={data}", "trainer.micro_batch_size=1", "trainer.save_every=0",
            "trainer.export_hf=false", "trainer.log_every=1", "trainer.warmup_steps=1", f"run_root={run_root}",
            f"name={name}", "data.shuffle=false", f"trainer.resume={'never' if fresh else 'auto'}", *s["extra"],
            *overrides]
    log(f"{gpus} process(es): {name}")
    with open(work / f"{name}.log", "w") as out:
        rc = subprocess.run(args, cwd=ROOT, stdout=out, stderr=subprocess.STDOUT,
                            env={**os.environ, "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1")}).returncode
    path = run_root / name / "metrics.jsonl"
    records = [json.loads(x) for x in path.read_text().splitlines()] if path.is_file() else []
    return rc, {r["step"]: r for r in records if "lm_loss" in r}


def rel_diff(a: dict, b: dict, steps) -> float | None:
    common = [k for k in steps if k in a and k in b]
    if len(common) != len(list(steps)):
        return None
    return max(abs(a[k]["lm_loss"] - b[k]["lm_loss"]) / abs(b[k]["lm_loss"]) for k in common)


def verdict(diff) -> str:
    return "missing steps" if diff is None else ("ok" if diff <= TOLERANCE else "over tolerance")


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--work", type=Path, required=True)
    p.add_argument("--parts", default="parity,scaling,resume")
    p.add_argument("--gpus", default="1,2,4,8", help="GPU counts for scaling (those beyond the machine's are left out)")
    p.add_argument("--tiny", action="store_true", help="CPU processes (gloo) and a tiny model")
    p.add_argument("--out", type=Path, default=None, help="also write the table here (.md)")
    args = p.parse_args(argv)
    s = settings(args.tiny)
    parts = args.parts.split(",")
    counts = [n for n in (int(x) for x in args.gpus.split(",")) if args.tiny and n <= 2 or n <= s["device_count"]]
    args.work.mkdir(parents=True, exist_ok=True)
    rows = ["| part | setting | GPUs | result | figure | status |", "|---|---|---|---|---|---|"]
    failed = False

    def add(part, setting, gpus, result, figure, status):
        nonlocal failed
        failed |= status not in ("ok", "")
        rows.append(f"| {part} | {setting} | {gpus} | {result} | {figure} | {status} |")

    if "parity" in parts and 2 in counts:
        data = prep(args.work, s["parity_len"], 4 * s["parity_steps"] + 2)
        steps = range(1, s["parity_steps"] + 1)
        for stage in ("zero2", "zero3"):
            common = [f"deepspeed={stage}", "l2a=l2a", f"trainer.steps={s['parity_steps']}", "trainer.global_batch_size=4"]
            rc1, one = train(args.work, f"parity-{stage}-1", 1, s, data, *common)
            rc2, two = train(args.work, f"parity-{stage}-2", 2, s, data, *common)
            diff = rel_diff(two, one, steps)
            status = verdict(diff) if rc1 == rc2 == 0 else f"failed (rc {rc1}, {rc2})"
            add("parity", f"{stage}, {len(steps)} steps, 4 rows a step", "2 vs 1", "max relative LM-loss difference",
                "-" if diff is None else f"{diff:.2e} (tolerance {TOLERANCE:.0e})", status)
    if "scaling" in parts:
        data = prep(args.work, s["scale_len"], 4 * max(counts) * s["scale_steps"] + 2)
        for method, l2a in (("full", ["l2a=full"]), ("l2a", ["l2a=random", "l2a.random_rate=0.2"])):
            base = None
            for n in counts:
                rc, m = train(args.work, f"scale-{method}-{n}", n, s, data, *l2a, f"trainer.steps={s['scale_steps']}",
                              f"trainer.global_batch_size={4 * n}")
                timed = [r["tokens_per_s"] for k, r in m.items() if k > 1]
                if rc != 0 or not timed:
                    add("scaling", method, n, "tokens/s per GPU", "-", f"failed (rc {rc})")
                    continue
                per_gpu = sorted(timed)[len(timed) // 2] / n
                base = base or (per_gpu if n == 1 else None)
                eff = f", efficiency {per_gpu / base:.0%}" if base else ""
                add("scaling", f"{method}, {s['scale_len'] // 1024}K rows, ZeRO-2", n, "tokens/s per GPU",
                    f"{per_gpu:,.0f}{eff}", "ok")
    if "resume" in parts and 2 in counts:
        data = prep(args.work, s["parity_len"], 4 * 6 + 2)
        common = ["deepspeed=zero2", "l2a=l2a", "trainer.steps=6", "trainer.global_batch_size=4"]
        _, full = train(args.work, "resume-2-continuous", 2, s, data, *common)
        rc, _ = train(args.work, "resume-2-stopped", 2, s, data, *common, "trainer.stop_at=3")
        stopped = args.work / "runs" / "resume-2-stopped"
        for n in [c for c in (1, 4) if c <= (2 if args.tiny else s["device_count"])]:
            root = args.work / f"resume-on-{n}"
            shutil.rmtree(root, ignore_errors=True)
            shutil.copytree(stopped, root / "resume-2-stopped")
            rc_n, cont = train(args.work, "resume-2-stopped", n, s, data, *common, "trainer.universal_checkpoint=true",
                               run_root=root, fresh=False)
            diff = rel_diff({k: v for k, v in cont.items() if k > 3}, full, range(4, 7))
            status = verdict(diff) if rc == rc_n == 0 else f"failed (rc {rc}, {rc_n})"
            add("resume", "stopped at step 3 on 2, continued to 6", f"2 -> {n}",
                "max relative LM-loss difference, steps 4-6, vs the 2-GPU run",
                "-" if diff is None else f"{diff:.2e}", status)
    table = "\n".join(rows)
    print(table)
    if args.out:
        args.out.mkdir(parents=True, exist_ok=True)
        (args.out / "bench_multi_gpu.md").write_text(table + "\n")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
