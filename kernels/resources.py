"""Registers, spills and shared memory of the kernels, without a GPU:
python -m l2a_kernels.resources [--arch 90] [--head-dims 64,128]

Compiles each kernel with its launch config from `_triton_attn.CONFIGS` for the target
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
    "QC": "bf16", "DOC": "bf16", "QCP": "bf16", "DOCP": "bf16", "LSE": "fp32", "DELTA": "fp32", "LSEP": "fp32",
    "DELTAP": "fp32", "DQACC": "fp32",
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


def _kernel_cases(kern, D, G=7):
    """(name, kernel, config, constexprs, descriptors) for the default launch of each kernel."""
    key = kern._key(D)
    common = dict(G=G, D=D, COMPACT=True, HAS_WINDOW=False, DOT_PREC="tf32")
    cases = []
    for name, kind, fn in (("forward", "fwd", kern._fwd_kernel), ("dQ", "dq", kern._bwd_dq_kernel)):
        BM, BN, warps, stages = kern.CONFIGS[kind][key]
        tma = kern.KV_TMA[kind][key]
        desc = {"K": (BN, D), "V": (BN, D)} if tma else {}
        cases.append((name, fn, (BM, BN, warps, stages), dict(common, BLOCK_M=BM, BLOCK_N=BN, KV_TMA=tma), desc))
    BM, BN, warps, stages = kern.CONFIGS["dkdv"][key]
    rows = kern.DKDV_LAYOUTS.index(kern.DKDV_LAYOUT[key])
    desc = {"QC": (BM, D), "DOC": (BM, D), "LSE": (BM, 4), "DELTA": (BM, 4)} if rows == 2 else {}
    const = dict(common, BLOCK_M=BM, BLOCK_N=BN, DQ_MODE=0, ROWS=rows, EDGE_M=kern._edge_rows(BM, 0),
                 DP_FIRST=kern.DKDV_DP_FIRST[key])
    cases.append(("dK/dV", kern._bwd_dkdv_kernel, (BM, BN, warps, stages), const, desc))
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


def _compiled_kernels():
    """The kernel module with compiled (not interpreted) kernels. Triton's library takes its
    mode at its first import: imported under TRITON_INTERPRET=1 it cannot compile for a GPU
    target (a cold compile cache fails inside the code generator), so `main` moves to a fresh
    process in that case and this runs only where triton is (or will be) imported compiled; it
    drops TRITON_INTERPRET from this process's environment."""
    os.environ.pop("TRITON_INTERPRET", None)
    from . import ops

    return ops._kernels()


def _interpreter_loaded() -> bool:
    return "triton.language" in sys.modules and os.environ.get("TRITON_INTERPRET", "0") == "1"


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--arch", type=int, default=90, help="compute capability x 10 (90: H100/H200)")
    p.add_argument("--head-dims", default="64,128")
    a = p.parse_args(argv)
    if _interpreter_loaded():  # e.g. called from the CPU test session: compile in a clean process
        env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
        cmd = [sys.executable, "-m", "l2a_kernels.resources", "--arch", str(a.arch), "--head-dims", a.head_dims]
        done = subprocess.run(cmd, env=env, capture_output=True, text=True)
        if done.returncode:
            raise RuntimeError(f"{' '.join(cmd)} failed:\n{done.stderr[-2000:]}")
        print(done.stdout, end="")
        return
    kern = _compiled_kernels()
    lines = ["| kernel | D | config (BLOCK_M, BLOCK_N, warps, stages) | registers | spilled bytes | shared memory |",
             "|---|---|---|---|---|---|"]
    for D in (int(x) for x in a.head_dims.split(",")):
        for name, fn, config, const, desc in _kernel_cases(kern, D):
            r = resources(fn, config, const, desc, a.arch)
            lines.append(f"| {name} | {D} | {config} | {r['registers']} | {r['spill_bytes']} | "
                         f"{r['shared_bytes']:,} |")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
