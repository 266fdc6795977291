"""l2a_kernels on CPU: the Triton kernels under TRITON_INTERPRET=1 against the float64 reference.

Triton decides interpreted-or-compiled when a kernel is decorated, so the fixture below sets
TRITON_INTERPRET=1 first and l2a_kernels.ops._kernels() (re)imports the kernel module to match.
The interpreter mishandles bf16, so these tests use float32 and float16. A kernel's error must
stay within a small multiple of a same-precision PyTorch implementation's error (the reference
computed in the input dtype); errors are relative Frobenius norms against float64.
GPU tests at realistic sizes in bf16: tests/test_kernels_gpu.py.
"""

from __future__ import annotations


import pytest
import torch

import l2a_kernels
from l2a_kernels import ops, reference


def _triton_imported_interpreted() -> bool:
    """Triton's own library functions (tl.zeros, ...) are interpreted only if TRITON_INTERPRET
    was set when triton was first imported; conftest does that on machines without CUDA."""
    import triton.language as tl
    from triton.runtime.interpreter import InterpretedFunction

    return isinstance(tl.zeros, InterpretedFunction)


@pytest.fixture(autouse=True, scope="module")
def interpreter():
    if not _triton_imported_interpreted():
        pytest.skip("Triton was imported without its interpreter (a CUDA machine): run the CPU kernel tests "
                    "on their own with `TRITON_INTERPRET=1 python -m pytest tests/test_kernels.py`")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("TRITON_INTERPRET", "1")
        kern = ops._kernels()
        assert kern.INTERPRETED
        yield kern


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
    truth = _grads(lambda *a: reference._attention(*a, query_idx, cu, window, None, torch.float64), q, k, v, do,
                   torch.float64)
    same = _grads(lambda *a: reference._attention(*a, query_idx, cu, window, None, dtype), q, k, v, do)
    if floor is None:
        floor = 1e-6 if dtype == torch.float32 else 1e-4
    for name, a, b, c in zip(("out", "dq", "dk", "dv"), got, truth, same):
        assert a.dtype == dtype and a.shape == b.shape, name
        assert torch.isfinite(a).all(), name
        err, err_torch = _rel(a, b), _rel(c, b)
        assert err <= 4 * err_torch + floor, f"{name}: kernel {err:.3e} vs torch {err_torch:.3e}"
    return got


# (T, HQ, H, D, density, cu_seqlens, dtype)
CASES = [
    (77, 4, 2, 16, 0.5, None, torch.float32),  # odd length, one document
    (100, 4, 2, 32, 0.3, [0, 10, 10, 55, 100], torch.float32),  # several documents, one empty
    (130, 6, 2, 16, 1.0, [0, 64, 130], torch.float16),  # density 1 = causal
    (93, 3, 1, 64, 0.25, [0, 40, 41, 93], torch.float16),  # MHA->MQA ratio 3, a one-token doc
    (70, 2, 2, 128, 0.4, [0, 33, 70], torch.float32),  # head dim 128, G = 1
    (120, 7, 1, 16, 0.2, [0, 17, 50, 51, 120], torch.float16),  # G = 7 as in Qwen2.5
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


@pytest.mark.parametrize("dq_mode, layout, edge_half, dp_first", [
    (0, "gather", True, True), (0, "rows", True, True), (0, "rows", False, False), (1, "gather", True, False)])
@pytest.mark.parametrize("case", [0, 1])
def test_backward_variants(interpreter, monkeypatch, case, dq_mode, layout, edge_half, dp_first):
    """Every backward: DQ_MODE 0 with the dK/dV kernel reading query rows gathered from the
    compact buffers or from copies in its own row order (the default "rows_tma" runs as "rows"
    here), its masked edges in half or full row tiles, dP issued before or after the
    exponentials, and DQ_MODE 1, dQ added with atomics inside the dK/dV kernel (mode 2, the TMA
    reduce, runs as mode 1 here). The TMA forms are tested in test_kernels_gpu.py."""
    monkeypatch.setattr(interpreter, "DQ_MODE", {64: dq_mode, 128: dq_mode})
    monkeypatch.setattr(interpreter, "DKDV_LAYOUT", {64: layout, 128: layout})
    monkeypatch.setattr(interpreter, "EDGE_HALF", edge_half)
    monkeypatch.setattr(interpreter, "DKDV_DP_FIRST", {64: dp_first, 128: dp_first})
    T, HQ, H, D = 101, 6, 2, 32
    q, k, v, do = _inputs(T, HQ, H, D, torch.float32, seed=12)
    cu = torch.tensor([0, 30, 31, 101], dtype=torch.int32)
    if case == 0:
        route = torch.rand(T, generator=torch.Generator().manual_seed(4)) < 0.4
        _compare(lambda *a: l2a_kernels.conditional_attention(*a, route, cu_seqlens=cu),
                 torch.nonzero(route).squeeze(1), cu, None, q, k, v, do)
    else:
        _compare(lambda *a: l2a_kernels.sliding_window_attention(*a, 9, cu_seqlens=cu), torch.arange(T), cu, 9,
                 q, k, v, do)


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


def test_cpu_without_interpreter_falls_back_to_reference(monkeypatch):
    monkeypatch.delenv("TRITON_INTERPRET")
    T, HQ, H, D = 40, 4, 2, 16
    q, k, v, _ = _inputs(T, HQ, H, D, torch.float32, seed=8)
    route = torch.rand(T, generator=torch.Generator().manual_seed(8)) < 0.5
    got = l2a_kernels.conditional_attention(q, k, v, route)
    assert torch.equal(got, reference.conditional_attention(q, k, v, route))
    got = l2a_kernels.sliding_window_attention(q, k, v, 5)
    assert torch.equal(got, reference.sliding_window_attention(q, k, v, 5))


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


@pytest.mark.parametrize(
    "mutate,exc,match",
    [
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
    ],
)
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
    assert set(l2a_kernels.__all__) == {"conditional_attention", "sliding_window_attention", "reference"}
    assert callable(l2a_kernels.reference.conditional_attention)
    assert callable(l2a_kernels.reference.sliding_window_attention)


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
    truth = _grads(lambda *a: reference._attention(*a, torch.arange(T), cu_t, None, None, torch.float64),
                   q, k, v, masked_do, torch.float64)
    for name, a, b in zip(("out", "dq", "dk", "dv"), got, truth):
        assert _rel(a, b) < 1e-5, name
    # the gradient of unrouted rows is not propagated (it is zero in L2A's use)
    dq_unmasked = _grads(lambda *a: l2a_kernels.conditional_attention(*a, route, cu_seqlens=cu_t, dense_forward=True),
                         q, k, v, do)[1]
    assert (dq_unmasked[~route] == 0).all()
    ref = reference.conditional_attention(q, k, v, route, cu_seqlens=cu_t, dense_forward=True)
    assert _rel(ref, truth[0]) < 1e-5

