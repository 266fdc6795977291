#!/usr/bin/env python
"""Training throughput and peak memory: full attention vs L2A, one GPU.

A proxy of one training step (not the trainer: scripts/bench_trainer.py times l2a-train itself): a Qwen2.5-1.5B-shaped model with random weights (built from a config, no
download), bf16, batch 1, gradient checkpointing, at 32K / 64K / 128K tokens per row:

    python scripts/bench_train.py                                   # the GPU run (defaults below)
    python scripts/bench_train.py --shape tiny --lengths 256 --device cpu --dtype float32 \
        --repeats 1 --warmup 0                                      # CPU smoke test (seconds)

One training step = what l2a-train does per micro-batch on one GPU: forward through the model,
the fused linear cross-entropy (liger on CUDA) plus the router regularizer, backward, gradient
clipping and a fused AdamW step (parameters and optimizer state in `--dtype`; the trainer's
DeepSpeed bf16 mode adds fp32 master weights, which changes memory, not attention time).

Variants (`--variants`, comma-separated):
  full-hf   transformers' Qwen2ForCausalLM, SDPA forced to cuDNN on CUDA: the baseline
  full      the same weights as an L2A model with every layer "global" (our kernels)
  l2a       every layer L2A, W=`--window`; random weights have no trained router, so routing is
            the "random" mode at `--density` (the paper's trained routers route ~20%), and the
            stochastic dense path runs with probability `--p-dense` per layer call, as in training
  a `:keep` suffix (e.g. `l2a:keep`, `full-hf:keep`) keeps the attention outputs through
  checkpointing (trainer.keep_attention_outputs, l2a_train.model.checkpointing) instead of
  recomputing them in the backward.

tokens/s = row length x `--repeats` / the total time of those steps after `--warmup` steps
(CUDA synchronised): the long-run rate, which counts the random dense-path layers at their
drawn frequency (the table gives the number drawn per timed step; the expectation is
p_dense x layers). Peak memory = the most allocated on the GPU during the timed steps. Prints
one Markdown table (and writes JSON with --json).
"""

from __future__ import annotations

import contextlib
import gc
import json
import platform
import statistics
import sys
import time

import torch
from omegaconf import OmegaConf

import l2a_train  # noqa: F401  (registers the L2A Auto classes)
from l2a_train.training.loss import linear_cross_entropy
from l2a_train.model import apply_trainable, convert_model, l2a_group
from l2a_train.model.checkpointing import enable_checkpointing
from l2a_train.model.convert import build_base
from l2a_train.model.layer import dense_path_drawn
from l2a_train.training.engine import CausalLMWithLoss

from bench_common import SHAPES, parse, parser, sync

VARIANTS = ("full-hf", "full", "l2a")


def parse_args(argv=None):
    p = parser(__doc__, VARIANTS, "full-hf,l2a", ("bfloat16", "float32"))
    p.add_argument("--p-dense", type=float, default=0.1, help="probability of the dense global path per layer call")
    p.add_argument("--trainable", default="all", help="all | paper (attention, norms, router) for the L2A variants")
    p.add_argument("--no-grad-checkpointing", action="store_true")
    p.add_argument("--profile", default=None, metavar="DIR",
                   help="also profile one step per variant and length: DIR/<variant>-<length>.txt (top ops by device time)")
    return parse(p, argv, VARIANTS, ("density", "p_dense"), suffixes=(":keep",))


def model_cfg(args):
    shape = dict(SHAPES[args.shape])
    if args.layers:
        shape["num_hidden_layers"] = args.layers
    shape["max_position_embeddings"] = max(shape["max_position_embeddings"], max(args.lengths))
    return OmegaConf.create(dict(family="qwen2", seed=args.seed, dtype=args.dtype, config=shape))


def sdpa_backend(device):
    """cuDNN for the baseline, as in the issue's measured numbers (FlashAttention-2 is ~1.7x slower here)."""
    if device.type != "cuda":
        return contextlib.nullcontext()
    from torch.nn.attention import SDPBackend, sdpa_kernel

    return sdpa_kernel([SDPBackend.CUDNN_ATTENTION])


def make_step(variant, model, args, device):
    """One optimizer step on a row of `length` random tokens; returns a function of (ids, step)."""
    if not args.no_grad_checkpointing:
        enable_checkpointing(model, keep_attention=variant.endswith(":keep"))
    model.config.use_cache = False
    model.train()
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=1e-5, fused=device.type == "cuda")

    if variant.startswith("full-hf"):
        def loss_of(ids, step):
            with sdpa_backend(device):
                hidden = model.model(input_ids=ids).last_hidden_state
                return linear_cross_entropy(hidden[:, :-1], model.lm_head.weight, ids[:, 1:])
    else:
        module = CausalLMWithLoss(model)

        def loss_of(ids, step):
            model.set_routing_step(step)
            labels = torch.cat([ids[:, 1:], torch.full_like(ids[:, :1], -100)], 1)
            pos = torch.arange(ids.shape[1], device=device)[None]
            return module(ids, pos, labels, 1.0 / ids.numel(), 1e-8)[0]

    def step(ids, i):
        loss = loss_of(ids, i)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        return loss.detach()

    return step


def measure(step, vocab, length, args, device) -> dict:
    gen = torch.Generator().manual_seed(args.seed + length)
    ids = torch.randint(0, vocab, (1, length), generator=gen).to(device)
    i = 0
    for i in range(args.warmup):
        step(ids, i).item()
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    times = []
    for j in range(args.repeats):
        sync(device)
        start = time.perf_counter()
        loss = step(ids, args.warmup + j).item()
        sync(device)
        times.append(time.perf_counter() - start)
    peak = torch.cuda.max_memory_allocated(device) if device.type == "cuda" else None
    t = sum(times) / len(times)
    if args.profile:
        name = args.variant_now.replace(":", "-")  # no ':' in file names
        profile_step(step, ids, args.warmup + args.repeats, device, f"{args.profile}/{name}-{length}.txt")
    return dict(step_s=t, median_step_s=statistics.median(times), times_s=times, tokens_per_s=length / t,
                peak_bytes=peak, loss=loss)


def dense_layers_per_step(variant, model, args) -> float | None:
    """Dense-path layer calls drawn per timed step (the draws are a function of step and layer)."""
    if not variant.startswith("l2a"):
        return None
    layers = range(model.config.num_hidden_layers)
    steps = range(args.warmup, args.warmup + args.repeats)
    return sum(dense_path_drawn(args.p_dense, s, i) for s in steps for i in layers) / len(steps)


def profile_step(step, ids, i, device, path):
    """Top operators of one step by device time (self time; includes the backward's recompute)."""
    import os

    from torch.profiler import ProfilerActivity, profile

    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    with profile(activities=activities) as prof:
        step(ids, i).item()
        sync(device)
    key = "self_cuda_time_total" if device.type == "cuda" else "self_cpu_time_total"
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    with open(path, "w") as f:
        f.write(prof.key_averages().table(sort_by=key, row_limit=40, max_name_column_width=70))
        f.write("\n\nby host time (synchronisations show up here):\n")
        f.write(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=25, max_name_column_width=70))


def build(variant, args, device):
    cfg = model_cfg(args)
    with torch.device(device):
        base = build_base(cfg)
        if variant.startswith("full-hf"):
            return base
        mode = "full" if variant.startswith("full") else "random"
        l2a = l2a_group(mode, [f"window={args.window}", f"random_rate={args.density}", f"p_dense={args.p_dense}",
                               "backend=auto"])
        model = convert_model(base, l2a)
    del base
    apply_trainable(model, args.trainable)
    return model.to(device)


def table(rows: list[dict]) -> str:
    base = {r["length"]: r for r in rows if r["variant"] == "full-hf"}
    lines = ["| variant | length | step (s) | tokens/s | speed-up vs full-hf | dense layers / step | peak memory (GiB) |",
             "|---|---|---|---|---|---|---|"]
    for r in rows:
        ref = base.get(r["length"])
        speed = f"{r['tokens_per_s'] / ref['tokens_per_s']:.2f}x" if ref and "error" not in ref else "-"
        if "error" in r:
            lines.append(f"| {r['label']} | {r['length']:,} | failed: {r['error']} | - | - | - | - |")
            continue
        peak = "-" if r["peak_bytes"] is None else f"{r['peak_bytes'] / 2**30:.1f}"
        dense = "-" if r.get("dense_layers_per_step") is None else f"{r['dense_layers_per_step']:.1f}"
        lines.append(f"| {r['label']} | {r['length']:,} | {r['step_s']:.3f} | {r['tokens_per_s']:,.0f} | {speed} "
                     f"| {dense} | {peak} |")
    return "\n".join(lines)


def main(argv=None) -> int:
    args = parse_args(argv)
    device = torch.device(args.device)
    import transformers

    gpu = torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor() or "cpu"
    print(f"# training benchmark: {args.shape}, {args.dtype}, batch 1, on {gpu}", file=sys.stderr)
    print(f"# torch {torch.__version__}, transformers {transformers.__version__}; command: {' '.join(sys.argv)}",
          file=sys.stderr)
    labels = {"full-hf": "full attention (transformers Qwen2, cuDNN SDPA)",
              "full": "full attention (L2A code, all layers global)",
              "l2a": f"L2A (density {args.density:g}, p_dense {args.p_dense:g}, W={args.window})"}
    labels.update({f"{v}:keep": f"{label}, attention kept" for v, label in labels.items()})
    rows = []
    for variant in args.variants:
        model = build(variant, args, device)
        step = make_step(variant, model, args, device)
        args.variant_now = variant
        for length in args.lengths:
            row = dict(variant=variant, label=labels[variant], length=length,
                       dense_layers_per_step=dense_layers_per_step(variant, model, args))
            try:
                row.update(measure(step, model.config.vocab_size, length, args, device))
                print(f"  {variant} at {length}: {row['step_s']:.3f} s/step, {row['tokens_per_s']:,.0f} tokens/s",
                      file=sys.stderr, flush=True)
            except torch.OutOfMemoryError:
                row["error"] = "out of memory"
                print(f"  {variant} at {length}: out of memory", file=sys.stderr, flush=True)
            rows.append(row)
            gc.collect()
            if device.type == "cuda":
                torch.cuda.empty_cache()
        del model, step
        gc.collect()
        if device.type == "cuda":
            torch.cuda.empty_cache()
    print(table(rows))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(dict(args=vars(args), device=gpu, torch=torch.__version__,
                           transformers=transformers.__version__, rows=rows), f, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
