"""l2a_kernels on CUDA at realistic sizes in bf16 (skipped without a GPU).

Errors are relative Frobenius norms against the float32 reference; a kernel's error must stay
within 4x that of the same computation done by PyTorch in bf16 (reference in bf16).
"""

from __future__ import annotations

import dataclasses

import pytest
import torch

import l2a_kernels
from l2a_kernels import default_plan, reference

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA"),
]


@pytest.fixture(autouse=True)
def compiled():
    assert not l2a_kernels.INTERPRETED, "the kernels were imported for the interpreter: unset TRITON_INTERPRET"


def _inputs(T, HQ, H, D, dtype=torch.bfloat16, seed=0):
    g = torch.Generator(device="cuda").manual_seed(seed)
    mk = lambda *s: torch.randn(*s, device="cuda", generator=g).to(dtype)  # noqa: E731
    return mk(T, HQ, D), mk(T, H, D), mk(T, H, D), mk(T, HQ, D)


def _run(f, q, k, v, do, dtype=None):
    xs = [t.detach().to(dtype or t.dtype).requires_grad_() for t in (q, k, v)]
    out = f(*xs)
    return (out,) + torch.autograd.grad(out, xs, do.to(out.dtype))


def _rel(a, b):
    return ((a.float() - b.float()).norm() / b.float().norm().clamp_min(1e-6)).item()


def _compare(kernel_fn, idx, cu, window, q, k, v, do):
    got = _run(kernel_fn, q, k, v, do)
    ref = _run(lambda *a: reference.attention(*a, idx, cu, window, None, torch.float32), q, k, v, do, torch.float32)
    low = _run(lambda *a: reference.attention(*a, idx, cu, window, None, q.dtype), q, k, v, do)
    for name, a, b, c in zip(("out", "dq", "dk", "dv"), got, ref, low):
        assert torch.isfinite(a).all(), name
        err, err_torch = _rel(a, b), _rel(c, b)
        assert err <= 4 * max(err_torch, 1e-3), f"{name}: kernel {err:.3e} vs torch {err_torch:.3e}"
    return got


SHAPES = [(28, 4, 128), (14, 2, 64)]


# launch-plan switches over the default plan of each head dim (which has every one on)
VARIANTS = {
    "default": {},
    "dkdv-pointer-loads": dict(dkdv_tma=False),
    "kv-pointer-loads": dict(fwd_kv_tma=False, dq_kv_tma=False),
    "no-tma": dict(fwd_kv_tma=False, dq_kv_tma=False, dkdv_tma=False),
    "no-tma-edge-full-dp-last": dict(fwd_kv_tma=False, dq_kv_tma=False, dkdv_tma=False, dkdv_edge_half=False,
                                     dkdv_dp_first=False),
    "edge-full": dict(dkdv_edge_half=False),
}


def _plan(D, variant):
    return dataclasses.replace(default_plan(D, interpreted=False), **VARIANTS[variant])


@pytest.mark.parametrize("variant", list(VARIANTS))
@pytest.mark.parametrize("HQ,H,D", SHAPES, ids=[f"{hq}-{h}-{d}" for hq, h, d in SHAPES])
def test_conditional_bf16(HQ, H, D, variant):
    plan = _plan(D, variant)
    T = 8191
    q, k, v, do = _inputs(T, HQ, H, D, seed=D)
    route = torch.rand(T, device="cuda") < 0.2
    cu = torch.tensor([0, 3000, 3001, 5000, T], dtype=torch.int32, device="cuda")
    out, dq, _, _ = _compare(lambda *a: l2a_kernels.conditional_attention(*a, route, cu_seqlens=cu, plan=plan),
                             torch.nonzero(route).squeeze(1), cu, None, q, k, v, do)
    assert (out[~route] == 0).all() and (dq[~route] == 0).all()


@pytest.mark.parametrize("variant", ["default", "no-tma", "dkdv-pointer-loads"])
@pytest.mark.parametrize("HQ,H,D", SHAPES, ids=[f"{hq}-{h}-{d}" for hq, h, d in SHAPES])
def test_sliding_window_bf16(HQ, H, D, variant):
    plan = _plan(D, variant)
    T, W = 8192, 1000
    q, k, v, do = _inputs(T, HQ, H, D, seed=D + 1)
    cu = torch.tensor([0, 2500, T], dtype=torch.int32, device="cuda")
    _compare(lambda *a: l2a_kernels.sliding_window_attention(*a, W, cu_seqlens=cu, plan=plan),
             torch.arange(T, device="cuda"), cu, W, q, k, v, do)


def test_density_one_matches_sdpa_and_zero_gives_zeros():
    T, HQ, H, D = 4096, 28, 4, 128
    q, k, v, do = _inputs(T, HQ, H, D, seed=3)
    out = l2a_kernels.conditional_attention(q, k, v, torch.ones(T, dtype=torch.bool, device="cuda"))
    ke, ve = (t.repeat_interleave(HQ // H, dim=1) for t in (k, v))
    sdpa = torch.nn.functional.scaled_dot_product_attention(
        q.transpose(0, 1).float(), ke.transpose(0, 1).float(), ve.transpose(0, 1).float(), is_causal=True
    ).transpose(0, 1)
    assert _rel(out, sdpa) < 1e-2
    got = _run(lambda *a: l2a_kernels.conditional_attention(*a, torch.zeros(T, dtype=torch.bool, device="cuda")),
               q, k, v, do)
    for t in got:
        assert torch.isfinite(t).all() and (t == 0).all()


def test_fp16_long_odd_length():
    T, HQ, H, D = 20001, 14, 2, 64
    q, k, v, do = _inputs(T, HQ, H, D, dtype=torch.float16, seed=7)
    route = torch.rand(T, device="cuda") < 0.1
    _compare(lambda *a: l2a_kernels.conditional_attention(*a, route), torch.nonzero(route).squeeze(1), None, None,
             q, k, v, do)


@pytest.mark.parametrize("layout", ["fused_qkv", "padded_heads"])
def test_strided_kv_same_as_contiguous(layout):
    """K/V views TMA can describe (rows of a fused qkv projection) and ones it cannot (padded
    heads: pointer loads) give the results of contiguous inputs."""
    T, HQ, H, D = 3001, 28, 4, 128
    q, k, v, do = _inputs(T, HQ, H, D, seed=11)
    if layout == "fused_qkv":
        qkv = torch.cat([q, k, v], dim=1)
        qs, ks, vs = qkv[:, :HQ], qkv[:, HQ:HQ + H], qkv[:, HQ + H:]
    else:
        qs = q
        ks, vs = (torch.cat([t, t], dim=2)[..., :D] for t in (k, v))
    route = torch.rand(T, device="cuda") < 0.3
    cu = torch.tensor([0, 1000, T], dtype=torch.int32, device="cuda")
    f = lambda *a: l2a_kernels.conditional_attention(*a, route, cu_seqlens=cu)  # noqa: E731
    for a, b in zip(_run(f, qs, ks, vs, do), _run(f, q, k, v, do)):
        assert torch.allclose(a.float(), b.float(), atol=2e-3, rtol=0), (a.float() - b.float()).abs().max()
