#!/usr/bin/env python
"""The real trainer's speed and memory: `l2a-prep` data, `l2a-train` runs, one Markdown table.

Unlike scripts/bench_train.py (a proxy: one training step in a loop, torch AdamW, one document
per row), every figure here comes from the commands a user runs: `l2a-prep` writes the rows,
`l2a-train` (DeepSpeed, the configured ZeRO stage, bf16, gradient checkpointing, the fused
loss) trains on them, and the numbers are read from the run's metrics.jsonl and log:

    python scripts/bench_trainer.py --suite packed_1_5b --work /tmp/bt   # Qwen2.5-1.5B shape, 32K and 128K, two layouts
    python scripts/bench_trainer.py --suite one_gpu_8b --work /tmp/bt    # Qwen3-8B / Qwen2.5-7B shapes at 128K and longer
    python scripts/bench_trainer.py --suite tiny --work /tmp/bt          # CPU smoke test (the test suite runs it)
    python scripts/bench_trainer.py --suite one_gpu_8b --cases 8b-l2a-128k   # some cases only

Layouts (written by `l2a-prep` from the built-in synthetic retrieval documents, 4096-token BPE):
  long     one long document per row: documents of 4-8 rows, so a row is one document except
           where a document ends (the table gives the share of single-document rows)
  mixture  as long-context recipes mix: half of the tokens in documents of 4-8 rows, half in
           documents of about 1K-8K tokens packed together

Columns: rows per step = rows per optimizer step (the 32K cases: the experiment's own global
batch of 32, as a run of it trains; 128K: one); tokens/s = the median of `tokens_per_s` over the steps after `--warmup` (each step
CUDA-synchronised by the trainer), and beside it the steps' tokens over their summed time (rows
differ: one that holds a document boundary trains faster, so the two can differ); peak = the most memory allocated on the GPU in any step
(torch.cuda.max_memory_allocated) next to the memory plan's prediction from the run's log;
start-up = seconds from launching `l2a-train` to the start of its first step (launch time to
the first metrics line, less that step's time). Models have random weights built from a
config; routing is `l2a=random` at 0.2 (the learned router's routed fraction depends on
training; the `learned` cases train it from zero on one-row steps, then time runs that start from
those weights, at 32K and as the experiment's next stage at 128K, and report the fraction they
reached).
"""

from __future__ import annotations

import argparse
import json
import os
import re
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

QWEN2_5_1_5B = ("{vocab_size: 151936, hidden_size: 1536, intermediate_size: 8960, num_hidden_layers: 28, "
                "num_attention_heads: 12, num_key_value_heads: 2, max_position_embeddings: 131072, "
                "rope_theta: 5000000.0, rms_norm_eps: 1.0e-6, tie_word_embeddings: true}")
QWEN3_8B = ("{vocab_size: 151936, hidden_size: 4096, intermediate_size: 12288, num_hidden_layers: 36, "
            "num_attention_heads: 32, num_key_value_heads: 8, head_dim: 128, max_position_embeddings: 262144, "
            "rope_theta: 5000000.0, rms_norm_eps: 1.0e-6, tie_word_embeddings: false}")
QWEN2_5_7B = ("{vocab_size: 152064, hidden_size: 3584, intermediate_size: 18944, num_hidden_layers: 28, "
              "num_attention_heads: 28, num_key_value_heads: 4, max_position_embeddings: 262144, "
              "rope_theta: 5000000.0, rms_norm_eps: 1.0e-6, tie_word_embeddings: false}")
TINY = ("{vocab_size: 4096, hidden_size: 64, intermediate_size: 128, num_hidden_layers: 2, num_attention_heads: 4, "
        "num_key_value_heads: 2, head_dim: 16, max_position_embeddings: 4096, rope_theta: 10000.0}")

METHODS = {
    "full": ["l2a=full"],
    "l2a": ["l2a=random", "l2a.random_rate=0.2"],
    "learned": ["l2a=l2a"],
}


def case(name, model, family, experiment, method, layout, seq_len, steps=4, batch=1, extra=(), init_from=None,
         saves=False):
    """batch: rows per optimizer step, or "experiment" for the experiment's own global batch (a run
    of the experiment pays the optimizer step's fixed cost once per that many rows). init_from: an
    earlier case of the same invocation whose weights this one starts from (trainer.init_from, as a
    user starts the next stage of a curriculum); that case must have saves=True."""
    if batch == "experiment":
        batch = experiment_batch(experiment)
    return dict(name=name, model=model, family=family, experiment=experiment, method=method, layout=layout,
                seq_len=seq_len, steps=steps, batch=batch, extra=list(extra), init_from=init_from, saves=saves)


def experiment_batch(experiment: str) -> int:
    """trainer.global_batch_size of configs/experiment/<experiment>.yaml."""
    from omegaconf import OmegaConf

    return int(OmegaConf.load(ROOT / "configs" / "experiment" / f"{experiment}.yaml").trainer.global_batch_size)


def suites() -> dict[str, list[dict]]:
    # Qwen2.5-1.5B shape. 32K rows: the experiment's global batch (32 rows per optimizer step), 2
    # steps, the second timed (one step is 32 rows, about 1M tokens; the first holds the kernels'
    # compilation). 128K rows: one row per step, 4 steps (a 32-row step there takes 2.5-5 minutes;
    # the optimizer step's fixed cost, about 0.1-0.2 s, is 2-4% of a one-row step at 128K).
    packed = []
    for seq in (32768, 131072):
        k = seq // 1024
        steps, batch = (2, "experiment") if seq == 32768 else (4, 1)
        for layout in ("long", "mixture"):
            for method in ("full", "l2a"):
                packed.append(case(f"1.5b-{method}-{layout}-{k}k", "qwen2.5-1.5b", "qwen2", "qwen2_5_1_5b_32k",
                                   method, layout, seq, steps=steps, batch=batch))
    # The learned router (l2a=l2a, from zero): trained on one-row steps until its routed fraction
    # settles, then timed as a run of the experiment (its global batch) and as the experiment's
    # next stage at 128K rows (trainer.init_from), both from those weights
    learned = ["trainer.lr=1e-4"]
    packed += [
        case("1.5b-learned-long-32k-train", "qwen2.5-1.5b", "qwen2", "qwen2_5_1_5b_32k", "learned", "long", 32768,
             steps=30, extra=learned, saves=True),
        case("1.5b-learned-long-32k", "qwen2.5-1.5b", "qwen2", "qwen2_5_1_5b_32k", "learned", "long", 32768,
             steps=2, batch="experiment", extra=learned, init_from="1.5b-learned-long-32k-train"),
        case("1.5b-learned-long-128k", "qwen2.5-1.5b", "qwen2", "qwen2_5_1_5b_32k", "learned", "long", 131072,
             steps=4, extra=learned, init_from="1.5b-learned-long-32k-train"),
        case("1.5b-learned-mixture-128k", "qwen2.5-1.5b", "qwen2", "qwen2_5_1_5b_32k", "learned", "mixture", 131072,
             steps=4, extra=learned, init_from="1.5b-learned-long-32k-train"),
        case("1.5b-learned-mixture-32k", "qwen2.5-1.5b", "qwen2", "qwen2_5_1_5b_32k", "learned", "mixture", 32768,
             steps=30, extra=learned),
    ]
    big = [
        # 4 steps: steps 2-4 timed (their rows differ: the third holds a document boundary)
        case("8b-l2a-128k", "qwen3-8b", "qwen3", "qwen3_8b_128k_1gpu", "l2a", "long", 131072, steps=4),
        case("7b-l2a-128k", "qwen2.5-7b", "qwen2", "qwen2_5_7b_128k_1gpu", "l2a", "long", 131072, steps=4),
        case("8b-full-128k", "qwen3-8b", "qwen3", "qwen3_8b_128k_1gpu", "full", "long", 131072, steps=4),
        # the longest rows: the memory plan (trainer.dry_run) predicts 148 / 176 GiB at 192K / 256K
        # with the optimizer on the GPU, 103 / 131 GiB with it offloaded to the CPU
        # (and with the experiment's 6 layers keeping attention outputs, 121 GiB at 192K; at 256K none keep)
        *(case(f"8b-l2a-{n // 1024}k", "qwen3-8b", "qwen3", "qwen3_8b_128k_1gpu", "l2a", "long", n, steps=3,
               extra=["model.max_position_embeddings=262144",
                      "+deepspeed.zero_optimization.offload_optimizer={device: cpu, pin_memory: true}",
                      *(["trainer.keep_attention_outputs=false"] if n > 196608 else [])])
          for n in (196608, 262144)),
    ]
    tiny = [case("tiny-l2a-long", "tiny", "qwen3", "quickstart", "l2a", "long", 1024, steps=3),
            case("tiny-full-mixture", "tiny", "qwen3", "quickstart", "full", "mixture", 1024, steps=3),
            case("tiny-learned-train", "tiny", "qwen3", "quickstart", "learned", "long", 1024, steps=2, saves=True),
            case("tiny-learned-next", "tiny", "qwen3", "quickstart", "learned", "long", 1024, steps=2, batch=2,
                 init_from="tiny-learned-train")]
    return {"packed_1_5b": packed, "one_gpu_8b": big, "tiny": tiny}


SHAPES = {"qwen2.5-1.5b": QWEN2_5_1_5B, "qwen3-8b": QWEN3_8B, "qwen2.5-7b": QWEN2_5_7B, "tiny": TINY}


def command(name: str) -> list[str]:
    exe = ROOT / ".venv" / "bin" / name
    return [str(exe)] if exe.exists() else [name]


def prep_layout(work: Path, layout: str, seq_len: int, rows: int, log) -> Path:
    """Rows written by l2a-prep (reused when present: a rerun of the same settings resumes; other
    row counts get their own folder, since l2a-prep refuses to change a prepared one)."""
    out = work / "data" / f"{layout}-{seq_len}-{rows}"
    chars = 3 * seq_len  # the built-in BPE takes about 3 characters per token of retrieval text
    long_docs = ["type: retrieval", f"length: [{4 * chars}, {8 * chars}]"]
    args = [f"output={out}", f"seq_len={seq_len}", f"max_tokens={rows * seq_len}", "workers=4",
            f"tokenizer.train.cache_dir={work / 'tokenizers'}", "tokenizer.estimate_chars=200000",
            "tokenizer.train.sample_chars=1000000", "~sources.code", "~sources.retrieval"]
    n_long = max(4, rows // 3)
    if layout == "long":
        args += ["+sources.long={" + ", ".join(long_docs + [f"num_docs: {n_long}"]) + "}", "mixture=[long@1.0]"]
    else:  # about 1K-8K tokens each
        args += ["+sources.long={" + ", ".join(long_docs + [f"num_docs: {n_long}"]) + "}",
                 "+sources.short={type: retrieval, num_docs: " + str(max(50, rows * seq_len // 2000)) +
                 ", length: [3000, 24000], seed: 1}", "mixture=[long@0.5,short@0.5]"]
    log(f"l2a-prep {layout} {seq_len}: {out}")
    with open(work / f"prep-{out.name}.log", "w") as prep_log:
        subprocess.run(command("l2a-prep") + ["prep=quickstart"] + args, check=True, cwd=ROOT, stdout=prep_log,
                       stderr=subprocess.STDOUT)
    return out


def layout_stats(data: Path, seq_len: int) -> dict:
    """Share of single-document rows and the median document length, from the prepared rows."""
    from l2a_train.data import PackedDataset

    dataset = PackedDataset(str(data), seq_len=seq_len)
    single, lengths = 0, []
    for i in range(len(dataset)):
        starts = [int(s) for s in dataset.row(i)[1]]
        end = dataset.padding_start(i)
        single += len(starts) == 1
        bounds = [s for s in starts if s < end] + [end]
        lengths += [b - a for a, b in zip(bounds, bounds[1:])]
    return {"rows": len(dataset), "single_doc_rows": single / max(1, len(dataset)),
            "median_doc_tokens": int(statistics.median(lengths)) if lengths else 0}


def runs_root(work: Path) -> Path:
    """Where the cases' `l2a-train` runs go (`run_root`): <work>/runs/<case name>."""
    return work / "runs"


def run_case(c: dict, data: Path, work: Path, warmup: int, timeout: int, log, profile: bool = False) -> dict:
    run_root = runs_root(work)
    args = [f"experiment={c['experiment']}", f"model.family={c['family']}", "model.path=null",
            f"model.config={SHAPES[c['model']]}", f"data.path={data}", f"data.seq_len={c['seq_len']}", *METHODS[c["method"]],
            f"trainer.steps={c['steps']}", "trainer.warmup_steps=1", f"trainer.global_batch_size={c['batch']}",
            "trainer.micro_batch_size=1", "trainer.save_every=0", f"trainer.save_final={str(c['saves']).lower()}",
            "trainer.export_hf=false", "trainer.log_every=1", "trainer.resume=never",
            f"run_root={run_root}", f"name={c['name']}", *c["extra"]]
    if c["init_from"]:
        args.append(f"trainer.init_from={run_root / c['init_from']}")
    profiled = c["steps"] if profile else None  # the last step, left out of the median
    if profiled:
        args.append(f"trainer.profile_step={profiled}")
    run_dir = run_root / c["name"]
    metrics = run_dir / "metrics.jsonl"
    log_path = work / f"{c['name']}.log"
    log(f"l2a-train {c['name']}")
    first_line = {}

    def watch():  # when the first step's metrics appear
        while "t" not in first_line and not first_line.get("done"):
            if metrics.is_file() and metrics.stat().st_size > 0:
                first_line["t"] = time.perf_counter()
            time.sleep(0.2)

    if metrics.exists():
        metrics.unlink()
    started = time.perf_counter()
    threading.Thread(target=watch, daemon=True).start()
    with open(log_path, "w") as out:
        try:
            rc = subprocess.run(command("l2a-train") + args, cwd=ROOT, stdout=out, stderr=subprocess.STDOUT,
                                timeout=timeout).returncode
        except subprocess.TimeoutExpired:
            rc = "timeout"
    first_line["done"] = True
    text = log_path.read_text(errors="replace")
    predicted = re.findall(r"\*\*predicted peak\*\* \| \*\*([0-9.]+)\*\*", text)
    records = [json.loads(line) for line in metrics.read_text().splitlines()] if metrics.is_file() else []
    records = [r for r in records if "tokens_per_s" in r]
    timed = [r for r in records if r["step"] > warmup and r["step"] != profiled]
    result = dict(c, rc=rc, steps_done=len(records), timed_steps=len(timed),
                  predicted_gib=float(predicted[-1]) if predicted else None)
    if not timed:  # too few steps for the warm-up and the profile: every step, and the table says so
        timed = records
        result["note"] = "no step after the warm-up: all steps timed"
    if profiled and (run_dir / f"profile-step{profiled}.md").is_file():
        result["profile"] = str(run_dir / f"profile-step{profiled}.md")
    if records:
        result.update(
            tokens_per_s=statistics.median(r["tokens_per_s"] for r in timed),
            tokens_per_s_overall=sum(r["tokens_per_s"] * r["step_time_s"] for r in timed) / sum(r["step_time_s"] for r in timed),
            # every step, so a median and an overall rate that differ can be read (a slow step: a
            # compile, a dense-path draw, the profiled step)
            per_step=[{"step": r["step"], "tokens_per_s": r["tokens_per_s"], "step_time_s": r["step_time_s"]}
                      for r in records],
            peak_gib=max(r["peak_mem_gib"] for r in records),
            routed=records[-1]["routed_fraction"],
            startup_s=(first_line["t"] - started - records[0]["step_time_s"]) if "t" in first_line else None,
        )
    if rc != 0:
        lines = [ln for ln in text.splitlines() if ln.startswith("error:") or "Error" in ln]
        result["error"] = (lines or text.splitlines()[-1:] or ["?"])[-1][:200]
    return result


def table(results: list[dict], layouts: dict) -> str:
    """One row per case; "vs full" against full attention on the same model, rows, layout and rows
    per optimizer step."""
    def key(r):
        return r["model"], r["layout"], r["seq_len"], r["batch"]

    full = {key(r): r.get("tokens_per_s") for r in results if r["method"] == "full"}
    lines = ["| case | model | rows | rows per step | layout (single-document rows, median document) | attention | routed | "
             "tokens/s | over the steps | vs full | peak GiB (plan) | start-up s |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in results:
        st = layouts.get((r["layout"], r["seq_len"]), {})
        where = f"{r['layout']} ({st.get('single_doc_rows', 0):.0%}, {st.get('median_doc_tokens', 0)} tokens)"
        if r.get("note") and "tokens_per_s" in r:
            where += f" [{r['note']}]"
        method = r["method"] + (f" (from {r['init_from']})" if r.get("init_from") else "")
        head = f"| {r['name']} | {r['model']} | {r['seq_len'] // 1024}K | {r['batch']} | {where} | {method} |"
        if "tokens_per_s" not in r:
            lines.append(f"{head} - | failed ({r['rc']}): {r.get('error', '')} | | | | |")
            continue
        base = full.get(key(r))
        ratio = f"{r['tokens_per_s'] / base:.2f}x" if base and r["method"] != "full" else ""
        plan = f" ({r['predicted_gib']:.1f})" if r.get("predicted_gib") is not None else ""
        start = f"{r['startup_s']:.0f}" if r.get("startup_s") is not None else "-"
        lines.append(f"{head} {r['routed']:.2f} | {r['tokens_per_s']:,.0f} | {r['tokens_per_s_overall']:,.0f} | "
                     f"{ratio} | {r['peak_gib']:.1f}{plan} | {start} |")
    return "\n".join(lines)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--suite", choices=sorted(suites()), required=True)
    p.add_argument("--cases", default=None, help="comma-separated case names (default: the whole suite)")
    p.add_argument("--work", type=Path, required=True, help="data, runs and logs go here")
    p.add_argument("--warmup", type=int, default=1, help="steps left out of the median")
    p.add_argument("--timeout", type=int, default=600, help="seconds per l2a-train run")
    p.add_argument("--out", type=Path, default=None, help="also write the table (.md) and results (.json) here")
    p.add_argument("--steps", type=int, default=None, help="optimizer steps of every case (default: each case's own)")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="an l2a-train override appended to every case (repeatable), e.g. --set trainer.keep_attention_outputs=false")
    p.add_argument("--profile", action="store_true",
                   help="profile each case's last step (trainer.profile_step; left out of the median): "
                        "<run dir>/profile-step<N>.md, copied to --out as <case>-profile.md")
    args = p.parse_args(argv)
    chosen = suites()[args.suite]
    if args.cases:
        names = args.cases.split(",")
        unknown = sorted(set(names) - {c["name"] for c in chosen})
        if unknown:
            p.error(f"--cases: unknown {unknown}; the suite has {[c['name'] for c in chosen]}")
        chosen = [c for c in chosen if c["name"] in names]
    for i, c in enumerate(chosen):  # a case that starts from another needs it first, or its saved run
        if c["init_from"] and c["init_from"] not in [c2["name"] for c2 in chosen[:i]] and not (
                runs_root(args.work) / c["init_from"] / "checkpoints").is_dir():
            p.error(f"--cases: {c['name']} starts from {c['init_from']}'s weights; add {c['init_from']} "
                    f"before it (no saved run of it under {runs_root(args.work)})")
    chosen = [dict(c, steps=args.steps or c["steps"], extra=c["extra"] + args.overrides) for c in chosen]
    args.work.mkdir(parents=True, exist_ok=True)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("WANDB_MODE", "offline")

    def log(msg):
        print(f"[bench_trainer {time.strftime('%H:%M:%S')}] {msg}", flush=True)

    data, layouts, results = {}, {}, []
    for c in chosen:
        key = (c["layout"], c["seq_len"])
        if key not in data:
            rows = max(c2["steps"] * c2["batch"] for c2 in chosen if (c2["layout"], c2["seq_len"]) == key) + 2
            data[key] = prep_layout(args.work, c["layout"], c["seq_len"], rows, log)
            layouts[key] = layout_stats(data[key], c["seq_len"])
        results.append(run_case(c, data[key], args.work, args.warmup, args.timeout, log, args.profile))
        log(json.dumps({k: v for k, v in results[-1].items() if k not in ("extra",)}))
        md = table(results, layouts)
        if args.out:  # after every case: a suite stopped by a time limit keeps what it measured
            args.out.mkdir(parents=True, exist_ok=True)
            (args.out / f"bench_trainer_{args.suite}.md").write_text(md + "\n")
            (args.out / f"bench_trainer_{args.suite}.json").write_text(json.dumps(results, indent=2) + "\n")
            if results[-1].get("profile"):
                (args.out / f"{c['name']}-profile.md").write_text(Path(results[-1]["profile"]).read_text())
    print(md)
    return 0 if all(r["rc"] == 0 for r in results) else 1


if __name__ == "__main__":
    sys.exit(main())
