"""Benchmark: python -m l2a_kernels.bench [--lengths 32768,65536] [--shapes 28/4/128] [--tune] ...

Prints one markdown table: for each head shape (HQ/H/D) and length, forward and forward+backward
times of torch SDPA causal (cuDNN and FlashAttention backends, K/V expanded to HQ heads outside
the timed region), sliding_window_attention (W=4096), conditional_attention and the whole L2A
attention (SWA + compaction + conditional, separate q/k/v as in the layer) at each routed
fraction (tokens chosen uniformly at random), with ratios to cuDNN. bf16, one document.

--documents N also times full causal attention over rows packed with documents of N tokens (the
last one shorter), each token attending to its own document only, three ways: conditional_attention
at density 1 with the documents' bounds (what the trainer runs for full attention on packed rows),
FlexAttention with a causal + document mask (compiled, the block mask built once and its build
timed apart) and SDPA cuDNN called per document. A diagnostic for the fastest document-masked
full attention, not the trainer's figure.

--tune first times a few launch configs and switches per kernel at one size and prints the
winning LaunchPlan of each head shape, which the rest of the run passes to the ops (to make it
the default, copy it into l2a_kernels.plan). --check compares the kernels, under the plans the
run uses, with the float32 reference on the GPU before timing.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import statistics
import sys
import time

import torch
import torch.nn.functional as F

from . import _triton_attn, reference
from .ops import conditional_attention, document_bounds, routed_tokens, sliding_window_attention
from .plan import KernelConfig, default_plan


DTYPE = torch.bfloat16
DEV = "cuda"  # "cpu" only for a smoke test of this script under TRITON_INTERPRET=1


def _sync():
    if DEV == "cuda":
        torch.cuda.synchronize()


def _timer(fn, budget_ms=400.0, min_reps=3, max_reps=20):
    """Median milliseconds of fn() after two warm-up calls; reps chosen from the warm-up time."""
    fn()  # the first call may include compilation
    _sync()
    t0 = time.perf_counter()
    fn()
    _sync()
    est = (time.perf_counter() - t0) * 1e3
    reps = int(min(max_reps, max(min_reps, budget_ms // max(est, 1e-3))))
    times = []
    for _ in range(reps):
        if DEV == "cuda":
            a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            a.record()
            fn()
            b.record()
            b.synchronize()
            times.append(a.elapsed_time(b))
        else:
            t0 = time.perf_counter()
            fn()
            times.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(times)


def _inputs(T, HQ, H, D, dtype=None, grad=True):
    dtype, device = dtype or DTYPE, DEV
    q = torch.randn(T, HQ, D, device=device, dtype=dtype, requires_grad=grad)
    k = torch.randn(T, H, D, device=device, dtype=dtype, requires_grad=grad)
    v = torch.randn(T, H, D, device=device, dtype=dtype, requires_grad=grad)
    return q, k, v


def _route(T, frac):
    device = DEV
    n = int(round(frac * T))
    route = torch.zeros(T, dtype=torch.bool, device=device)
    route[torch.randperm(T, device=device)[:n]] = True
    return route


def _fwd_and_fwdbwd(f, inputs, dout):
    """(fwd-only callable, fwd+bwd callable) for out = f(*inputs)."""

    def fwd():
        with torch.no_grad():
            f(*inputs)

    def fwdbwd():
        out = f(*inputs)
        torch.autograd.grad(out, inputs, dout)

    return fwd, fwdbwd


def _time_pair(f, inputs, dout, budget_ms):
    fwd, fwdbwd = _fwd_and_fwdbwd(f, inputs, dout)
    return _timer(fwd, budget_ms), _timer(fwdbwd, budget_ms)


def _sdpa(backend):
    from torch.nn.attention import SDPBackend, sdpa_kernel

    be = {"cudnn": SDPBackend.CUDNN_ATTENTION, "flash": SDPBackend.FLASH_ATTENTION}[backend]

    def f(q, k, v):
        with sdpa_kernel([be]):
            return F.scaled_dot_product_attention(q, k, v, is_causal=True)

    return f


def bench_shape(HQ, H, D, T, fractions, window, budget_ms, baselines=True, flex=False, plan=None):
    """Rows for one head shape and length (see module docstring); plan: the kernels' LaunchPlan
    (None: the default)."""
    rows = []
    dev = DEV
    dout = torch.randn(T, HQ, D, device=dev, dtype=DTYPE)

    def add(op, frac, times):
        rows.append(dict(shape=f"{HQ}/{H}/{D}", T=T, op=op, frac=frac, fwd=times[0], fwdbwd=times[1]))
        print(f"  {HQ}/{H}/{D} T={T} {op} {frac} fwd {times[0]:.2f} ms  fwd+bwd {times[1]:.2f} ms", file=sys.stderr)

    if baselines:
        # SDPA layout [1, HQ, T, D]; K/V expanded to HQ heads outside the timed region
        qs = torch.randn(1, HQ, T, D, device=dev, dtype=DTYPE, requires_grad=True)
        ks = torch.randn(1, HQ, T, D, device=dev, dtype=DTYPE, requires_grad=True)
        vs = torch.randn(1, HQ, T, D, device=dev, dtype=DTYPE, requires_grad=True)
        ds = torch.randn(1, HQ, T, D, device=dev, dtype=DTYPE)
        for name in ("cudnn", "flash"):
            try:
                add(f"SDPA causal {name}", "", _time_pair(_sdpa(name), (qs, ks, vs), ds, budget_ms))
            except Exception as e:  # backend missing on this build/GPU: report, keep going
                print(f"  SDPA {name} failed: {type(e).__name__}: {e}", file=sys.stderr)
                rows.append(dict(shape=f"{HQ}/{H}/{D}", T=T, op=f"SDPA causal {name}", frac="", fwd=None, fwdbwd=None))
        del qs, ks, vs, ds
        if DEV == "cuda":
            torch.cuda.empty_cache()

    swa_in = _inputs(T, HQ, H, D)
    add(f"SWA W={window}", "", _time_pair(lambda q, k, v: sliding_window_attention(q, k, v, window, plan=plan), swa_in, dout,
                                          budget_ms))
    if flex:
        try:
            f, build = _flex(T, torch.zeros(T, dtype=torch.int32, device=DEV), window)  # one document
            add(f"SWA W={window} FlexAttention (mask prebuilt)", "", _time_pair(f, swa_in, dout, budget_ms))
            t_build = _timer(build, budget_ms)
            rows.append(dict(shape=f"{HQ}/{H}/{D}", T=T, op="FlexAttention create_block_mask", frac="",
                             fwd=t_build, fwdbwd=None))
        except Exception as e:  # report and keep the rest of the table
            print(f"  FlexAttention failed: {type(e).__name__}: {str(e)[:300]}", file=sys.stderr)
    glob_in = _inputs(T, HQ, H, D)
    for frac in fractions:
        route = _route(T, frac)
        add("conditional", frac, _time_pair(lambda q, k, v: conditional_attention(q, k, v, route, plan=plan), glob_in, dout,
                                            budget_ms))

        def l2a(q1, k1, v1, q2, k2, v2):
            return (sliding_window_attention(q1, k1, v1, window, plan=plan)
                    + conditional_attention(q2, k2, v2, route, plan=plan))

        add("L2A (SWA + conditional)", frac, _time_pair(l2a, swa_in + glob_in, dout, budget_ms))
    return rows


def bench_documents(HQ, H, D, T, doc_tokens, budget_ms, plan=None):
    """Rows: full causal attention over documents of `doc_tokens` tokens packed into T (see the
    module docstring, --documents)."""
    rows = []
    starts = list(range(0, T, doc_tokens))
    cu = torch.tensor(starts + [T], dtype=torch.int32, device=DEV)
    label = f"{len(starts)} docs of {doc_tokens}"
    dout = torch.randn(T, HQ, D, device=DEV, dtype=DTYPE)
    inputs = _inputs(T, HQ, H, D)

    def add(op, times):
        rows.append(dict(shape=f"{HQ}/{H}/{D}", T=T, op=f"{op}, {label}", frac=1.0, fwd=times[0], fwdbwd=times[1]))
        print(f"  {HQ}/{H}/{D} T={T} {op}, {label}: fwd {times[0]:.2f} ms  fwd+bwd {times[1]:.2f} ms", file=sys.stderr)

    documents = document_bounds(cu, T, DEV)
    every = routed_tokens(torch.ones(T, dtype=torch.bool, device=DEV))
    add("conditional at density 1", _time_pair(
        lambda q, k, v: conditional_attention(q, k, v, every, documents=documents, plan=plan), inputs, dout, budget_ms))
    try:
        doc = torch.repeat_interleave(torch.arange(len(starts), device=DEV, dtype=torch.int32), torch.diff(cu))
        f, build = _flex(T, doc)
        add("FlexAttention causal + document mask (mask prebuilt)", _time_pair(f, inputs, dout, budget_ms))
        rows.append(dict(shape=f"{HQ}/{H}/{D}", T=T, op=f"FlexAttention create_block_mask, {label}", frac="",
                         fwd=_timer(build, budget_ms), fwdbwd=None))
    except Exception as e:  # report and keep the rest of the table
        print(f"  FlexAttention failed: {type(e).__name__}: {str(e)[:300]}", file=sys.stderr)
    sdpa = _sdpa("cudnn")
    groups = HQ // H

    def per_document(q, k, v):  # [T, HQ, D] -> SDPA's [1, HQ, t, D] per document, K/V expanded
        outs = []
        for a, b in zip(starts, starts[1:] + [T]):
            qd, kd, vd = (x[a:b].transpose(0, 1)[None] for x in (q, k, v))
            outs.append(sdpa(qd, kd.repeat_interleave(groups, 1), vd.repeat_interleave(groups, 1))[0].transpose(0, 1))
        return torch.cat(outs)

    try:
        add("SDPA cuDNN causal per document (K/V expanded inside)", _time_pair(per_document, inputs, dout, budget_ms))
    except Exception as e:  # backend missing on this build/GPU
        print(f"  SDPA cuDNN per document failed: {type(e).__name__}: {e}", file=sys.stderr)
    return rows


def _flex(T, doc, window=None):
    """FlexAttention, causal inside each document (`doc`: every token's document id) and, with
    `window`, inside the sliding window; compiled. Returns the op with its block mask built once
    (kernel time only, the most favourable reading for Flex) and a callable that builds the block
    mask (a cost paid again for every new packing)."""
    from torch.nn.attention.flex_attention import create_block_mask, flex_attention

    flex = torch.compile(flex_attention, dynamic=False)

    if window is None:
        def mask_mod(b, h, qi, ki):
            return (ki <= qi) & (doc[qi] == doc[ki])
    else:
        def mask_mod(b, h, qi, ki):
            return (ki <= qi) & (qi - ki < window) & (doc[qi] == doc[ki])

    def build():
        return create_block_mask(mask_mod, None, None, T, T, device=DEV, _compile=True)

    bm = build()

    def f(q, k, v):
        o = flex(q.transpose(0, 1)[None], k.transpose(0, 1)[None], v.transpose(0, 1)[None], block_mask=bm,
                 enable_gqa=True)
        return o[0].transpose(0, 1)

    return f, build


def format_table(rows):
    base = {}
    for r in rows:
        if r["op"] == "SDPA causal cudnn":
            base[(r["shape"], r["T"])] = r
    out = ["| HQ/H/D | T | op | routed | fwd ms | fwd / cuDNN | fwd+bwd ms | fwd+bwd / cuDNN |",
           "|---|---|---|---|---|---|---|---|"]

    def fmt(x, nd=2):
        return "n/a" if x is None else f"{x:.{nd}f}"

    for r in rows:
        b = base.get((r["shape"], r["T"]))
        rf = r["fwd"] / b["fwd"] if b and b["fwd"] and r["fwd"] else None
        rb = r["fwdbwd"] / b["fwdbwd"] if b and b["fwdbwd"] and r["fwdbwd"] else None
        tk = f"{r['T'] // 1024}K" if r["T"] % 1024 == 0 else str(r["T"])
        out.append(f"| {r['shape']} | {tk} | {r['op']} | {r['frac']} | {fmt(r['fwd'])} | {fmt(rf, 3)} | "
                   f"{fmt(r['fwdbwd'])} | {fmt(rb, 3)} |")
    return "\n".join(out)


# ----------------------------------------------------------------------------- tuning

# (block_m, block_n, num_warps, num_stages) candidates per head dim and kernel
TUNE_SPACE = {
    128: {
        "fwd": [(128, 128, 8, 3), (128, 64, 8, 4), (128, 128, 8, 2), (128, 64, 8, 3)],
        "dq": [(128, 64, 8, 3), (64, 64, 4, 2), (128, 128, 8, 2), (128, 64, 8, 2), (64, 128, 8, 2)],
        "dkdv": [(64, 64, 4, 2), (64, 64, 4, 3), (64, 128, 8, 2), (64, 128, 8, 3)],
    },
    64: {
        "fwd": [(64, 64, 4, 3), (64, 64, 4, 4), (128, 64, 8, 3), (128, 128, 8, 3)],
        "dq": [(128, 64, 4, 3), (64, 64, 4, 3), (128, 64, 8, 3), (128, 128, 8, 2)],
        "dkdv": [(64, 64, 4, 3), (64, 128, 8, 3)],
    },
}
# the plan switch searched together with each kernel's configs
TUNE_SWITCH = {"fwd": "fwd_kv_tma", "dq": "dq_kv_tma", "dkdv": "dkdv_tma"}


def tune(HQ, H, D, T, frac, budget_ms=150.0):
    """Coordinate search at one size, starting from the default plan: the forward's configs x
    its K/V TMA switch, then the dQ kernel's, then the dK/dV kernel's (each timed as the whole
    backward, the other kernel fixed). Returns (the fastest LaunchPlan, every timing)."""
    key = 64 if D <= 64 else 128
    q, k, v = _inputs(T, HQ, H, D, grad=False)
    route = _route(T, frac)
    pos = routed_tokens(route).positions
    docs = document_bounds(None, T, q.device)  # one document
    docstart, docend = docs.docstart, docs.docend
    scale = 1.0 / math.sqrt(D)
    do = torch.randn_like(q)
    plan = default_plan(D, interpreted=False)
    results = {}

    def fwd(p):
        return _triton_attn.forward(q, k, v, pos, docstart, None, scale, p.fwd, p.fwd_kv_tma)

    out, lse = fwd(plan)

    def bwd(p):
        return _triton_attn.backward(do, q, k, v, out, lse, pos, docstart, docend, None, scale, p)

    for kind, fn in (("fwd", fwd), ("dq", bwd), ("dkdv", bwd)):
        best = (float("inf"), plan)
        for switch in (True, False):
            for cfg in TUNE_SPACE[key][kind]:
                cand = dataclasses.replace(plan, **{kind: KernelConfig(*cfg), TUNE_SWITCH[kind]: switch})
                try:
                    t = _timer(lambda: fn(cand), budget_ms)
                except Exception as e:  # e.g. out of shared memory for this config
                    print(f"  tune {kind} {cfg}: {type(e).__name__}", file=sys.stderr)
                    t = float("inf")
                results.setdefault(f"{kind} {TUNE_SWITCH[kind]}={switch}", []).append((cfg, t))
                print(f"  tune D={D} {kind} {cfg} {TUNE_SWITCH[kind]}={switch}: {t:.3f} ms", file=sys.stderr)
                if t < best[0]:
                    best = (t, cand)
        plan = best[1]
        if kind == "fwd":
            out, lse = fwd(plan)
    print(f"  tuned {HQ}/{H}/{D}: {plan!r}", file=sys.stderr)
    return plan, results


# ----------------------------------------------------------------------------- GPU check


def _rel(a, b):
    return ((a.float() - b.float()).norm() / b.float().norm().clamp_min(1e-12)).item()


def check(HQ, H, D, T=8192, frac=0.2, window=1024, plan=None):
    """Kernel (under `plan`, None: the default) vs float32 reference, bf16 inputs, 3 documents;
    also the bf16 PyTorch error."""
    torch.manual_seed(0)
    cu = torch.tensor([0, T // 3, T // 3 + T // 10 + 1, T], dtype=torch.int32, device=DEV)
    q, k, v = _inputs(T, HQ, H, D)
    do = torch.randn_like(q)
    route = _route(T, frac)
    lines = []
    cases = [
        ("conditional", lambda *a: conditional_attention(*a, route, cu_seqlens=cu, plan=plan),
         lambda *a: reference.conditional_attention(*a, route, cu_seqlens=cu),
         lambda *a: reference.conditional_attention(*a, route, cu_seqlens=cu, compute_dtype=DTYPE)),
        ("swa", lambda *a: sliding_window_attention(*a, window, cu_seqlens=cu, plan=plan),
         lambda *a: reference.sliding_window_attention(*a, window, cu_seqlens=cu),
         lambda *a: reference.sliding_window_attention(*a, window, cu_seqlens=cu, compute_dtype=DTYPE)),
    ]
    ok = True
    for name, fk, fr, flow in cases:
        o = fk(q, k, v)
        g = torch.autograd.grad(o, (q, k, v), do)
        x32 = [t.detach().float().requires_grad_() for t in (q, k, v)]
        o32 = fr(*x32)
        g32 = torch.autograd.grad(o32, x32, do.float())
        ol = flow(q, k, v)
        gl = torch.autograd.grad(ol, (q, k, v), do)
        errs = [(_rel(a, b), _rel(c, b)) for a, b, c in zip((o,) + g, (o32,) + g32, (ol,) + gl)]
        bad = any(not math.isfinite(e) or e > 4 * max(el, 2e-3) for e, el in errs)
        ok &= not bad
        lines.append(f"check {HQ}/{H}/{D} {name}: " + ", ".join(
            f"{n} {e:.2e} (bf16 torch {el:.2e})" for n, (e, el) in zip(("out", "dq", "dk", "dv"), errs))
            + (" FAIL" if bad else " ok"))
    return ok, lines


# ----------------------------------------------------------------------------- profile


def profile(HQ, H, D, T, frac, reps=3, plan=None):
    """Markdown table of GPU time per kernel in one conditional_attention forward + backward
    (mean over `reps` calls after a warm-up), to see where the time goes."""
    from torch.profiler import ProfilerActivity
    from torch.profiler import profile as torch_profile

    q, k, v = _inputs(T, HQ, H, D)
    route = _route(T, frac)
    dout = torch.randn_like(q)
    _, fwdbwd = _fwd_and_fwdbwd(lambda *a: conditional_attention(*a, route, plan=plan), (q, k, v), dout)
    fwdbwd()
    _sync()
    with torch_profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(reps):
            fwdbwd()
        _sync()
    per_kernel = {}
    for e in prof.events():
        if e.device_type == torch.autograd.DeviceType.CUDA:
            per_kernel[e.name] = per_kernel.get(e.name, 0.0) + e.device_time / 1e3 / reps
    total = sum(per_kernel.values())
    lines = [f"GPU time per kernel, conditional fwd+bwd, {HQ}/{H}/{D}, T={T}, {frac} routed "
             f"(total {total:.2f} ms)", "", "| kernel | ms | share |", "|---|---|---|"]
    for name, ms in sorted(per_kernel.items(), key=lambda x: -x[1]):
        lines.append(f"| {name[:80]} | {ms:.2f} | {ms / total:.1%} |")
    return "\n".join(lines)


# ----------------------------------------------------------------------------- main


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--lengths", default="32768,65536,131072")
    p.add_argument("--shapes", default="28/4/128,14/2/64", help="HQ/H/D list")
    p.add_argument("--fractions", default="0.1,0.2,0.5")
    p.add_argument("--window", type=int, default=4096)
    p.add_argument("--budget-ms", type=float, default=400.0, help="time spent per measurement")
    p.add_argument("--no-baselines", action="store_true", help="skip SDPA cuDNN / FlashAttention")
    p.add_argument("--flex", default="", help="lengths at which to also time FlexAttention SWA for the first "
                   "shape (compiles once per length), e.g. 131072")
    p.add_argument("--documents", type=int, default=0, help="also time document-masked full attention over rows "
                   "packed with documents of this many tokens, at the first shape (see above)")
    p.add_argument("--tune", action="store_true", help="tune a launch plan per shape first (at --tune-length) "
                   "and time with it")
    p.add_argument("--tune-length", type=int, default=65536)
    p.add_argument("--check", action="store_true", help="check kernels against the reference first")
    p.add_argument("--profile", action="store_true", help="also print the GPU time per kernel of one "
                   "conditional fwd+bwd at the first shape and the last length, 20%% routed")
    p.add_argument("--json", default=None, help="write rows (and tuning results) to this file")
    a = p.parse_args(argv)
    if not torch.cuda.is_available():
        sys.exit("l2a_kernels.bench needs a CUDA GPU")
    import triton

    lengths = [int(x) for x in a.lengths.split(",") if x]
    shapes = [tuple(int(y) for y in s.split("/")) for s in a.shapes.split(",") if s]
    fractions = [float(x) for x in a.fractions.split(",") if x]
    header = (f"GPU: {torch.cuda.get_device_name()} | torch {torch.__version__} | triton {triton.__version__} | "
              f"bf16, one document, routed tokens uniform at random, SWA W={a.window}")
    print(header, file=sys.stderr)
    record = {"header": header, "argv": sys.argv if argv is None else argv}
    torch.manual_seed(0)
    plans = {shape: default_plan(shape[2], interpreted=False) for shape in shapes}
    if a.tune:
        record["tuned"] = {}
        for HQ, H, D in shapes:
            plans[(HQ, H, D)], res = tune(HQ, H, D, a.tune_length, 0.2)
            record["tuned"][f"{HQ}/{H}/{D}"] = {"plan": dataclasses.asdict(plans[(HQ, H, D)]),
                                                "results": {k: [[list(c), t] for c, t in v] for k, v in res.items()}}
    if a.check:
        ok_all = True
        for HQ, H, D in shapes:
            ok, lines = check(HQ, H, D, plan=plans[(HQ, H, D)])
            ok_all &= ok
            print("\n".join(lines), file=sys.stderr)
        record["check_ok"] = ok_all
    rows = []
    for HQ, H, D in shapes:
        for T in lengths:
            flex = (HQ, H, D) == shapes[0] and str(T) in a.flex.split(",")
            rows += bench_shape(HQ, H, D, T, fractions, a.window, a.budget_ms, not a.no_baselines, flex,
                                plan=plans[(HQ, H, D)])
            if a.documents and (HQ, H, D) == shapes[0]:
                rows += bench_documents(HQ, H, D, T, a.documents, a.budget_ms, plan=plans[(HQ, H, D)])
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats()
    record["rows"] = rows
    if a.json:
        with open(a.json, "w") as f:
            json.dump(record, f, indent=1, default=str)
    print(header)
    for (HQ, H, D), plan in plans.items():
        print(f"plan {HQ}/{H}/{D}: {plan!r}")
    print(format_table(rows))
    if a.profile:
        HQ, H, D = shapes[0]
        print()
        print(profile(HQ, H, D, lengths[-1], 0.2, plan=plans[shapes[0]]))


if __name__ == "__main__":
    main()
