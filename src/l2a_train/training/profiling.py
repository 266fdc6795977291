"""A profile of one training step of the real run (`trainer.profile_step`), as a Markdown table.

    l2a-train experiment=... trainer.profile_step=4     # -> <run dir>/profile-step4.md

torch.profiler records the chosen optimizer step (forward, backward and update of all its
micro-batches). The table sums device time by component (attention kernels, matmuls, fused
norm/SwiGLU/RoPE/loss kernels, gathers and copies, optimizer, communication, the rest) and lists
the kernels that took the most time, so a step that is slower than expected can be read against
each component's ideal (docs/BENCHMARKS.md has the kernel tables). On a machine without CUDA the
same table is made of the CPU operators' own time. Only the main process writes it; profiling
adds overhead to that one step, so its tokens/s is not a benchmark figure.
"""

from __future__ import annotations

import contextlib
import logging
import os
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
    tmp.write_text(markdown(prof.key_averages(), step, "CUDA" if cuda else "CPU"))
    os.replace(tmp, path)
    log.info("profile of step %d: %s", step, path)


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
        short = name if len(name) <= 90 else name[:87] + "..."
        lines.append(f"| `{short.replace('|', '/')}` | {count} | {ms:,.1f} | {ms / total:.1%} | {component(name)} |")
    return "\n".join(lines) + "\n"
