"""Every kernel specialization a training run can reach compiles and runs on the GPU.

A learned router sends any number of tokens of a layer to global attention, including none,
exactly one, and all of them; the counts land on either side of Triton's integer
specializations (equal to 1, divisible by 16) and of the block sizes. Fixed-density routing,
as in test_kernels_gpu.py, never reaches most of these. Each case runs forward and backward
and compares the outputs and all three gradients with the float32 reference: the kernel's
error must stay within 4x that of the same computation by PyTorch in the input precision.

Cases: head dims 32, 64, 128 (the tiny, Qwen2.5-1.5B-like and Qwen2.5/Qwen3-like shapes);
bf16 and fp16; T odd and T a multiple of 16; one document and many (a one-token and an empty
one among them); routed counts 0, 1, 2, 15, 16, 17, 31, 32, 33, 1000 and all; the dense
forward on and off; sliding windows shorter and longer than the documents.
"""

from __future__ import annotations

import pytest
import torch

import l2a_kernels
from l2a_kernels import reference

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA"),
]

HEADS = {32: (4, 2), 64: (14, 2), 128: (12, 2)}  # head dim -> (query heads, KV heads)
DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}
LENGTHS = {"odd": 1037, "x16": 1024}
COUNTS = [0, 1, 2, 15, 16, 17, 31, 32, 33, 1000, "all"]


@pytest.fixture(autouse=True, scope="module")
def compiled():
    assert not l2a_kernels.INTERPRETED, "the kernels were imported for the interpreter: unset TRITON_INTERPRET"


def _documents(kind: str, T: int):
    if kind == "one":
        return None
    return torch.tensor([0, 1, 300, 300, 777, T], dtype=torch.int32, device="cuda")  # 1 token, empty, ...


def _inputs(T, D, dtype, seed):
    HQ, H = HEADS[D]
    g = torch.Generator(device="cuda").manual_seed(seed)
    mk = lambda *s: torch.randn(*s, device="cuda", generator=g).to(dtype)  # noqa: E731
    return mk(T, HQ, D), mk(T, H, D), mk(T, H, D), mk(T, HQ, D)


def _grads(f, q, k, v, do, dtype):
    xs = [t.detach().to(dtype).requires_grad_() for t in (q, k, v)]
    out = f(*xs)
    return (out,) + torch.autograd.grad(out, xs, do.to(out.dtype))


def _rel(a, b):
    return ((a.float() - b.float()).norm() / b.float().norm().clamp_min(1e-6)).item()


def _check(kernel_fn, reference_fn, q, k, v, do, case):
    got = _grads(kernel_fn, q, k, v, do, q.dtype)
    truth = _grads(reference_fn, q, k, v, do, torch.float32)
    low = _grads(lambda *a: reference_fn(*a, compute_dtype=q.dtype), q, k, v, do, q.dtype)
    for name, a, b, c in zip(("out", "dq", "dk", "dv"), got, truth, low):
        assert torch.isfinite(a).all(), f"{case}: {name} not finite"
        err, err_torch = _rel(a, b), _rel(c, b)
        assert err <= 4 * max(err_torch, 1e-3), f"{case}: {name} kernel {err:.3e} vs torch {err_torch:.3e}"
    return got


@pytest.mark.parametrize("dense_forward", [False, True], ids=["sparse-fwd", "dense-fwd"])
@pytest.mark.parametrize("count", COUNTS, ids=[f"routed{c}" for c in COUNTS])
@pytest.mark.parametrize("docs", ["one", "many"], ids=["1doc", "5docs"])
@pytest.mark.parametrize("length", list(LENGTHS), ids=[f"T{n}" for n in LENGTHS.values()])
@pytest.mark.parametrize("dtype", list(DTYPES))
@pytest.mark.parametrize("D", list(HEADS), ids=[f"D{d}" for d in HEADS])
def test_conditional_every_routed_count(D, dtype, length, docs, count, dense_forward):
    T = LENGTHS[length]
    q, k, v, do = _inputs(T, D, DTYPES[dtype], seed=T + D)
    n = T if count == "all" else count
    route = torch.zeros(T, dtype=torch.bool, device="cuda")
    route[torch.randperm(T, device="cuda")[:n]] = True
    cu = _documents(docs, T)
    case = f"D={D} {dtype} T={T} docs={docs} routed={n} dense_forward={dense_forward}"
    out, dq, dk, dv = _check(
        lambda *a: l2a_kernels.conditional_attention(*a, route, cu_seqlens=cu, dense_forward=dense_forward),
        lambda *a, compute_dtype=torch.float32: reference.conditional_attention(
            *a, route, cu_seqlens=cu, dense_forward=dense_forward, compute_dtype=compute_dtype),
        q, k, v, do, case)
    assert (dq[~route] == 0).all(), case
    if not dense_forward:
        assert (out[~route] == 0).all(), case
    if n == 0:
        assert all((t == 0).all() for t in (dq, dk, dv)), case


@pytest.mark.parametrize("window", [64, 2000], ids=["W64", "W2000"])
@pytest.mark.parametrize("docs", ["one", "many"], ids=["1doc", "5docs"])
@pytest.mark.parametrize("length", list(LENGTHS), ids=[f"T{n}" for n in LENGTHS.values()])
@pytest.mark.parametrize("dtype", list(DTYPES))
@pytest.mark.parametrize("D", list(HEADS), ids=[f"D{d}" for d in HEADS])
def test_sliding_window_shorter_and_longer_than_documents(D, dtype, length, docs, window):
    T = LENGTHS[length]
    q, k, v, do = _inputs(T, D, DTYPES[dtype], seed=T + D + window)
    cu = _documents(docs, T)
    _check(lambda *a: l2a_kernels.sliding_window_attention(*a, window, cu_seqlens=cu),
           lambda *a, compute_dtype=torch.float32: reference.sliding_window_attention(
               *a, window, cu_seqlens=cu, compute_dtype=compute_dtype),
           q, k, v, do, f"D={D} {dtype} T={T} docs={docs} window={window}")
