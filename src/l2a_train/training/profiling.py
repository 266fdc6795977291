"""A profile of one training step of the real run (`trainer.profile_step`), as a Markdown table.

    l2a-train experiment=... trainer.profile_step=4     # -> <run dir>/profile-step4.md

torch.profiler records the chosen optimizer step (forward, backward and update of all its
micro-batches). The table sums device time by component (attention kernels, matmuls, fused
norm/SwiGLU/RoPE/loss kernels, gathers and copies, optimizer, communication, the rest) and lists
the kernels that took the most time, so a step that is slower than expected can be read against
each component's ideal (docs/BENCHMARKS.md has the kernel tables). On a machine without CUDA the
same table is made of the CPU operators' own time. Only the main process writes it; profiling
adds overhead to that one step, so its tokens/s is not a benchmark figure.

On CUDA it also reads the step's timeline, which the kernel sums cannot show: how long the GPU
sat idle between kernels, which operator launched the kernel after each idle gap and whether that
launch came late (the GPU waited on the host: launch overhead) or early (a wait on another
stream), how long the host waited on the GPU (synchronising calls, by the operator that made
them), and the operators that cost the host the most time.
"""

from __future__ import annotations

import contextlib
import logging
import os
import re
from pathlib import Path

import torch

log = logging.getLogger("l2a_train")

# component -> substrings of lower-cased kernel (or operator) names, checked in this order (cuDNN
# and FlashAttention first: FlashAttention's flash_fwd_kernel also contains "_fwd_kernel")
COMPONENTS = (
    ("attention (cuDNN / flash / SDPA)", ("cudnn", "flash", "fmha", "sdpa", "scaled_dot_product")),
    ("attention (L2A kernels)", ("_fwd_kernel", "_bwd_dq_kernel", "_bwd_dkdv_kernel", "l2a_kernels")),
    ("matmuls", ("gemm", "nvjet", "xmma", "cutlass", "cublas", "matmul", "addmm", "aten::mm", "aten::bmm", "linear")),
    ("optimizer", ("adam", "multi_tensor", "optimizer")),
    ("communication", ("nccl", "all_reduce", "allreduce", "reduce_scatter", "all_gather", "gloo")),
    ("fused norm / SwiGLU / RoPE / loss (liger)", ("rms_norm", "swiglu", "silu_mul", "_rope", "cross_entropy",
                                                   "element_mul", "liger")),
    ("gathers, scatters, copies", ("index", "gather", "scatter", "copy", "catarray", "nonzero", "memcpy", "memset",
                                    "fill", "zero")),
)


def component(name: str) -> str:
    low = name.lower()
    for label, keys in COMPONENTS:
        if any(k in low for k in keys):
            return label
    return "elementwise and the rest"


@contextlib.contextmanager
def profiled(step: int, profile_step, run_dir: Path, is_main: bool):
    """Profile this optimizer step (1-based) if it is `profile_step` and this is the main process."""
    if profile_step is None or int(profile_step) != step or not is_main:
        yield
        return
    from torch.profiler import ProfilerActivity, profile

    cuda = torch.cuda.is_available()
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])
    with profile(activities=activities) as prof:
        yield
        if cuda:
            torch.cuda.synchronize()
    path = Path(run_dir) / f"profile-step{step}.md"
    tmp = path.with_name(path.name + ".tmp")
    averages = prof.key_averages()
    text = markdown(averages, step, "CUDA" if cuda else "CPU")
    if cuda:
        text += timeline_markdown(prof.events(), averages)
    tmp.write_text(text)
    os.replace(tmp, path)
    log.info("profile of step %d: %s", step, path)


def _cell(name: str, width: int = 90) -> str:
    """An operator or kernel name as a Markdown table cell: code, cut to `width`, no pipes."""
    short = name if len(name) <= width else name[:width - 3] + "..."
    return f"`{short.replace('|', '/')}`"


def markdown(averages, step: int, device: str, top: int = 25) -> str:
    """Device time (CUDA kernels; on CPU the operators' own time) by component and the top kernels."""
    rows = []
    for e in averages:
        if device == "CUDA":
            # kernels only: not the GPU-side spans of record_function annotations (e.g. the
            # optimizer's step), which cover kernels that are counted themselves
            if getattr(e, "device_type", None) != torch.autograd.DeviceType.CUDA or e.is_user_annotation:
                continue
            us = e.self_device_time_total
        else:
            us = e.self_cpu_time_total
        if us > 0:
            rows.append((e.key, int(e.count), us / 1000.0))
    total = sum(ms for _, _, ms in rows) or 1.0
    by_component: dict[str, float] = {}
    for name, _, ms in rows:
        label = component(name)
        by_component[label] = by_component.get(label, 0.0) + ms
    what = "CUDA kernels" if device == "CUDA" else "CPU operators (own time)"
    lines = [f"# Profile of optimizer step {step}", "",
             f"{what}: {total:,.1f} ms in all (profiling slows the step; read the shares).", "",
             "| component | ms | share |", "|---|---:|---:|"]
    for label, ms in sorted(by_component.items(), key=lambda kv: -kv[1]):
        lines.append(f"| {label} | {ms:,.1f} | {ms / total:.1%} |")
    lines += ["", f"Top {top} by time:", "", "| kernel | calls | ms | share | component |", "|---|---:|---:|---:|---|"]
    for name, count, ms in sorted(rows, key=lambda r: -r[2])[:top]:
        lines.append(f"| {_cell(name)} | {count} | {ms:,.1f} | {ms / total:.1%} | {component(name)} |")
    return "\n".join(lines) + "\n"


# ----------------------------------------------------------------------------- the timeline

HOST_WAITS = ("cudaStreamSynchronize", "cudaDeviceSynchronize", "cudaEventSynchronize", "cuStreamSynchronize",
              "cuCtxSynchronize", "cuEventSynchronize")
_RUNTIME_CALL = re.compile(r"^(cuda|cu[A-Z]|hip)")  # CUDA runtime / driver (or HIP) API calls, not operators


def _is_runtime_call(name: str) -> bool:
    return bool(_RUNTIME_CALL.match(name))


def idle_gaps(spans, min_gap_us: float = 5.0):
    """Busy time, span and idle gaps of device activity.

    spans: (start_us, end_us, key) of every kernel, copy and memset, on any stream. Returns
    (busy_us, span_us, gaps) with busy the union of the intervals, span from the first start to
    the last end, and gaps a list of (gap_us, idle_from_us, key of the span that ended it) for every
    stretch of at least min_gap_us with nothing running on the device."""
    spans = sorted(spans, key=lambda s: (s[0], s[1]))
    if not spans:
        return 0.0, 0.0, []
    busy, gaps = 0.0, []
    first, end = spans[0][0], spans[0][0]
    for start, stop, key in spans:
        if start > end:
            if start - end >= min_gap_us:
                gaps.append((start - end, end, key))
            busy += stop - start
            end = stop
        elif stop > end:
            busy += stop - end
            end = stop
    return busy, end - first, gaps


def _op_label(event) -> str:
    """The innermost operator above a runtime call, marked [backward] inside the autograd engine."""
    op, parent, backward = None, event.cpu_parent, False
    while parent is not None:
        if op is None and not _is_runtime_call(parent.name):
            op = parent.name
        if parent.name.startswith("autograd::engine::evaluate_function"):
            backward = True
        parent = parent.cpu_parent
    op = op or "(no operator)"
    return f"{op} [backward]" if backward else op


def timeline_markdown(events, averages, top: int = 15) -> str:
    """The step's device timeline from the profiler's events: idle gaps by the operator that
    launched the next kernel, host waits by the operator that made them; and from its averages
    (per operator), the host's costliest operators."""
    cuda = torch.autograd.DeviceType.CUDA
    spans, runtime, waits = [], {}, {}
    for e in events:
        if e.device_type == cuda:
            if not e.is_user_annotation:
                spans.append((e.time_range.start, e.time_range.end, e.id))
        elif _is_runtime_call(e.name):  # a CUDA runtime or driver call, keyed by its correlation id
            runtime[e.id] = e
            if e.name in HOST_WAITS:
                label = _op_label(e)
                n, us = waits.get(label, (0, 0.0))
                waits[label] = (n + 1, us + e.time_range.end - e.time_range.start)
    busy, span, gaps = idle_gaps(spans)
    if not spans or span <= 0:
        return "\n## Timeline\n\nNo device activity was recorded.\n"
    by_op: dict[str, list] = {}
    for gap, idle_from, key in gaps:
        launch = runtime.get(key)
        label = _op_label(launch) if launch is not None else "(launch not recorded)"
        host_late = launch is not None and launch.time_range.start >= idle_from
        row = by_op.setdefault(label, [0, 0.0, 0.0])
        row[0] += 1
        row[1] += gap
        row[2] += gap if host_late else 0.0
    idle, late = span - busy, sum(late_us for _, _, late_us in by_op.values())
    lines = ["", "## Timeline", "",
             f"Device activity spans {span / 1000:,.1f} ms: kernels, copies and memsets busy {busy / 1000:,.1f} ms "
             f"({busy / span:.1%}), idle {idle / 1000:,.1f} ms, of which {sum(g for g, _, _ in gaps) / 1000:,.1f} ms "
             f"in {len(gaps):,} gaps of at least 5 us; {len(spans):,} device operations.",
             f"Idle while the host had not yet launched the next kernel (launch overhead): {late / 1000:,.1f} ms; "
             "the rest waited with the kernel already launched (another stream, an event).", "",
             f"Idle gaps by the operator that launched the kernel after them (top {top}):", "",
             "| operator | gaps | idle ms | of which the host was late | mean gap us |", "|---|---:|---:|---:|---:|"]
    for label, (n, us, late_us) in sorted(by_op.items(), key=lambda kv: -kv[1][1])[:top]:
        lines.append(f"| {_cell(label)} | {n:,} | {us / 1000:,.1f} | {late_us / 1000:,.1f} | {us / n:,.0f} |")
    lines += ["", "Host waits on the device (synchronising calls, by the operator that made them):", ""]
    if waits:
        lines += ["| operator | calls | ms |", "|---|---:|---:|"]
        for label, (n, us) in sorted(waits.items(), key=lambda kv: -kv[1][1])[:top]:
            lines.append(f"| {_cell(label)} | {n:,} | {us / 1000:,.1f} |")
    else:
        lines.append("none.")
    # own time: a span's children are not counted twice
    host = [e for e in averages if getattr(e, "device_type", None) != cuda and e.self_cpu_time_total > 0]
    lines += ["", f"Host time by operator (own time, top {top}; the CUDA runtime calls are the launches):", "",
              "| operator | calls | ms | mean us |", "|---|---:|---:|---:|"]
    for e in sorted(host, key=lambda e: -e.self_cpu_time_total)[:top]:
        us, n = e.self_cpu_time_total, int(e.count)
        lines.append(f"| {_cell(e.key)} | {n:,} | {us / 1000:,.1f} | {us / n:,.1f} |")
    return "\n".join(lines) + "\n"
