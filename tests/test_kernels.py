"""l2a_kernels on CPU: the Triton kernels under TRITON_INTERPRET=1 against the float64 reference.

Triton decides interpreted-or-compiled when a kernel is decorated: tests/conftest.py sets
TRITON_INTERPRET=1 on machines without CUDA before anything imports l2a_kernels, and the fixture
below checks that the kernels really run interpreted. The interpreter mishandles bf16, so these tests use float32 and float16. A kernel's error must
stay within a small multiple of a same-precision PyTorch implementation's error (the reference
computed in the input dtype); errors are relative Frobenius norms against float64.
GPU tests at realistic sizes in bf16: tests/test_kernels_gpu.py.
"""

from __future__ import annotations


import dataclasses
import os
import re
import subprocess
import sys

import pytest
import torch

import l2a_kernels
from l2a_kernels import KernelConfig, LaunchPlan, default_plan, reference


@pytest.fixture(autouse=True, scope="module")
def interpreter():
    """Skips on a CUDA machine (kernels compiled); elsewhere checks that the Triton kernels,
    and Triton's own library functions, are interpreted, so the tests below run them."""
    import triton.language as tl
    from triton.runtime.interpreter import InterpretedFunction

    from l2a_kernels import _triton_attn

    if not l2a_kernels.INTERPRETED:
        pytest.skip("the kernels were imported compiled (a CUDA machine): run the CPU kernel tests on their "
                    "own with `TRITON_INTERPRET=1 python -m pytest tests/test_kernels.py`")
    assert isinstance(tl.zeros, InterpretedFunction)
    for kernel in (_triton_attn._fwd_kernel, _triton_attn._bwd_dq_kernel, _triton_attn._bwd_dkdv_kernel):
        assert isinstance(kernel, InterpretedFunction), kernel


def _slug(text):
    """A test id from an expected error message."""
    return re.sub(r"[^A-Za-z0-9]+", "-", text).strip("-")


def _inputs(T, HQ, H, D, dtype, seed=0):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(T, HQ, D, generator=g).to(dtype)
    k = torch.randn(T, H, D, generator=g).to(dtype)
    v = torch.randn(T, H, D, generator=g).to(dtype)
    do = torch.randn(T, HQ, D, generator=g).to(dtype)
    return q, k, v, do


def _rel(x, truth):
    # floor of 1e-3 RMS on the denominator: some true gradients are exactly 0 (window 1)
    return ((x.double() - truth).norm() / max(truth.norm().item(), 1e-3 * truth.numel() ** 0.5)).item()


def _grads(f, q, k, v, do, dtype=None):
    xs = [t.detach().to(dtype or t.dtype).requires_grad_() for t in (q, k, v)]
    out = f(*xs)
    grads = torch.autograd.grad(out, xs, do.to(out.dtype))
    return (out,) + tuple(grads)


def _compare(kernel_fn, query_idx, cu, window, q, k, v, do, floor=None):
    """Kernel vs float64 truth, bounded by 4x the same-precision PyTorch error."""
    dtype = q.dtype
    got = _grads(kernel_fn, q, k, v, do)
    truth = _grads(lambda *a: reference.attention(*a, query_idx, cu, window, None, torch.float64), q, k, v, do,
                   torch.float64)
    same = _grads(lambda *a: reference.attention(*a, query_idx, cu, window, None, dtype), q, k, v, do)
    if floor is None:
        floor = 1e-6 if dtype == torch.float32 else 1e-4
    for name, a, b, c in zip(("out", "dq", "dk", "dv"), got, truth, same):
        assert a.dtype == dtype and a.shape == b.shape, name
        assert torch.isfinite(a).all(), name
        err, err_torch = _rel(a, b), _rel(c, b)
        assert err <= 4 * err_torch + floor, f"{name}: kernel {err:.3e} vs torch {err_torch:.3e}"
    return got


# (T, HQ, H, D, density, cu_seqlens, dtype), id
CASES = [
    pytest.param(77, 4, 2, 16, 0.5, None, torch.float32, id="odd-length-1doc"),
    pytest.param(100, 4, 2, 32, 0.3, [0, 10, 10, 55, 100], torch.float32, id="docs-one-empty"),
    pytest.param(130, 6, 2, 16, 1.0, [0, 64, 130], torch.float16, id="density1-causal-fp16"),
    pytest.param(93, 3, 1, 64, 0.25, [0, 40, 41, 93], torch.float16, id="G3-one-token-doc-fp16"),
    pytest.param(70, 2, 2, 128, 0.4, [0, 33, 70], torch.float32, id="D128-G1"),
    pytest.param(120, 7, 1, 16, 0.2, [0, 17, 50, 51, 120], torch.float16, id="G7-qwen25-fp16"),
]


@pytest.mark.parametrize("T,HQ,H,D,density,cu,dtype", CASES)
def test_conditional_matches_reference(T, HQ, H, D, density, cu, dtype):
    q, k, v, do = _inputs(T, HQ, H, D, dtype, seed=T)
    route = torch.rand(T, generator=torch.Generator().manual_seed(T + 1)) < density
    cu_t = None if cu is None else torch.tensor(cu, dtype=torch.int32)
    idx = torch.nonzero(route).squeeze(1)
    out, dq, _, _ = _compare(lambda *a: l2a_kernels.conditional_attention(*a, route, cu_seqlens=cu_t), idx, cu_t,
                             None, q, k, v, do)
    # unrouted tokens: exactly zero output and zero query gradient
    assert (out[~route] == 0).all() and (dq[~route] == 0).all()


@pytest.mark.parametrize("window", [1, 7, 33, 500])
def test_sliding_window_matches_reference(window):
    T, HQ, H, D = 111, 4, 2, 32
    q, k, v, do = _inputs(T, HQ, H, D, torch.float32, seed=window)
    cu = torch.tensor([0, 50, 111], dtype=torch.int32)
    # window 1: the true dq/dk are exactly 0 and so is PyTorch's; the kernel's rowsum(dO*O) and
    # dO.V differ by rounding, so allow a small absolute (RMS-relative) error there
    _compare(lambda *a: l2a_kernels.sliding_window_attention(*a, window, cu_seqlens=cu), torch.arange(T), cu,
             window if window < T else None, q, k, v, do, floor=1e-3 if window == 1 else None)


def test_sliding_window_fp16_gqa():
    T, HQ, H, D = 96, 6, 2, 64
    q, k, v, do = _inputs(T, HQ, H, D, torch.float16, seed=5)
    _compare(lambda *a: l2a_kernels.sliding_window_attention(*a, 20), torch.arange(T), None, 20, q, k, v, do)


# plans other than the interpreter's default: the switches the interpreter can run (the TMA
# forms run as pointer loads here and are tested in test_kernels_gpu.py) and larger blocks
_SMALL = KernelConfig(16, 16, 1, 1)
PLANS = [
    pytest.param(default_plan(32, interpreted=True), id="default"),
    pytest.param(LaunchPlan(fwd=_SMALL, dq=_SMALL, dkdv=_SMALL, fwd_kv_tma=False, dq_kv_tma=False, dkdv_tma=False,
                            dkdv_edge_half=False, dkdv_dp_first=False), id="edge-full-dp-last"),
    pytest.param(LaunchPlan(fwd=KernelConfig(32, 16, 1, 1), dq=KernelConfig(16, 32, 1, 1),
                            dkdv=KernelConfig(32, 16, 1, 1), fwd_kv_tma=False, dq_kv_tma=False, dkdv_tma=False),
                 id="blocks-32-16"),
]


@pytest.mark.parametrize("plan", PLANS)
@pytest.mark.parametrize("case", ["conditional", "swa"])
def test_backward_variants(case, plan):
    """The kernels under launch plans other than the default: the dK/dV kernel's masked edges
    in half or full row tiles, dP issued before or after the exponentials, other block sizes."""
    T, HQ, H, D = 101, 6, 2, 32
    q, k, v, do = _inputs(T, HQ, H, D, torch.float32, seed=12)
    cu = torch.tensor([0, 30, 31, 101], dtype=torch.int32)
    if case == "conditional":
        route = torch.rand(T, generator=torch.Generator().manual_seed(4)) < 0.4
        _compare(lambda *a: l2a_kernels.conditional_attention(*a, route, cu_seqlens=cu, plan=plan),
                 torch.nonzero(route).squeeze(1), cu, None, q, k, v, do)
    else:
        _compare(lambda *a: l2a_kernels.sliding_window_attention(*a, 9, cu_seqlens=cu, plan=plan), torch.arange(T),
                 cu, 9, q, k, v, do)


def test_default_plans():
    """The GPU defaults are the H200 winners (docs/BENCHMARKS.md); head dims 16 and 32 share
    the plan of 64; the interpreter's plan uses small blocks and no TMA."""
    p64, p128 = default_plan(64, interpreted=False), default_plan(128, interpreted=False)
    assert default_plan(16, interpreted=False) == default_plan(32, interpreted=False) == p64
    assert (p64.fwd, p64.dq, p64.dkdv) == (KernelConfig(128, 64, 8, 3), KernelConfig(128, 64, 4, 3),
                                           KernelConfig(64, 64, 4, 3))
    assert (p128.fwd, p128.dq, p128.dkdv) == (KernelConfig(128, 128, 8, 3), KernelConfig(128, 64, 8, 3),
                                              KernelConfig(64, 64, 4, 2))
    for p in (p64, p128):
        assert p.fwd_kv_tma and p.dq_kv_tma and p.dkdv_tma and p.dkdv_edge_half and p.dkdv_dp_first
        assert p.dkdv_edge_m == 32
    small = default_plan(128, interpreted=True)
    assert small.fwd == small.dq == small.dkdv == KernelConfig(16, 16, 1, 1)
    assert not (small.fwd_kv_tma or small.dq_kv_tma or small.dkdv_tma) and small.dkdv_edge_m == 8
    with pytest.raises(dataclasses.FrozenInstanceError):
        p64.dkdv_tma = False


BAD_PLANS = [
    (lambda: KernelConfig(24, 16, 1, 1), ValueError, "block_m must be a power of two"),
    (lambda: KernelConfig(16, 8, 1, 1), ValueError, "block_n must be a power of two"),
    (lambda: KernelConfig(16, 16, 3, 1), ValueError, "num_warps"),
    (lambda: KernelConfig(16, 16, 1, 0), ValueError, "num_stages"),
    (lambda: LaunchPlan(fwd=(16, 16, 1, 1), dq=_SMALL, dkdv=_SMALL), TypeError, "LaunchPlan.fwd must be a KernelConfig"),
    (lambda: LaunchPlan(fwd=_SMALL, dq=_SMALL, dkdv=_SMALL, dkdv_tma=1), TypeError, "dkdv_tma must be a bool"),
    (lambda: default_plan(24, interpreted=False), ValueError, "head_dim must be one of"),
]


@pytest.mark.parametrize("make,exc,match", BAD_PLANS, ids=[_slug(match) for _, _, match in BAD_PLANS])
def test_bad_plans(make, exc, match):
    with pytest.raises(exc, match=match):
        make()


def test_plan_argument_must_be_a_launch_plan():
    q, k, v, route = _good()
    with pytest.raises(TypeError, match="plan must be an l2a_kernels.LaunchPlan"):
        l2a_kernels.conditional_attention(q, k, v, route, plan={"fwd": (16, 16, 1, 1)})


def test_density_zero_gives_zeros_and_zero_grads():
    T, HQ, H, D = 50, 4, 2, 16
    q, k, v, do = _inputs(T, HQ, H, D, torch.float32)
    route = torch.zeros(T, dtype=torch.bool)
    out, dq, dk, dv = _grads(lambda *a: l2a_kernels.conditional_attention(*a, route), q, k, v, do)
    for t in (out, dq, dk, dv):
        assert torch.isfinite(t).all() and (t == 0).all()


def test_density_one_equals_causal_sdpa():
    """Independent check of kernel and reference: all tokens routed = SDPA causal (GQA expanded)."""
    T, HQ, H, D = 65, 4, 2, 32
    q, k, v, _ = _inputs(T, HQ, H, D, torch.float32, seed=9)
    out = l2a_kernels.conditional_attention(q, k, v, torch.ones(T, dtype=torch.bool))
    ke, ve = (t.repeat_interleave(HQ // H, dim=1) for t in (k, v))
    sdpa = torch.nn.functional.scaled_dot_product_attention(
        q.transpose(0, 1), ke.transpose(0, 1), ve.transpose(0, 1), is_causal=True).transpose(0, 1)
    assert torch.allclose(out, sdpa, atol=1e-5, rtol=1e-5)
    ref = reference.conditional_attention(q, k, v, torch.ones(T, dtype=torch.bool))
    assert torch.allclose(ref, sdpa, atol=1e-5, rtol=1e-5)


def test_swa_window_covering_everything_equals_causal():
    T, HQ, H, D = 40, 2, 1, 16
    q, k, v, _ = _inputs(T, HQ, H, D, torch.float32, seed=4)
    a = l2a_kernels.sliding_window_attention(q, k, v, 10_000)
    b = l2a_kernels.conditional_attention(q, k, v, torch.ones(T, dtype=torch.bool))
    assert torch.allclose(a, b, atol=1e-6)


def test_strided_inputs_from_fused_projection():
    """q/k/v as views of one fused qkv tensor (row stride larger than heads * D)."""
    T, HQ, H, D = 45, 4, 2, 16
    qkv = torch.randn(T, HQ + 2 * H, D)
    q, k, v = qkv[:, :HQ], qkv[:, HQ:HQ + H], qkv[:, HQ + H:]
    route = torch.rand(T, generator=torch.Generator().manual_seed(1)) < 0.5
    cu = torch.tensor([0, 20, 45], dtype=torch.int32)
    got = l2a_kernels.conditional_attention(q, k, v, route, cu_seqlens=cu)
    ref = reference.conditional_attention(q, k, v, route, cu_seqlens=cu)
    assert torch.allclose(got, ref, atol=1e-5)


def test_scale_argument():
    T, HQ, H, D = 30, 2, 2, 16
    q, k, v, _ = _inputs(T, HQ, H, D, torch.float32, seed=2)
    route = torch.ones(T, dtype=torch.bool)
    got = l2a_kernels.conditional_attention(q, k, v, route, scale=0.3)
    ref = reference.conditional_attention(q, k, v, route, scale=0.3)
    assert torch.allclose(got, ref, atol=1e-5)


_FALLBACK = """
import torch, l2a_kernels
from l2a_kernels import reference
assert not l2a_kernels.INTERPRETED
g = torch.Generator().manual_seed(8)
q, k, v = torch.randn(40, 4, 16, generator=g), torch.randn(40, 2, 16, generator=g), torch.randn(40, 2, 16, generator=g)
route = torch.rand(40, generator=g) < 0.5
assert torch.equal(l2a_kernels.conditional_attention(q, k, v, route), reference.conditional_attention(q, k, v, route))
assert torch.equal(l2a_kernels.sliding_window_attention(q, k, v, 5), reference.sliding_window_attention(q, k, v, 5))
plan = l2a_kernels.default_plan(16, interpreted=True)
try:
    l2a_kernels.conditional_attention(q, k, v, route, plan=plan)
except ValueError as e:
    assert "plan= applies to the Triton kernels" in str(e), e
else:
    raise AssertionError("a plan for the reference path was accepted")
print("ok")
"""


def test_cpu_without_interpreter_falls_back_to_reference():
    """Imported without TRITON_INTERPRET (in a fresh process: the mode is fixed at import), CPU
    tensors run the reference; a launch plan there is refused."""
    env = {key: value for key, value in os.environ.items() if key != "TRITON_INTERPRET"}
    done = subprocess.run([sys.executable, "-c", _FALLBACK], env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0 and done.stdout.strip() == "ok", done.stderr[-2000:]


@pytest.mark.parametrize("dense_forward", [False, True], ids=["sparse", "dense-forward"])
def test_prepared_inputs_give_the_same_results_without_host_reads(monkeypatch, dense_forward):
    """documents= (DocumentBounds) and a RoutedTokens route give exactly the results of
    cu_seqlens and a bool route, and the calls then read nothing on the host (the bool route
    and cu_seqlens cost one read each: the routed count, the validation)."""
    from torch.utils._python_dispatch import TorchDispatchMode

    T, HQ, H, D = 70, 4, 2, 16
    q, k, v, do = _inputs(T, HQ, H, D, torch.float32, seed=31)
    route = torch.rand(T, generator=torch.Generator().manual_seed(32)) < 0.4
    cu = torch.tensor([0, 25, 25, 70], dtype=torch.int32)
    reads = []

    class Reads(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            if func in (torch.ops.aten.nonzero.default, torch.ops.aten._local_scalar_dense.default):
                reads.append(func)
            return func(*args, **(kwargs or {}))

    tolist = torch.Tensor.tolist
    monkeypatch.setattr(torch.Tensor, "tolist", lambda t: reads.append("tolist") or tolist(t))

    def run(f):
        reads.clear()
        with Reads():
            got = _grads(f, q, k, v, do)
        return got, len(reads)

    docs = l2a_kernels.document_bounds(cu, T, q.device)
    tokens = l2a_kernels.routed_tokens(route)
    assert torch.equal(tokens.positions, torch.nonzero(route).squeeze(1).int()) and tokens.mask is route
    assert torch.equal(docs.docstart, reference.doc_starts(cu, T, "cpu").int())
    raw, n_raw = run(lambda *a: l2a_kernels.conditional_attention(*a, route, cu_seqlens=cu,
                                                                  dense_forward=dense_forward))
    prepared, n_prepared = run(lambda *a: l2a_kernels.conditional_attention(*a, tokens, documents=docs,
                                                                            dense_forward=dense_forward))
    assert (n_raw, n_prepared) == (2, 0)
    for a, b in zip(raw, prepared):
        assert torch.equal(a, b)
    raw, n_raw = run(lambda *a: l2a_kernels.sliding_window_attention(*a, 9, cu_seqlens=cu))
    prepared, n_prepared = run(lambda *a: l2a_kernels.sliding_window_attention(*a, 9, documents=docs))
    assert (n_raw, n_prepared) == (1, 0)
    for a, b in zip(raw, prepared):
        assert torch.equal(a, b)
    every = l2a_kernels.RoutedTokens.every(T, q.device)
    ones = torch.ones(T, dtype=torch.bool)
    assert torch.equal(l2a_kernels.conditional_attention(q, k, v, every, documents=docs),
                       l2a_kernels.conditional_attention(q, k, v, ones, cu_seqlens=cu))


@pytest.mark.parametrize("op", ["conditional", "conditional-dense", "sliding-window"])
def test_kept_forward_results_are_reused_once(monkeypatch, op):
    """kept=/key= (activation checkpointing keeping attention outputs): the first call runs the
    forward kernel and keeps its result, the second call with the key runs none and gives the
    same output and gradients (its own q, k, v with the first call's output), then the key is gone."""
    from l2a_kernels import _triton_attn

    T, HQ, H, D = 70, 4, 2, 16
    q, k, v, do = _inputs(T, HQ, H, D, torch.float32, seed=41)
    route = torch.rand(T, generator=torch.Generator().manual_seed(42)) < 0.4
    cu = torch.tensor([0, 30, 70], dtype=torch.int32)
    calls, forward = [], _triton_attn.forward
    monkeypatch.setattr(_triton_attn, "forward", lambda *a: calls.append(1) or forward(*a))
    f = {"conditional": lambda *a, **kw: l2a_kernels.conditional_attention(*a, route, cu_seqlens=cu, **kw),
         "conditional-dense": lambda *a, **kw: l2a_kernels.conditional_attention(*a, route, cu_seqlens=cu,
                                                                                 dense_forward=True, **kw),
         "sliding-window": lambda *a, **kw: l2a_kernels.sliding_window_attention(*a, 9, cu_seqlens=cu, **kw)}[op]
    plain = _grads(f, q, k, v, do)
    kept = {}
    first = _grads(lambda *a: f(*a, kept=kept, key=(3, "global")), q, k, v, do)
    assert list(kept) == [(3, "global")] and len(calls) == 2
    second = _grads(lambda *a: f(*a, kept=kept, key=(3, "global")), q, k, v, do)
    assert kept == {} and len(calls) == 2  # no forward kernel: the kept result
    for a, b, c in zip(plain, first, second):
        assert torch.equal(a, b) and torch.equal(a, c)
    with pytest.raises(TypeError, match="kept must be a dict or None, got list"):
        f(q, k, v, kept=[], key=1)
    with pytest.raises(ValueError, match=r"kept= needs key="):
        f(q, k, v, kept={})


def test_prepared_inputs_bad_input():
    q, k, v, route = _good()
    T = q.shape[0]
    cu = torch.tensor([0, 5, T], dtype=torch.int32)
    docs = l2a_kernels.document_bounds(cu, T, q.device)
    with pytest.raises(ValueError, match="pass cu_seqlens or documents, not both"):
        l2a_kernels.conditional_attention(q, k, v, route, cu_seqlens=cu, documents=docs)
    with pytest.raises(TypeError, match="documents must be an l2a_kernels.DocumentBounds"):
        l2a_kernels.sliding_window_attention(q, k, v, 3, documents=cu)
    with pytest.raises(ValueError, match="documents were made for 8 tokens"):
        l2a_kernels.conditional_attention(q, k, v, route, documents=l2a_kernels.document_bounds(None, 8, q.device))
    with pytest.raises(ValueError, match="route \\(RoutedTokens\\) was made for \\(8,\\) tokens"):
        l2a_kernels.conditional_attention(q, k, v, l2a_kernels.routed_tokens(route[:8]))
    with pytest.raises(ValueError, match="cu_seqlens must end at T"):
        l2a_kernels.document_bounds(cu, T + 1, q.device)
    with pytest.raises(TypeError, match="route must be a bool tensor"):
        l2a_kernels.routed_tokens(route.int())
    with pytest.raises(ValueError, match="route must have shape"):
        l2a_kernels.routed_tokens(route[None])


def test_reference_is_memory_aware():
    """A 4096-token reference forward+backward must not hold [HQ, T, T] scores."""
    T, HQ, H, D = 4096, 8, 2, 16
    q, k, v, do = _inputs(T, HQ, H, D, torch.float32)
    q.requires_grad_()
    out = reference.conditional_attention(q, k, v, torch.rand(T) < 0.2)
    out.backward(do)
    assert torch.isfinite(q.grad).all()


# ----------------------------------------------------------------------------- bad input


def _good(T=16, HQ=4, H=2, D=16):
    q, k, v, _ = _inputs(T, HQ, H, D, torch.float32)
    return q, k, v, torch.ones(T, dtype=torch.bool)


BAD_INPUTS = [
    (lambda a: a.update(k=a["k"][:, :1].repeat(1, 3, 1), v=a["v"][:, :1].repeat(1, 3, 1)), ValueError,
     "multiple of k/v heads"),
    (lambda a: a.update(v=a["v"][:8]), ValueError, "k and v must have the same shape"),
    (lambda a: a.update(k=a["k"][:8], v=a["v"][:8]), ValueError, "same length T"),
    (lambda a: a.update(k=a["k"][..., :8], v=a["v"][..., :8]), ValueError, "same head_dim"),
    (lambda a: a.update(v=a["v"].half()), TypeError, "share a dtype"),
    (lambda a: a.update(q=a["q"][0]), ValueError, "q must have shape"),
    (lambda a: a.update(q=a["q"].double(), k=a["k"].double(), v=a["v"].double()), TypeError, "dtype"),
    (lambda a: a.update(route=a["route"][:5]), ValueError, "route must have shape"),
    (lambda a: a.update(route=a["route"].int()), TypeError, "route must be a bool"),
    (lambda a: a.update(cu_seqlens=torch.tensor([1, 16], dtype=torch.int32)), ValueError, "start at 0"),
    (lambda a: a.update(cu_seqlens=torch.tensor([0, 10, 15], dtype=torch.int32)), ValueError, "end at T"),
    (lambda a: a.update(cu_seqlens=torch.tensor([0, 10, 5, 16], dtype=torch.int32)), ValueError,
     "non-decreasing"),
    (lambda a: a.update(cu_seqlens=torch.tensor([0.0, 16.0])), TypeError, "cu_seqlens must be int32"),
    (lambda a: a.update(cu_seqlens=torch.tensor([[0, 16]], dtype=torch.int32)), ValueError, "1-D"),
    (lambda a: a.update(scale=-1.0), ValueError, "scale"),
]


@pytest.mark.parametrize("mutate,exc,match", BAD_INPUTS, ids=[_slug(match) for _, _, match in BAD_INPUTS])
def test_conditional_bad_input(mutate, exc, match):
    q, k, v, route = _good()
    a = dict(q=q, k=k, v=v, route=route, cu_seqlens=None, scale=None)
    mutate(a)
    with pytest.raises(exc, match=match):
        l2a_kernels.conditional_attention(a["q"], a["k"], a["v"], a["route"], cu_seqlens=a["cu_seqlens"],
                                          scale=a["scale"])


def test_head_dim_not_supported():
    q, k, v, route = _good(D=24)
    with pytest.raises(ValueError, match="head_dim"):
        l2a_kernels.conditional_attention(q, k, v, route)


@pytest.mark.parametrize("window", [0, -3, 2.5, True])
def test_sliding_window_bad_window(window):
    q, k, v, _ = _good()
    with pytest.raises(ValueError, match="window"):
        l2a_kernels.sliding_window_attention(q, k, v, window)


def test_sliding_window_bad_cu_seqlens():
    q, k, v, _ = _good()
    with pytest.raises(ValueError, match="end at T"):
        l2a_kernels.sliding_window_attention(q, k, v, 4, cu_seqlens=torch.tensor([0, 8], dtype=torch.int32))


def test_public_api():
    assert set(l2a_kernels.__all__) == {"conditional_attention", "sliding_window_attention", "reference", "LaunchPlan",
                                        "KernelConfig", "default_plan", "INTERPRETED", "ATTENTION_FORWARD_OP",
                                        "DocumentBounds", "document_bounds", "RoutedTokens", "routed_tokens"}
    assert callable(l2a_kernels.reference.conditional_attention)
    assert callable(l2a_kernels.reference.sliding_window_attention)
    assert callable(l2a_kernels.reference.attention)
    namespace, name = l2a_kernels.ATTENTION_FORWARD_OP.split("::")
    assert getattr(getattr(torch.ops, namespace), name).default is not None


def test_the_folder_imported_as_kernels_is_the_same_package(monkeypatch):
    """With the repository root on sys.path the folder is also importable as `kernels` (and
    transformers imports that name to probe for Hugging Face's package): it must re-export
    l2a_kernels, not load a second copy of its modules (a second registration of the operator)."""
    import importlib
    from pathlib import Path

    root = Path(l2a_kernels.__file__).resolve().parent.parent
    monkeypatch.syspath_prepend(str(root))
    mod = importlib.import_module("kernels")
    assert Path(mod.__file__).resolve().parent == root / "kernels"
    assert mod.conditional_attention is l2a_kernels.conditional_attention
    assert mod.reference is l2a_kernels.reference
    assert not [name for name in sys.modules if name.startswith("kernels.")]


@pytest.mark.parametrize("cu", [None, [0, 41, 90]])
def test_dense_forward_computes_every_token_and_routes_the_gradient(cu):
    """dense_forward (L2A's dense path): the output of causal attention for every token; with
    the output multiplied by the route, as L2A does, the gradients equal the dense ones."""
    T, HQ, H, D = 90, 6, 2, 16
    q, k, v, do = _inputs(T, HQ, H, D, torch.float32, seed=21)
    route = torch.rand(T, generator=torch.Generator().manual_seed(22)) < 0.3
    cu_t = None if cu is None else torch.tensor(cu, dtype=torch.int32)
    masked_do = do * route[:, None, None]
    got = _grads(lambda *a: l2a_kernels.conditional_attention(*a, route, cu_seqlens=cu_t, dense_forward=True),
                 q, k, v, masked_do)
    truth = _grads(lambda *a: reference.attention(*a, torch.arange(T), cu_t, None, None, torch.float64),
                   q, k, v, masked_do, torch.float64)
    for name, a, b in zip(("out", "dq", "dk", "dv"), got, truth):
        assert _rel(a, b) < 1e-5, name
    # the gradient of unrouted rows is not propagated (it is zero in L2A's use)
    dq_unmasked = _grads(lambda *a: l2a_kernels.conditional_attention(*a, route, cu_seqlens=cu_t, dense_forward=True),
                         q, k, v, do)[1]
    assert (dq_unmasked[~route] == 0).all()
    ref = reference.conditional_attention(q, k, v, route, cu_seqlens=cu_t, dense_forward=True)
    assert _rel(ref, truth[0]) < 1e-5

