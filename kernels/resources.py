"""Registers, spills and shared memory of the kernels, without a GPU:
python -m l2a_kernels.resources [--arch 90] [--head-dims 64,128]

Compiles each kernel with its launch config from `default_plan(D, interpreted=False)` for the target
architecture (ahead of time, as `triton.compile` does for any target) and reads the machine
code's resource use with the `cuobjdump` bundled in Triton's wheel. Spilled registers cost
device time, so this answers "does this config spill?" before a GPU run. The numbers are those
of the installed Triton: match the GPU machine's version (triton 3.6 there) to read its exact
figures; on an H200 they agreed with the `n_spills` Triton reports after a launch.
"""

from __future__ import annotations

import argparse
import os
import re
import subprocess
import sys
import tempfile

# What each argument of the kernels is, by name: pointers (with element type) unless the case
# passes it as a TMA descriptor (block shape per config), float or int scalars.
_POINTERS = {
    "Q": "bf16", "K": "bf16", "V": "bf16", "O": "bf16", "DO": "bf16", "DQ": "bf16", "DK": "bf16", "DV": "bf16",
    "QR": "bf16", "DOR": "bf16", "QRP": "bf16", "DORP": "bf16", "LSE": "fp32", "DELTA": "fp32", "LSEP": "fp32",
    "DELTAP": "fp32",
    "POS": "i32", "DOCSTART": "i32", "DOCEND": "i32",
}
_FLOATS = {"qk_scale", "sm_scale"}


def _signature(fn, const, descriptors):
    """Triton signature, constexprs and 16-byte alignment hints, as a launch would build them."""
    sig, attrs = {}, {}
    for i, name in enumerate(fn.arg_names):
        if name in const:
            sig[name] = "constexpr"
        elif name in descriptors:
            sig[name] = "tensordesc<%s[%s]>" % (_POINTERS[name], ", ".join(map(str, descriptors[name])))
        elif name in _POINTERS:
            sig[name] = "*" + _POINTERS[name]
        elif name in _FLOATS:
            sig[name] = "fp32"
        else:
            sig[name] = "i32"
        if sig[name].startswith("*") or name.startswith("stride"):
            attrs[(i,)] = [["tt.divisibility", 16]]
    constexprs = {(fn.arg_names.index(n),): v for n, v in const.items() if n in fn.arg_names}
    return sig, constexprs, attrs


def _kernel_cases(D, plan=None, G=7):
    """(name, kernel, config, constexprs, descriptors) for each kernel's launch under `plan`
    (default: the GPU default plan of D), TMA requests honoured."""
    from . import _triton_attn as kern
    from .plan import default_plan

    plan = plan or default_plan(D, interpreted=False)
    common = dict(G=G, D=D, COMPACT=True, HAS_WINDOW=False, DOT_PREC="tf32")
    cases = []
    for name, cfg, tma, fn in (("forward", plan.fwd, plan.fwd_kv_tma, kern._fwd_kernel),
                               ("dQ", plan.dq, plan.dq_kv_tma, kern._bwd_dq_kernel)):
        BM, BN = cfg.block_m, cfg.block_n
        desc = {"K": (BN, D), "V": (BN, D)} if tma else {}
        cases.append((name, fn, (BM, BN, cfg.num_warps, cfg.num_stages),
                      dict(common, BLOCK_M=BM, BLOCK_N=BN, KV_TMA=tma), desc))
    cfg = plan.dkdv
    BM, BN = cfg.block_m, cfg.block_n
    desc = {"QR": (BM, D), "DOR": (BM, D), "LSE": (BM, 4), "DELTA": (BM, 4)} if plan.dkdv_tma else {}
    const = dict(common, BLOCK_M=BM, BLOCK_N=BN, TMA=plan.dkdv_tma, EDGE_M=plan.dkdv_edge_m,
                 DP_FIRST=plan.dkdv_dp_first)
    cases.append(("dK/dV", kern._bwd_dkdv_kernel, (BM, BN, cfg.num_warps, cfg.num_stages), const, desc))
    return cases


def _cuobjdump():
    import triton

    path = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "cuobjdump")
    if not os.path.exists(path):
        sys.exit(f"l2a_kernels.resources: no cuobjdump in Triton's wheel ({path}); install the NVIDIA backend")
    return path


def resources(fn, config, const, descriptors, arch=90):
    """dict(registers, spill_bytes, shared_bytes) of one kernel compiled for sm_<arch>."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    _, _, warps, stages = config
    sig, constexprs, attrs = _signature(fn, const, descriptors)
    compiled = triton.compile(ASTSource(fn, sig, constexprs=constexprs, attrs=attrs),
                              target=GPUTarget("cuda", arch, 32), options=dict(num_warps=warps, num_stages=stages))
    with tempfile.TemporaryDirectory() as tmp:
        cubin = os.path.join(tmp, "kernel.cubin")
        with open(cubin, "wb") as f:
            f.write(compiled.asm["cubin"])
        out = subprocess.run([_cuobjdump(), "--dump-resource-usage", cubin], capture_output=True, text=True,
                             check=True).stdout
    m = re.search(r"REG:(\d+).*?STACK:(\d+)", out)
    if not m:
        raise RuntimeError(f"unexpected cuobjdump output: {out[-300:]}")
    return dict(registers=int(m.group(1)), spill_bytes=int(m.group(2)), shared_bytes=compiled.metadata.shared)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--arch", type=int, default=90, help="compute capability x 10 (90: H100/H200)")
    p.add_argument("--head-dims", default="64,128")
    a = p.parse_args(argv)
    from . import _triton_attn

    # Kernels imported for the interpreter (e.g. in the CPU test session) cannot be compiled for a
    # GPU target, nor can Triton's library once imported that way: compile in a clean process.
    if _triton_attn.INTERPRETED:
        env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
        cmd = [sys.executable, "-m", "l2a_kernels.resources", "--arch", str(a.arch), "--head-dims", a.head_dims]
        done = subprocess.run(cmd, env=env, capture_output=True, text=True)
        if done.returncode:
            raise RuntimeError(f"{' '.join(cmd)} failed:\n{done.stderr[-2000:]}")
        print(done.stdout, end="")
        return
    lines = ["| kernel | D | config (BLOCK_M, BLOCK_N, warps, stages) | registers | spilled bytes | shared memory |",
             "|---|---|---|---|---|---|"]
    for D in (int(x) for x in a.head_dims.split(",")):
        for name, fn, config, const, desc in _kernel_cases(D):
            r = resources(fn, config, const, desc, a.arch)
            lines.append(f"| {name} | {D} | {config} | {r['registers']} | {r['spill_bytes']} | "
                         f"{r['shared_bytes']:,} |")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
