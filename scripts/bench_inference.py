#!/usr/bin/env python
"""Time to first token (prefill) and KV-cache memory: full attention vs L2A vs pruned L2A.

A Qwen2.5-1.5B-shaped model with random weights (built from a config, no
download), bf16, batch 1, at 32K / 64K / 128K tokens, on one GPU:

    python scripts/bench_inference.py                      # the GPU run (defaults below)
    python scripts/bench_inference.py --shape tiny --lengths 256,512 --device cpu --dtype float32 \
        --repeats 1 --warmup 0                             # CPU smoke test (seconds)

Variants (`--variants`, comma-separated):
  full-hf   transformers' Qwen2ForCausalLM (SDPA; cuDNN / flash on CUDA): the baseline
  full      the same weights as an L2A model with every layer "global" (our attention path)
  l2a       every layer L2A; `--density` of the tokens routed to global attention. Random
            weights have no trained router, so routing is the "random" mode at that rate (the
            paper's trained routers skip ~80% of tokens: density 0.2)
  pruned    l2a with `--prune-fraction` of the layers (evenly spaced) pruned to SWA layers

TTFT = one prefill forward with the KV cache (`use_cache=True`, logits of the last position
only) plus the argmax of the first token, median of `--repeats` after `--warmup` runs, with
CUDA synchronisation. KV cache = bytes held by the returned cache (measured), next to the
analytic `kv_cache_bytes` for L2A models. Peak memory = the most allocated on the GPU during
the prefill, weights included. Prints one Markdown table (and writes JSON with --json).
"""

from __future__ import annotations

import gc
import json
import math
import platform
import statistics
import sys
import time

import torch
from transformers import AutoModelForCausalLM, Qwen2Config

import l2a_train  # noqa: F401  (registers the L2A Auto classes)
from l2a_train.model import convert_model, kv_cache_bytes, l2a_group, prune_layers
from l2a_train.model.cache import L2ACache, cache_field_name

from bench_common import SHAPES, parse, parser, sync

DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}
VARIANTS = ("full-hf", "full", "l2a", "pruned")


def parse_args(argv=None):
    p = parser(__doc__, VARIANTS, ",".join(VARIANTS), DTYPES)
    p.add_argument("--prune-fraction", type=float, default=0.5, help="fraction of layers pruned in 'pruned'")
    p.add_argument("--backend", default="auto", help="L2A attention backend: auto (kernels on CUDA) | reference | kernels")
    return parse(p, argv, VARIANTS, ("density", "prune_fraction"))


def cache_bytes(cache) -> int:
    if isinstance(cache, L2ACache):
        return cache.nbytes()["total"]
    total = 0
    for layer in getattr(cache, "layers", []):  # transformers' DynamicCache (5.17 and 5.24)
        for name in ("keys", "values"):
            t = getattr(layer, name, None)
            if isinstance(t, torch.Tensor):
                total += t.numel() * t.element_size()
    return total


@torch.no_grad()
def prefill(model, ids):
    out = model(input_ids=ids, use_cache=True, logits_to_keep=1)
    first = out.logits[:, -1].argmax(-1)
    cache = out.get(cache_field_name())
    return first, cache


def measure(model, length: int, args, device) -> dict:
    gen = torch.Generator().manual_seed(args.seed + length)
    ids = torch.randint(0, model.config.vocab_size, (1, length), generator=gen).to(device)
    for _ in range(args.warmup):
        prefill(model, ids)
    times, kv = [], None
    for i in range(args.repeats):
        gc.collect()
        if device.type == "cuda":
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats(device)
        sync(device)
        start = time.perf_counter()
        first, cache = prefill(model, ids)
        first.item()
        sync(device)
        times.append(time.perf_counter() - start)
        kv = cache_bytes(cache)
        del cache, first
    peak = torch.cuda.max_memory_allocated(device) if device.type == "cuda" else None
    analytic = None
    if hasattr(model.config, "l2a_layer_types"):
        analytic = kv_cache_bytes(model.config, length, dtype=model.dtype)
    return dict(ttft_s=statistics.median(times), times_s=times, kv_bytes=kv, kv_bytes_analytic=analytic, peak_bytes=peak)


def build_base(args, device, dtype):
    shape = dict(SHAPES[args.shape])
    if args.layers:
        shape["num_hidden_layers"] = args.layers
    if max(args.lengths) > shape["max_position_embeddings"]:
        shape["max_position_embeddings"] = max(args.lengths)
    rope = shape.pop("rope_theta")
    config = Qwen2Config(**shape)
    config.rope_parameters = {**(config.rope_parameters or {}), "rope_theta": rope}
    torch.manual_seed(args.seed)
    with torch.device(device):
        model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    return model.eval()


def l2a_from(base, args, device, mode: str):
    cfg = l2a_group(mode, [f"window={args.window}", f"random_rate={args.density}", f"backend={args.backend}"])
    with torch.device(device):
        model = convert_model(base, cfg)
    return model.to(device).eval()


def pruned_layers(num_layers: int, fraction: float) -> list[int]:
    k = round(fraction * num_layers)
    return sorted({int(i * num_layers / k) for i in range(k)}) if k else []


def fmt_bytes(n) -> str:
    if n is None:
        return "-"
    mib = n / 2**20
    return f"{mib:,.0f}" if mib >= 100 else f"{mib:.2f}"


def table(rows: list[dict]) -> str:
    base = {r["length"]: r for r in rows if r["variant"] == "full-hf"}
    lines = [
        "| variant | length | TTFT (s) | speed-up vs full-hf | KV cache (MiB) | KV vs full-hf | analytic KV (MiB) | peak memory (GiB) |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        ref = base.get(r["length"])
        speed = f"{ref['ttft_s'] / r['ttft_s']:.2f}x" if ref else "-"
        kv_ratio = f"{100 * r['kv_bytes'] / ref['kv_bytes']:.1f}%" if ref and ref["kv_bytes"] else "-"
        peak = "-" if r["peak_bytes"] is None else f"{r['peak_bytes'] / 2**30:.1f}"
        lines.append(
            f"| {r['label']} | {r['length']:,} | {r['ttft_s']:.3f} | {speed} | {fmt_bytes(r['kv_bytes'])} | {kv_ratio} "
            f"| {fmt_bytes(r['kv_bytes_analytic'])} | {peak} |"
        )
    return "\n".join(lines)


def main(argv=None) -> int:
    args = parse_args(argv)
    device, dtype = torch.device(args.device), DTYPES[args.dtype]
    import transformers

    gpu = torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor() or "cpu"
    print(f"# inference benchmark: {args.shape}, {args.dtype}, batch 1, on {gpu}", file=sys.stderr)
    print(f"# torch {torch.__version__}, transformers {transformers.__version__}; command: {' '.join(sys.argv)}",
          file=sys.stderr)
    rows = []

    def run(label, variant, model):
        for length in args.lengths:
            result = measure(model, length, args, device)
            rows.append(dict(variant=variant, label=label, length=length, **result))
            print(f"  {label} at {length}: {result['ttft_s']:.3f} s", file=sys.stderr, flush=True)

    base = build_base(args, device, dtype)
    n = base.config.num_hidden_layers
    if "full-hf" in args.variants:
        run("full attention (transformers Qwen2, SDPA)", "full-hf", base)
    if "full" in args.variants:
        model = l2a_from(base, args, device, "full")
        run("full attention (L2A code, all layers global)", "full", model)
        del model
    if "l2a" in args.variants or "pruned" in args.variants:
        model = l2a_from(base, args, device, "random")
        del base
        gc.collect()
        if "l2a" in args.variants:
            run(f"L2A ({n} layers, density {args.density:g}, W={args.window})", "l2a", model)
        if "pruned" in args.variants:
            layers = pruned_layers(n, args.prune_fraction)
            prune_layers(model, layers)
            run(f"pruned L2A ({len(layers)} of {n} layers SWA)", "pruned", model)
    print(table(rows))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(dict(args=vars(args), device=gpu, rows=rows), f, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
