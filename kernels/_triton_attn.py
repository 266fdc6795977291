"""Triton kernels: query-sparse (compacted) causal attention with documents, native GQA and an
optional sliding window. Pure-PyTorch ground truth: l2a_kernels.reference.

Layout. q [T, HQ, D], k/v [T, H, D], G = HQ // H. A program never copies K/V per query head:
for KV head `kvh` it owns a block of BLOCK_M "rows", where row r of the group is
(compact token c = r // G, query head kvh * G + r % G). The G query heads of a token are
adjacent rows, so one K/V tile serves all of them. Compact token c sits at position POS[c]
(stable order, so positions increase with r); with COMPACT=False POS is the identity (SWA).

Key bounds of a row block (first row at p0 in document starting d0, last at p1 in d1):
keys [max(d0, p0-W+1), p1] are touched; keys [max(d1, p1-W+1), p0] are visible to every row,
so that span runs without masks in whole BLOCK_N steps and only the two ends are masked.
The dK/dV kernel does the transpose: for a key block [n0, n_last] it binary-searches the
compact rows that can see it (pos >= n0, pos < doc_end(n_last), pos < n_last + W) and the
rows that see all of it (pos >= n_last, pos < doc_end(n0), pos < n0 + W).

Softmax runs in base 2 (scale * log2(e) folded into the scores); LSE is saved per row in
those units, [num_compact, HQ] float32, for the backward. delta = rowsum(dO * O) is computed
by the dQ kernel (which loads O and dO anyway) and then read by the dK/dV kernel.

Launch configs and variant switches come from a `LaunchPlan` (l2a_kernels.plan), passed to
`forward` and `backward` by the ops.

Interpreted or compiled: Triton decides when a kernel is decorated, from TRITON_INTERPRET
(and its own library functions follow the variable as it was at triton's first import). So
the mode is fixed when this module is first imported, and INTERPRETED records it: set
TRITON_INTERPRET=1 before importing l2a_kernels to run the kernels on CPU tensors in the
interpreter (tests/conftest.py does so on machines without CUDA).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from triton.runtime.jit import JITFunction

from .plan import KernelConfig, LaunchPlan

LOG2E = 1.4426950408889634

# Integer arguments that count routed rows or tokens (n_rows, n_comp, T) change with every
# call under a learned router, so they are never specialized (do_not_specialize below).
# Triton by default compiles a separate kernel for an integer argument equal to 1 (folded as a
# constant) and for one divisible by 16. The constant-1 variant of the dK/dV kernel (exactly
# one routed token in a layer: a learned router reaches that, fixed-density routing never
# does) makes the ptxas of triton 3.6 crash with error code -11 on sm_90a, for every head dim;
# the generic variant compiles and runs. Unspecialized counts also mean one compile per launch
# config instead of up to three. Strides stay specialized (divisible by 16: vector loads).


@triton.jit
def _lower_bound(ptr, n, value, COMPACT: tl.constexpr):
    """First index i in [0, n] with ptr[i] >= value (ptr ascending); identity if not COMPACT."""
    if COMPACT:
        lo = tl.zeros([], dtype=tl.int32)
        hi = tl.zeros([], dtype=tl.int32) + n
        while lo < hi:
            mid = (lo + hi) // 2
            lt = tl.load(ptr + mid) < value
            lo = tl.where(lt, mid + 1, lo)
            hi = tl.where(lt, hi, mid)
        return lo
    else:
        return tl.minimum(tl.maximum(value, 0), n)


# The mode Triton chose when it decorated this module's kernels (TRITON_INTERPRET=1: interpreted).
INTERPRETED = not isinstance(_lower_bound, JITFunction)


# ----------------------------------------------------------------------------- forward


@triton.jit
def _load_kv(K, V, stride_kt, stride_vt, kcol, start_n, end,
             D: tl.constexpr, BLOCK_N: tl.constexpr, MASK: tl.constexpr, KV_TMA: tl.constexpr):
    """K/V tile of keys [start_n, start_n + BLOCK_N). KV_TMA: K, V are TMA descriptors over
    [T, H * D] (kcol = kvh * D) and the tile comes in one bulk copy; keys past T read as zeros,
    keys past `end` (but < T) are real values that the caller's mask removes. Otherwise K, V
    point at this head's [T, D] slice and keys past `end` are not read."""
    if KV_TMA:
        k = K.load([start_n, kcol])
        v = V.load([start_n, kcol])
    else:
        kpos = start_n + tl.arange(0, BLOCK_N)
        offs_d = tl.arange(0, D)
        if MASK:
            in_span = kpos < end
            k = tl.load(K + kpos[:, None] * stride_kt + offs_d[None, :], mask=in_span[:, None], other=0.0)
            v = tl.load(V + kpos[:, None] * stride_vt + offs_d[None, :], mask=in_span[:, None], other=0.0)
        else:
            k = tl.load(K + kpos[:, None] * stride_kt + offs_d[None, :])
            v = tl.load(V + kpos[:, None] * stride_vt + offs_d[None, :])
    return k, v


@triton.jit
def _visible(kpos, end, qpos, qdoc, window, HAS_WINDOW: tl.constexpr):
    """[rows, keys] mask of a masked span: the key is in the span (its last block may run into
    the next span), not after the row, in the row's document and, with a window, within it."""
    vis = (kpos[None, :] < end) & (kpos[None, :] <= qpos[:, None]) & (kpos[None, :] >= qdoc[:, None])
    if HAS_WINDOW:
        vis = vis & (kpos[None, :] > qpos[:, None] - window)
    return vis


@triton.jit
def _fwd_inner(acc, l_i, m_i, q, qpos, qdoc, K, V, stride_kt, stride_vt, kcol, start, end, qk_scale, window,
               D: tl.constexpr, BLOCK_N: tl.constexpr, MASK: tl.constexpr, HAS_WINDOW: tl.constexpr,
               DOT_PREC: tl.constexpr, KV_TMA: tl.constexpr):
    offs_n = tl.arange(0, BLOCK_N)
    for start_n in range(start, end, BLOCK_N):
        kpos = start_n + offs_n
        k, v = _load_kv(K, V, stride_kt, stride_vt, kcol, start_n, end, D, BLOCK_N, MASK, KV_TMA)
        s = tl.dot(q, tl.trans(k), input_precision=DOT_PREC) * qk_scale
        if MASK:
            s = tl.where(_visible(kpos, end, qpos, qdoc, window, HAS_WINDOW), s, float("-inf"))
        # m_i starts finite (-1e30), so a row that has seen only masked keys gets p = 0, not NaN
        m_new = tl.maximum(m_i, tl.max(s, 1))
        p = tl.math.exp2(s - m_new[:, None])
        alpha = tl.math.exp2(m_i - m_new)
        l_i = l_i * alpha + tl.sum(p, 1)
        acc = acc * alpha[:, None]
        acc = tl.dot(p.to(v.dtype), v, acc, input_precision=DOT_PREC)
        m_i = m_new
    return acc, l_i, m_i


@triton.jit
def _row_block_bounds(POS, DOCSTART, row0, n_rows, window,
                      G: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                      COMPACT: tl.constexpr, HAS_WINDOW: tl.constexpr):
    """Key spans of a row block: masked [lo, mid_s), unmasked [mid_s, mid_e), masked [mid_e, hi)."""
    c_first = row0 // G
    c_last = (tl.minimum(row0 + BLOCK_M, n_rows) - 1) // G
    if COMPACT:
        p0 = tl.load(POS + c_first)
        p1 = tl.load(POS + c_last)
    else:
        p0 = c_first
        p1 = c_last
    lo = tl.load(DOCSTART + p0)
    full_lo = tl.load(DOCSTART + p1)
    if HAS_WINDOW:
        lo = tl.maximum(lo, p0 - window + 1)
        full_lo = tl.maximum(full_lo, p1 - window + 1)
    hi = p1 + 1
    n_full = tl.maximum(p0 + 1 - full_lo, 0) // BLOCK_N
    mid_s = tl.where(n_full > 0, full_lo, hi)
    mid_e = tl.where(n_full > 0, full_lo + n_full * BLOCK_N, hi)
    return lo, mid_s, mid_e, hi


@triton.jit
def _row_block_rows(POS, DOCSTART, row0, n_rows, kvh,
                    G: tl.constexpr, BLOCK_M: tl.constexpr, COMPACT: tl.constexpr):
    rows = row0 + tl.arange(0, BLOCK_M)
    row_ok = rows < n_rows
    rows = tl.minimum(rows, n_rows - 1)  # padded rows repeat the last row; never stored
    c = rows // G
    hq = kvh * G + rows % G
    if COMPACT:
        qpos = tl.load(POS + c)
    else:
        qpos = c
    qdoc = tl.load(DOCSTART + qpos)
    return row_ok, c, hq, qpos, qdoc


@triton.jit(do_not_specialize=["n_rows"])
def _fwd_kernel(Q, K, V, O, LSE, POS, DOCSTART,
                stride_qt, stride_qh, stride_kt, stride_kh, stride_vt, stride_vh, stride_ot, stride_oh,
                n_rows, HQ, window, qk_scale,
                G: tl.constexpr, D: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                COMPACT: tl.constexpr, HAS_WINDOW: tl.constexpr, DOT_PREC: tl.constexpr,
                KV_TMA: tl.constexpr):
    # grid (H, row blocks): heaviest blocks (latest positions) of every head first, better tail
    kvh = tl.program_id(0)
    pid_m = tl.num_programs(1) - 1 - tl.program_id(1)
    row0 = pid_m * BLOCK_M
    row_ok, c, hq, qpos, qdoc = _row_block_rows(POS, DOCSTART, row0, n_rows, kvh, G, BLOCK_M, COMPACT)
    offs_d = tl.arange(0, D)
    tok = qpos.to(tl.int64)
    q = tl.load(Q + tok[:, None] * stride_qt + hq[:, None] * stride_qh + offs_d[None, :])
    lo, mid_s, mid_e, hi = _row_block_bounds(POS, DOCSTART, row0, n_rows, window,
                                             G, BLOCK_M, BLOCK_N, COMPACT, HAS_WINDOW)
    if not KV_TMA:
        K += kvh * stride_kh
        V += kvh * stride_vh
    m_i = tl.zeros([BLOCK_M], dtype=tl.float32) - 1.0e30
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    acc = tl.zeros([BLOCK_M, D], dtype=tl.float32)
    acc, l_i, m_i = _fwd_inner(acc, l_i, m_i, q, qpos, qdoc, K, V, stride_kt, stride_vt, kvh * D, mid_s, mid_e,
                               qk_scale, window, D, BLOCK_N, False, HAS_WINDOW, DOT_PREC, KV_TMA)
    acc, l_i, m_i = _fwd_inner(acc, l_i, m_i, q, qpos, qdoc, K, V, stride_kt, stride_vt, kvh * D, lo, mid_s,
                               qk_scale, window, D, BLOCK_N, True, HAS_WINDOW, DOT_PREC, KV_TMA)
    acc, l_i, m_i = _fwd_inner(acc, l_i, m_i, q, qpos, qdoc, K, V, stride_kt, stride_vt, kvh * D, mid_e, hi,
                               qk_scale, window, D, BLOCK_N, True, HAS_WINDOW, DOT_PREC, KV_TMA)
    acc = acc / l_i[:, None]
    tl.store(O + tok[:, None] * stride_ot + hq[:, None] * stride_oh + offs_d[None, :],
             acc.to(O.dtype.element_ty), mask=row_ok[:, None])
    tl.store(LSE + c * HQ + hq, m_i + tl.math.log2(l_i), mask=row_ok)


# ----------------------------------------------------------------------------- backward: dQ


@triton.jit
def _dq_inner(dq, q, do, lse, delta, qpos, qdoc, K, V, stride_kt, stride_vt, kcol, start, end, qk_scale, window,
              D: tl.constexpr, BLOCK_N: tl.constexpr, MASK: tl.constexpr, HAS_WINDOW: tl.constexpr,
              DOT_PREC: tl.constexpr, KV_TMA: tl.constexpr):
    offs_n = tl.arange(0, BLOCK_N)
    for start_n in range(start, end, BLOCK_N):
        kpos = start_n + offs_n
        k, v = _load_kv(K, V, stride_kt, stride_vt, kcol, start_n, end, D, BLOCK_N, MASK, KV_TMA)
        s = tl.dot(q, tl.trans(k), input_precision=DOT_PREC) * qk_scale
        p = tl.math.exp2(s - lse[:, None])
        if MASK:
            p = tl.where(_visible(kpos, end, qpos, qdoc, window, HAS_WINDOW), p, 0.0)
        dp = tl.dot(do, tl.trans(v), input_precision=DOT_PREC)
        ds = p * (dp - delta[:, None])
        dq = tl.dot(ds.to(k.dtype), k, dq, input_precision=DOT_PREC)
    return dq


@triton.jit(do_not_specialize=["n_rows"])
def _bwd_dq_kernel(Q, K, V, O, DO, DQ, LSE, DELTA, POS, DOCSTART,
                   stride_qt, stride_qh, stride_kt, stride_kh, stride_vt, stride_vh,
                   stride_ot, stride_oh, stride_dot, stride_doh, stride_dqt, stride_dqh,
                   n_rows, HQ, window, qk_scale, sm_scale,
                   G: tl.constexpr, D: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                   COMPACT: tl.constexpr, HAS_WINDOW: tl.constexpr, DOT_PREC: tl.constexpr,
                   KV_TMA: tl.constexpr):
    kvh = tl.program_id(0)
    pid_m = tl.num_programs(1) - 1 - tl.program_id(1)
    row0 = pid_m * BLOCK_M
    row_ok, c, hq, qpos, qdoc = _row_block_rows(POS, DOCSTART, row0, n_rows, kvh, G, BLOCK_M, COMPACT)
    offs_d = tl.arange(0, D)
    tok = qpos.to(tl.int64)
    q = tl.load(Q + tok[:, None] * stride_qt + hq[:, None] * stride_qh + offs_d[None, :])
    do = tl.load(DO + tok[:, None] * stride_dot + hq[:, None] * stride_doh + offs_d[None, :])
    o = tl.load(O + tok[:, None] * stride_ot + hq[:, None] * stride_oh + offs_d[None, :])
    # fused preprocess: delta = rowsum(dO * O), kept for the dK/dV kernel
    delta = tl.sum(o.to(tl.float32) * do.to(tl.float32), 1)
    tl.store(DELTA + c * HQ + hq, delta, mask=row_ok)
    lse = tl.load(LSE + c * HQ + hq)
    lo, mid_s, mid_e, hi = _row_block_bounds(POS, DOCSTART, row0, n_rows, window,
                                             G, BLOCK_M, BLOCK_N, COMPACT, HAS_WINDOW)
    if not KV_TMA:
        K += kvh * stride_kh
        V += kvh * stride_vh
    dq = tl.zeros([BLOCK_M, D], dtype=tl.float32)
    dq = _dq_inner(dq, q, do, lse, delta, qpos, qdoc, K, V, stride_kt, stride_vt, kvh * D, mid_s, mid_e, qk_scale,
                   window, D, BLOCK_N, False, HAS_WINDOW, DOT_PREC, KV_TMA)
    dq = _dq_inner(dq, q, do, lse, delta, qpos, qdoc, K, V, stride_kt, stride_vt, kvh * D, lo, mid_s, qk_scale,
                   window, D, BLOCK_N, True, HAS_WINDOW, DOT_PREC, KV_TMA)
    dq = _dq_inner(dq, q, do, lse, delta, qpos, qdoc, K, V, stride_kt, stride_vt, kvh * D, mid_e, hi, qk_scale,
                   window, D, BLOCK_N, True, HAS_WINDOW, DOT_PREC, KV_TMA)
    dq = dq * sm_scale
    tl.store(DQ + tok[:, None] * stride_dqt + hq[:, None] * stride_dqh + offs_d[None, :],
             dq.to(DQ.dtype.element_ty), mask=row_ok[:, None])


# ----------------------------------------------------------------------------- backward: dK, dV


@triton.jit
def _dkdv_inner(dk, dv, k, v, kpos, QR, DOR, LSE, DELTA, POS, DOCSTART, row_base,
                start, end, qk_scale, window,
                G: tl.constexpr, D: tl.constexpr, BLOCK_M: tl.constexpr, MASK: tl.constexpr,
                COMPACT: tl.constexpr, HAS_WINDOW: tl.constexpr, DOT_PREC: tl.constexpr,
                TMA: tl.constexpr, DP_FIRST: tl.constexpr):
    """Adds the row span [start, end) of this KV head to dk, dv. Rows are read from copies in
    this kernel's row order, [H * N * G, D] and [H * N * G] (this head's rows from row_base)."""
    offs_m = tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, D)
    for start_m in range(start, end, BLOCK_M):
        rows = start_m + offs_m
        if MASK:
            row_ok = rows < end  # rows past the span belong to the next span: exclude them
            rows = tl.minimum(rows, end - 1)
        c = rows // G
        r = row_base + rows
        if TMA:  # block loads (rows past the span are loaded, then masked out below)
            q = QR.load([row_base + start_m, 0])
            do = DOR.load([row_base + start_m, 0])
            # LSE is a descriptor over lse and delta packed as [rows, 4] (lse, delta, 0, 0;
            # DELTA is the same descriptor): one bulk copy instead of a 4-byte load per row
            # and thread (the score layout spreads a row over threads)
            ld = LSE.load([row_base + start_m, 0])
            ld_a, ld_b = tl.split(tl.reshape(ld, [BLOCK_M, 2, 2]))
            lse, _ = tl.split(ld_a)
            delta, _ = tl.split(ld_b)
        else:
            r64 = r.to(tl.int64)
            q = tl.load(QR + r64[:, None] * D + offs_d[None, :])
            do = tl.load(DOR + r64[:, None] * D + offs_d[None, :])
            lse = tl.load(LSE + r)
            delta = tl.load(DELTA + r)
        # transposed problem: keys are rows of sT [BLOCK_N, BLOCK_M]
        sT = tl.dot(k, tl.trans(q), input_precision=DOT_PREC) * qk_scale
        if DP_FIRST:  # dP's products run on the tensor cores while the exponentials are computed
            dpT = tl.dot(v, tl.trans(do), input_precision=DOT_PREC)
        pT = tl.math.exp2(sT - lse[None, :])
        if MASK:
            if COMPACT:
                qpos = tl.load(POS + c)
            else:
                qpos = c
            # visible keys of a row: [lo, hi]; hi = -1 hides rows past the span (fewer live vectors)
            lo = tl.load(DOCSTART + qpos)
            if HAS_WINDOW:
                lo = tl.maximum(lo, qpos - window + 1)
            hi = tl.where(row_ok, qpos, -1)
            pT = tl.where((kpos[:, None] <= hi[None, :]) & (kpos[:, None] >= lo[None, :]), pT, 0.0)
        dv = tl.dot(pT.to(do.dtype), do, dv, input_precision=DOT_PREC)
        if not DP_FIRST:
            dpT = tl.dot(v, tl.trans(do), input_precision=DOT_PREC)
        dsT = (pT * (dpT - delta[None, :])).to(q.dtype)
        dk = tl.dot(dsT, q, dk, input_precision=DOT_PREC)
    return dk, dv


@triton.jit(do_not_specialize=["n_comp", "T"])
def _bwd_dkdv_kernel(QR, K, V, DOR, QRP, DORP, DK, DV, LSE, DELTA, LSEP, DELTAP, POS, DOCSTART, DOCEND,
                     stride_kt, stride_kh, stride_vt, stride_vh,
                     stride_dkt, stride_dkh, stride_dvt, stride_dvh,
                     n_comp, T, window, qk_scale, sm_scale,
                     G: tl.constexpr, D: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                     COMPACT: tl.constexpr, HAS_WINDOW: tl.constexpr, DOT_PREC: tl.constexpr,
                     TMA: tl.constexpr, EDGE_M: tl.constexpr, DP_FIRST: tl.constexpr):
    # grid (H, key blocks): early key blocks are seen by the most rows, so they start first.
    # QR, DOR, LSE, DELTA: the row-order copies (TMA descriptors when TMA); QRP, DORP, LSEP,
    # DELTAP: the same copies as pointers, for the masked edge spans, which run in EDGE_M-row
    # tiles with pointer loads (their masks need extra registers).
    kvh = tl.program_id(0)
    pid_n = tl.program_id(1)
    n0 = pid_n * BLOCK_N
    kpos = n0 + tl.arange(0, BLOCK_N)
    key_ok = kpos < T
    n_last = tl.minimum(n0 + BLOCK_N, T) - 1
    offs_d = tl.arange(0, D)
    k = tl.load(K + kvh * stride_kh + kpos[:, None] * stride_kt + offs_d[None, :], mask=key_ok[:, None], other=0.0)
    v = tl.load(V + kvh * stride_vh + kpos[:, None] * stride_vt + offs_d[None, :], mask=key_ok[:, None], other=0.0)
    # compact tokens that see some key of the block, and those that see all of it
    vis_end = tl.load(DOCEND + n_last)
    full_end = tl.load(DOCEND + n0)
    if HAS_WINDOW:
        vis_end = tl.minimum(vis_end, n_last + window)
        full_end = tl.minimum(full_end, n0 + window)
    row_lo = _lower_bound(POS, n_comp, n0, COMPACT) * G
    row_hi = _lower_bound(POS, n_comp, vis_end, COMPACT) * G
    full_lo = _lower_bound(POS, n_comp, n_last, COMPACT) * G
    full_hi = _lower_bound(POS, n_comp, full_end, COMPACT) * G
    n_full = tl.maximum(full_hi - full_lo, 0) // BLOCK_M
    mid_s = tl.where(n_full > 0, full_lo, row_hi)
    mid_e = tl.where(n_full > 0, full_lo + n_full * BLOCK_M, row_hi)
    dk = tl.zeros([BLOCK_N, D], dtype=tl.float32)
    dv = tl.zeros([BLOCK_N, D], dtype=tl.float32)
    row_base = kvh * n_comp * G
    dk, dv = _dkdv_inner(dk, dv, k, v, kpos, QR, DOR, LSE, DELTA, POS, DOCSTART, row_base, mid_s, mid_e,
                         qk_scale, window, G, D, BLOCK_M, False, COMPACT, HAS_WINDOW, DOT_PREC, TMA, DP_FIRST)
    dk, dv = _dkdv_inner(dk, dv, k, v, kpos, QRP, DORP, LSEP, DELTAP, POS, DOCSTART, row_base, row_lo, mid_s,
                         qk_scale, window, G, D, EDGE_M, True, COMPACT, HAS_WINDOW, DOT_PREC, False, False)
    dk, dv = _dkdv_inner(dk, dv, k, v, kpos, QRP, DORP, LSEP, DELTAP, POS, DOCSTART, row_base, mid_e, row_hi,
                         qk_scale, window, G, D, EDGE_M, True, COMPACT, HAS_WINDOW, DOT_PREC, False, False)
    dk = dk * sm_scale
    tl.store(DK + kvh * stride_dkh + kpos[:, None] * stride_dkt + offs_d[None, :],
             dk.to(DK.dtype.element_ty), mask=key_ok[:, None])
    tl.store(DV + kvh * stride_dvh + kpos[:, None] * stride_dvt + offs_d[None, :],
             dv.to(DV.dtype.element_ty), mask=key_ok[:, None])


# ----------------------------------------------------------------------------- launches


def _common(q, window, scale):
    D = q.shape[-1]
    has_window = window is not None
    dot_prec = "ieee" if q.dtype == torch.float32 else "tf32"
    return dict(D=D, HAS_WINDOW=has_window, DOT_PREC=dot_prec), (window if has_window else 0), scale * LOG2E


def forward(q, k, v, pos, docstart, window, scale, config: KernelConfig, kv_tma: bool):
    """Returns out [T, HQ, D] (zeros on unrouted rows) and lse [N, HQ] float32 (base 2).

    pos: int32 [N] sorted routed positions, or None for all tokens (no compaction).
    docstart: int32 [T]. window: int or None. config, kv_tma: the forward's part of a LaunchPlan.
    """
    T, HQ, D = q.shape
    H = k.shape[1]
    G = HQ // H
    compact = pos is not None
    n = pos.numel() if compact else T
    out = torch.zeros_like(q) if compact else torch.empty_like(q)
    lse = torch.empty((n, HQ), device=q.device, dtype=torch.float32)
    if n == 0:
        return out, lse
    const, window_arg, qk_scale = _common(q, window, scale)
    BM, BN = config.block_m, config.block_n
    n_rows = n * G
    k_arg, v_arg, kv_tma = _kv_args(kv_tma, k, v, BN)
    _fwd_kernel[(H, triton.cdiv(n_rows, BM))](
        q, k_arg, v_arg, out, lse, pos if compact else docstart, docstart,
        q.stride(0), q.stride(1), k.stride(0), k.stride(1), v.stride(0), v.stride(1),
        out.stride(0), out.stride(1),
        n_rows, HQ, window_arg, qk_scale,
        G=G, BLOCK_M=BM, BLOCK_N=BN, COMPACT=compact, KV_TMA=kv_tma,
        num_warps=config.num_warps, num_stages=config.num_stages, **const,
    )
    return out, lse


def _tma_descriptor(t2d, block_rows, block_cols=None):
    from triton.tools.tensor_descriptor import TensorDescriptor

    return TensorDescriptor(t2d, list(t2d.shape), list(t2d.stride()), [block_rows, block_cols or t2d.shape[1]])


def _has_tma(t) -> bool:
    return not INTERPRETED and t.is_cuda and torch.cuda.get_device_capability(t.device)[0] >= 9


def _kv_args(requested, k, v, block_n):
    """(K, V, KV_TMA) arguments of the forward and dQ kernels: TMA descriptors over [T, H * D]
    where requested and the layout allows it (Hopper or newer, each head's D values contiguous,
    16-byte aligned rows), else the tensors themselves for pointer loads."""
    T, H, D = k.shape
    ok = requested and _has_tma(k) and all(
        t.stride(2) == 1 and t.stride(1) == D and (t.stride(0) * t.element_size()) % 16 == 0
        and t.data_ptr() % 16 == 0 for t in (k, v))
    if not ok:
        return k, v, False
    return (*(_tma_descriptor(t.as_strided((T, H * D), (t.stride(0), 1)), block_n, D) for t in (k, v)), True)


def backward(do, q, k, v, out, lse, pos, docstart, docend, window, scale, plan: LaunchPlan):
    """Returns dq, dk, dv for forward(...) above; dq is zero on unrouted rows."""
    T, HQ, D = q.shape
    H = k.shape[1]
    compact = pos is not None
    n = pos.numel() if compact else T
    if n == 0:
        return torch.zeros_like(q), torch.zeros_like(k), torch.zeros_like(v)
    const, window_arg, qk_scale = _common(q, window, scale)
    pos_arg = pos if compact else docstart
    dq, delta = _backward_dq(do, q, k, v, out, lse, pos_arg, docstart, n, compact, window_arg, qk_scale, scale,
                             plan, const)
    dk, dv = _backward_dkdv(do, q, k, v, lse, delta, pos, pos_arg, docstart, docend, n, compact, window_arg,
                            qk_scale, scale, plan, const)
    return dq, dk, dv


def _backward_dq(do, q, k, v, out, lse, pos_arg, docstart, n, compact, window_arg, qk_scale, scale, plan, const):
    """dQ kernel: dq, and delta = rowsum(dO * O) [N, HQ] for the dK/dV kernel."""
    HQ, H = q.shape[1], k.shape[1]
    n_rows = n * (HQ // H)
    dq = torch.zeros_like(q) if compact else torch.empty_like(q)
    delta = torch.empty_like(lse)
    cfg = plan.dq
    k_arg, v_arg, kv_tma = _kv_args(plan.dq_kv_tma, k, v, cfg.block_n)
    _bwd_dq_kernel[(H, triton.cdiv(n_rows, cfg.block_m))](
        q, k_arg, v_arg, out, do, dq, lse, delta, pos_arg, docstart,
        q.stride(0), q.stride(1), k.stride(0), k.stride(1), v.stride(0), v.stride(1),
        out.stride(0), out.stride(1), do.stride(0), do.stride(1), dq.stride(0), dq.stride(1),
        n_rows, HQ, window_arg, qk_scale, scale,
        G=HQ // H, BLOCK_M=cfg.block_m, BLOCK_N=cfg.block_n, COMPACT=compact, KV_TMA=kv_tma,
        num_warps=cfg.num_warps, num_stages=cfg.num_stages, **const,
    )
    return dq, delta


def _backward_dkdv(do, q, k, v, lse, delta, pos, pos_arg, docstart, docend, n, compact, window_arg, qk_scale,
                   scale, plan, const):
    """dK/dV kernel over copies of the routed rows of q, dO, lse and delta in its row order."""
    T, HQ, D = q.shape
    H = k.shape[1]
    G = HQ // H
    n_rows = n * G
    cfg = plan.dkdv
    dk = torch.empty_like(k)
    dv = torch.empty_like(v)

    def rows(t, select):  # [T or N, HQ, ...] -> [H * N * G, ...]: each KV head's rows contiguous
        t = t.unflatten(1, (H, G)).transpose(0, 1)
        t = t.index_select(1, pos) if select and compact else t.contiguous()
        return t.view(H * n_rows, *t.shape[3:])

    qr, dor, lse_r, delta_r = rows(q, True), rows(do, True), rows(lse, False), rows(delta, False)
    ptr_args = (qr, dor, lse_r, delta_r)  # pointer loads of the masked edge spans
    tma = plan.dkdv_tma and _has_tma(q)
    if tma:
        # lse and delta side by side, padded to TMA's 16-byte minimum row ([rows, 2] is too narrow;
        # 1-D descriptors of each compiled but hit an illegal instruction with triton 3.6 on sm_90)
        packed = torch.zeros((H * n_rows, 4), device=q.device, dtype=torch.float32)
        packed[:, 0], packed[:, 1] = lse_r, delta_r
        lse_desc = _tma_descriptor(packed, cfg.block_m)
        qr, dor, lse_r, delta_r = _tma_descriptor(qr, cfg.block_m), _tma_descriptor(dor, cfg.block_m), lse_desc, lse_desc
    _bwd_dkdv_kernel[(H, triton.cdiv(T, cfg.block_n))](
        qr, k, v, dor, ptr_args[0], ptr_args[1], dk, dv, lse_r, delta_r, ptr_args[2], ptr_args[3],
        pos_arg, docstart, docend,
        k.stride(0), k.stride(1), v.stride(0), v.stride(1),
        dk.stride(0), dk.stride(1), dv.stride(0), dv.stride(1),
        n, T, window_arg, qk_scale, scale,
        G=G, BLOCK_M=cfg.block_m, BLOCK_N=cfg.block_n, COMPACT=compact, TMA=tma,
        EDGE_M=plan.dkdv_edge_m, DP_FIRST=plan.dkdv_dp_first,
        num_warps=cfg.num_warps, num_stages=cfg.num_stages, **const,
    )
    return dk, dv
