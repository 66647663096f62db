"""Triton kernels of the routed FFN's decode path (T <= 64 tokens): a masked dense FFN over the span of the
used ranges, each used weight block read once, no routing metadata.

Per token t and neuron n, the routed FFN equals a masked dense one:
    y[t] = sum_n c[t, n] h[t, n] Wd[:, n] + b_down * sum_k g[t, k] [width(r[t, k]) > 0]
    c[t, n] = sum_k g[t, k] [start(r[t, k]) <= n < end(r[t, k])]
because h[t, n] (act(gate) * up at neuron n) does not depend on the route. With T <= 64 tokens the GEMMs are
bound by reading the weights, so computing h on neurons a token does not use costs nothing, while one pass
over each used weight block (instead of one per route) saves bytes. Blocks no token uses are not read.
"""

from __future__ import annotations

import triton
import triton.language as tl

from routefx.backends.triton.kernels import _gate_up_loop, _gated_act, _ptr_loop

__all__ = ["span_up_kernel", "span_down_kernel"]


@triton.jit
def _coef(routes_ptr, gates_ptr, rstart_ptr, rwidth_ptr, t, t_ok, n, K, NR, HAS_GATES: tl.constexpr,
          BM: tl.constexpr, BN: tl.constexpr):
    """c[t, n] for a [BM] vector of tokens t and a [BN] vector of neurons n (fp32 [BM, BN])."""
    c = tl.zeros((BM, BN), dtype=tl.float32)
    for k in range(0, K):
        r = tl.load(routes_ptr + t * K + k, mask=t_ok, other=0)
        r = tl.where((r >= 0) & (r < NR - 1), r, NR - 1).to(tl.int32)  # drop bucket: width 0
        s = tl.load(rstart_ptr + r)
        e = s + tl.load(rwidth_ptr + r)
        if HAS_GATES:
            g = tl.load(gates_ptr + t * K + k, mask=t_ok, other=0.0).to(tl.float32)
        else:
            g = tl.where(t_ok, 1.0, 0.0)
        inside = (n[None, :] >= s[:, None]) & (n[None, :] < e[:, None])
        c += tl.where(inside, g[:, None], 0.0)
    return c


@triton.jit
def span_up_kernel(
    x_ptr, wu_ptr, wg_ptr, bu_ptr, bg_ptr, h_ptr, routes_ptr, gates_ptr, rstart_ptr, rwidth_ptr,
    T, D, K, NR, LO, SPAN,
    stride_x, stride_wu, stride_wg, stride_h,
    GATED: tl.constexpr, HAS_BU: tl.constexpr, HAS_BG: tl.constexpr, HAS_GATES: tl.constexpr, ACT: tl.constexpr,
    IEEE: tl.constexpr, BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr, CLAMPS: tl.constexpr = 0,
    GMAX: tl.constexpr = 0.0, AMAX: tl.constexpr = 0.0, ULIM: tl.constexpr = 0.0, UADD: tl.constexpr = 0.0,
    ALPHA: tl.constexpr = 1.0, XN: tl.constexpr = 0.0, XB: tl.constexpr = 0.0, XE: tl.constexpr = 0.0,
):
    """h[t, j] = c[t, LO + j] * act-product(x[t], neuron LO + j) for all T (<= BM) tokens and one block of BN
    neurons of the span [LO, LO + SPAN); a block that no token uses skips its loads and stores zeros."""
    pid = tl.program_id(0)
    t = tl.arange(0, BM)
    t_ok = t < T
    col = pid * BN + tl.arange(0, BN)
    col_ok = col < SPAN
    neuron = LO + col
    c = _coef(routes_ptr, gates_ptr, rstart_ptr, rwidth_ptr, t, t_ok, neuron, K, NR, HAS_GATES, BM, BN)
    used = tl.max(tl.max(tl.abs(c), 1), 0) > 0
    kk = tl.arange(0, BK)
    n64 = neuron.to(tl.int64)
    a_ptrs = x_ptr + t.to(tl.int64)[:, None] * stride_x + kk[None, :]
    u_ptrs = wu_ptr + n64[None, :] * stride_wu + kk[:, None]
    g_ptrs = wg_ptr + n64[None, :] * stride_wg + kk[:, None]
    # a block no token uses reduces over nothing (no weight loads)
    acc_u, acc_g = _gate_up_loop(a_ptrs, u_ptrs, g_ptrs, t_ok, col_ok, tl.where(used, D, 0), GATED, IEEE,
                                 BM, BN, BK)
    hval = _gated_act(acc_u, acc_g, bu_ptr, bg_ptr, n64, col_ok, GATED, HAS_BU, HAS_BG, ACT, CLAMPS, GMAX, AMAX,
                      ULIM, UADD, ALPHA, XN, XB, XE)
    hval = tl.where(c != 0.0, hval * c, 0.0)
    h_ptrs = h_ptr + t[:, None] * stride_h + col[None, :]
    tl.store(h_ptrs, hval.to(h_ptr.dtype.element_ty), mask=t_ok[:, None] & col_ok[None, :])


@triton.jit
def span_down_kernel(
    h_ptr, wd_ptr, bd_ptr, part_ptr, routes_ptr, gates_ptr, rstart_ptr, rwidth_ptr,
    T, D, K, NR, LO, SPAN,
    stride_h, stride_wd,
    HAS_BD: tl.constexpr, HAS_GATES: tl.constexpr, IEEE: tl.constexpr,
    BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr,
):
    """part[split, t, cols] = h[t, chunk] Wd[cols, LO + chunk]^T (+ b_down * sum_k g[t, k] [width > 0] in split 0),
    fp32; split s (program axis 1) reduces over span columns [s*CHUNK, (s+1)*CHUNK), CHUNK = the span split
    evenly in multiples of BK, clipped to the columns the tokens use.
    The caller sums the splits (deterministic; no atomics)."""
    pid_n = tl.program_id(0)
    split = tl.program_id(1)
    t = tl.arange(0, BM)
    t_ok = t < T
    col = pid_n * BN + tl.arange(0, BN)
    col_ok = col < D
    # used span columns [lo_u, hi_u): min start / max end over the tokens' non-empty routes, relative to LO
    lo_v = tl.zeros((BM,), dtype=tl.int32) + SPAN
    hi_v = tl.zeros((BM,), dtype=tl.int32)
    bias_c = tl.zeros((BM,), dtype=tl.float32)
    for k in range(0, K):
        r = tl.load(routes_ptr + t * K + k, mask=t_ok, other=0)
        r = tl.where((r >= 0) & (r < NR - 1), r, NR - 1).to(tl.int32)
        s = tl.load(rstart_ptr + r) - LO
        w = tl.load(rwidth_ptr + r)
        live = t_ok & (w > 0)
        lo_v = tl.minimum(lo_v, tl.where(live, s, SPAN))
        hi_v = tl.maximum(hi_v, tl.where(live, s + w, 0))
        if HAS_GATES:
            g = tl.load(gates_ptr + t * K + k, mask=t_ok, other=0.0).to(tl.float32)
        else:
            g = tl.where(t_ok, 1.0, 0.0)
        bias_c += tl.where(live, g, 0.0)
    lo_u = tl.min(lo_v, 0)
    hi_u = tl.max(hi_v, 0)
    n_split = tl.num_programs(1)
    chunk = ((SPAN + n_split - 1) // n_split + BK - 1) // BK * BK
    k_begin = tl.maximum(split * chunk, (lo_u // BK) * BK)
    k_end = tl.minimum((split + 1) * chunk, hi_u)
    kk = tl.arange(0, BK)
    acc = tl.zeros((BM, BN), dtype=tl.float32)
    k_begin = tl.multiple_of(k_begin, BK)
    a_ptrs = h_ptr + t[:, None] * stride_h + (k_begin + kk)[None, :]  # [BM, BK]
    b_ptrs = wd_ptr + col.to(tl.int64)[None, :] * stride_wd + (LO + k_begin + kk)[:, None]  # [BK, BN]
    acc = _ptr_loop(a_ptrs, b_ptrs, t_ok, col_ok, k_begin, k_end, acc, IEEE, BK)
    if HAS_BD:
        bd = tl.load(bd_ptr + col, mask=col_ok, other=0.0).to(tl.float32)
        acc += tl.where(split == 0, bias_c[:, None] * bd[None, :], 0.0)
    p_ptrs = part_ptr + (split * T + t)[:, None].to(tl.int64) * D + col[None, :]
    tl.store(p_ptrs, acc, mask=t_ok[:, None] & col_ok[None, :])
