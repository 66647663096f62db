"""Triton kernels of the routed FFN: two grouped GEMMs over route-sorted rows, with heterogeneous widths.

Layout shared by both kernels (N = T*K assignments (token, slot), R' = R + 1 routes, the last one a drop bucket
of width 0 for route ids outside [0, R)):
    order   [N]    int32  assignment ids (token * K + slot) sorted by route, stable; route r owns
                          order[off[r] : off[r] + count[r]]  (see `routing.route_metadata`)
    count   [R']   int32  assignments per route;  off [R'] int32 exclusive prefix sum of count
    rstart  [R']   int32  first neuron of each route's range;  rwidth [R'] int32 its width (0 = skip)
    h       [N, WP]       intermediate activations in sorted order: row off[r] + i holds the first rwidth[r]
                          neurons of route r for assignment order[off[r] + i]

Tiles are (route r, row block, column block), numbered route by route. The tile map is computed inside each
program from `count` and `rwidth` (a prefix sum over R' routes), so it follows whatever block sizes the
autotuner picked and needs no host synchronisation. Routes of width 0 (skips) have 0 tiles, so they launch
nothing. Program p runs tiles p, p + P, p + 2P, ... below the real tile count (P programs launched): the host
launches either its upper bound on the tile count (one tile per program; programs past the real count do a
zero-trip loop) or, for configurations with PERSIST=1, at most one program per multiprocessor (persistent).

Row blocks are not padded: a tile masks the rows past its route's count (loads and stores), so routes share
no rows of `h` without any padding of the sorted layout, whatever BM the autotuner chose.
"""

from __future__ import annotations

import functools

import triton
import triton.language as tl

__all__ = ["ACT_CODES", "act_constants", "up_kernel", "down_kernel", "route_sort_kernel"]

# Activation name -> constexpr code used by `_act` (names as in routefx.ir.activations.ACTIVATIONS).
ACT_CODES = {
    "identity": 0,
    "silu": 1,
    "gelu": 2,
    "gelu_tanh": 3,
    "relu": 4,
    "relu2": 5,
    "sigmoid": 6,
    "quick_gelu": 7,
    "swish": 8,      # z * sigmoid(ALPHA z)
    "xielu": 9,      # where(z > 0, ALPHA z² + XB z, XN (exp(min(z, XE)) - 1 - z) + XB z)   (ALPHA = alpha_p)
}


@functools.lru_cache(maxsize=None)
def act_constants(activation: str) -> dict:
    """The kernels' constexpr arguments for an activation name (`routefx.ir.activations.ActivationSpec`): ACT, and
    for a parametrised name CLAMPS (bits: 1 gate_max, 2 act_max, 4 up_limit, 8 up_add) with their values, swish's
    ALPHA, and xielu's four parameters (ALPHA = alpha_p, XN = alpha_n, XB = beta, XE = eps). Raises
    `UnsupportedActivationError` for an unknown name. Cached per name (a kernel launch reads it); the dict is
    shared: callers unpack it, never change it."""
    from routefx.ir.activations import parse_activation
    s = parse_activation(activation)
    out = dict(ACT=ACT_CODES[s.base])
    if s.plain:
        return out
    bits = (s.gate_max is not None) | (s.act_max is not None) << 1 | (s.up_limit is not None) << 2 \
        | (s.up_add != 0.0) << 3
    out.update(CLAMPS=int(bits), GMAX=float(s.gate_max or 0.0), AMAX=float(s.act_max or 0.0),
               ULIM=float(s.up_limit or 0.0), UADD=float(s.up_add),
               ALPHA=float(s.alpha_p if s.base == "xielu" else s.alpha or 1.0))
    if s.base == "xielu":
        out.update(XN=float(s.alpha_n), XB=float(s.beta), XE=float(s.eps))
    return out


@triton.jit
def _sigmoid(z):
    return 1.0 / (1.0 + tl.exp(-z))


@triton.jit
def _act(z, ACT: tl.constexpr, ALPHA: tl.constexpr = 1.0, XN: tl.constexpr = 0.0, XB: tl.constexpr = 0.0,
         XE: tl.constexpr = 0.0):
    """Elementwise activation on an fp32 tile (codes in ACT_CODES)."""
    if ACT == 1:
        z = z * _sigmoid(z)
    elif ACT == 2:
        z = 0.5 * z * (1.0 + tl.math.erf(z * 0.7071067811865476))
    elif ACT == 3:
        # tanh(u) = 2 sigmoid(2u) - 1
        u = 0.7978845608028654 * (z + 0.044715 * z * z * z)
        z = 0.5 * z * (1.0 + (2.0 * _sigmoid(2.0 * u) - 1.0))
    elif ACT == 4:
        z = tl.maximum(z, 0.0)
    elif ACT == 5:
        z = tl.maximum(z, 0.0)
        z = z * z
    elif ACT == 6:
        z = _sigmoid(z)
    elif ACT == 7:
        z = z * _sigmoid(1.702 * z)
    elif ACT == 8:
        z = z * _sigmoid(ALPHA * z)
    elif ACT == 9:
        z = tl.where(z > 0.0, ALPHA * z * z + XB * z, XN * (tl.exp(tl.minimum(z, XE)) - 1.0 - z) + XB * z)
    return z


@triton.jit
def _dot(a, b, acc, IEEE: tl.constexpr):
    """acc + a @ b; fp32 operands in IEEE precision (not TF32) so that fp32 matches the reference."""
    if IEEE:
        acc = tl.dot(a, b, acc, input_precision="ieee")
    else:
        acc = tl.dot(a, b, acc)
    return acc


@triton.jit
def _gate_up_loop(a_ptrs, u_ptrs, g_ptrs, row_ok, col_ok, KLEN, GATED: tl.constexpr, IEEE: tl.constexpr,
                  BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr):
    """(x Wu^T, x Wg^T) over k in [0, KLEN) by pointer loads: a_ptrs [BM, BK] rows of x, u_ptrs / g_ptrs [BK, BN]
    weight columns, all at k = 0. Full BK blocks unmasked along k (16-byte vectors, cp.async pipelining), then
    one masked tail. Returns two fp32 [BM, BN] accumulators (the second zeros unless GATED)."""
    acc_u = tl.zeros((BM, BN), dtype=tl.float32)
    acc_g = tl.zeros((BM, BN), dtype=tl.float32)
    kk = tl.arange(0, BK)
    k_full = KLEN // BK * BK
    for k0 in range(0, k_full, BK):
        a = tl.load(a_ptrs, mask=row_ok[:, None], other=0.0)
        acc_u = _dot(a, tl.load(u_ptrs, mask=col_ok[None, :], other=0.0), acc_u, IEEE)
        if GATED:
            acc_g = _dot(a, tl.load(g_ptrs, mask=col_ok[None, :], other=0.0), acc_g, IEEE)
            g_ptrs += BK
        a_ptrs += BK
        u_ptrs += BK
    if k_full < KLEN:
        k_ok = (k_full + kk) < KLEN
        a = tl.load(a_ptrs, mask=row_ok[:, None] & k_ok[None, :], other=0.0)
        acc_u = _dot(a, tl.load(u_ptrs, mask=col_ok[None, :] & k_ok[:, None], other=0.0), acc_u, IEEE)
        if GATED:
            acc_g = _dot(a, tl.load(g_ptrs, mask=col_ok[None, :] & k_ok[:, None], other=0.0), acc_g, IEEE)
    return acc_u, acc_g


@triton.jit
def _gate_side(z, ACT: tl.constexpr, CLAMPS: tl.constexpr, GMAX: tl.constexpr, AMAX: tl.constexpr,
               ALPHA: tl.constexpr, XN: tl.constexpr, XB: tl.constexpr, XE: tl.constexpr):
    """min(act(min(z, GMAX)), AMAX), each clamp where its CLAMPS bit is set."""
    if CLAMPS & 1:
        z = tl.minimum(z, GMAX)
    z = _act(z, ACT, ALPHA, XN, XB, XE)
    if CLAMPS & 2:
        z = tl.minimum(z, AMAX)
    return z


@triton.jit
def _gated_act(acc_u, acc_g, bu_ptr, bg_ptr, neuron, col_ok, GATED: tl.constexpr, HAS_BU: tl.constexpr,
               HAS_BG: tl.constexpr, ACT: tl.constexpr, CLAMPS: tl.constexpr = 0, GMAX: tl.constexpr = 0.0,
               AMAX: tl.constexpr = 0.0, ULIM: tl.constexpr = 0.0, UADD: tl.constexpr = 0.0,
               ALPHA: tl.constexpr = 1.0, XN: tl.constexpr = 0.0, XB: tl.constexpr = 0.0, XE: tl.constexpr = 0.0):
    """The up epilogue on fp32 tiles: glu(acc_g + bg, acc_u + bu) when GATED, else act(acc_u + bu); glu(g, u) =
    act(g) * u, or with CLAMPS (see `act_constants`) the clamped unit of `routefx.ir.activations`."""
    if HAS_BU:
        acc_u += tl.load(bu_ptr + neuron, mask=col_ok, other=0.0).to(tl.float32)[None, :]
    if GATED:
        if HAS_BG:
            acc_g += tl.load(bg_ptr + neuron, mask=col_ok, other=0.0).to(tl.float32)[None, :]
        if CLAMPS & 4:
            acc_u = tl.minimum(tl.maximum(acc_u, -ULIM), ULIM)
        if CLAMPS & 8:
            acc_u = acc_u + UADD
        return _gate_side(acc_g, ACT, CLAMPS, GMAX, AMAX, ALPHA, XN, XB, XE) * acc_u
    return _gate_side(acc_u, ACT, CLAMPS, GMAX, AMAX, ALPHA, XN, XB, XE)


@triton.jit
def _ptr_loop(a_ptrs, b_ptrs, row_ok, col_ok, k_begin, k_end, acc, IEEE: tl.constexpr, BK: tl.constexpr):
    """acc + A[:, k_begin:k_end] B[k_begin:k_end, :] by pointer loads (a_ptrs [BM, BK] and b_ptrs [BK, BN] at
    k_begin, a multiple of BK): full blocks unmasked along k, then one masked tail."""
    kk = tl.arange(0, BK)
    k_full = tl.maximum(k_begin, k_end // BK * BK)
    for k0 in range(k_begin, k_full, BK):
        a = tl.load(a_ptrs, mask=row_ok[:, None], other=0.0)
        acc = _dot(a, tl.load(b_ptrs, mask=col_ok[None, :], other=0.0), acc, IEEE)
        a_ptrs += BK
        b_ptrs += BK
    if k_full < k_end:
        k_ok = (k_full + kk) < k_end
        a = tl.load(a_ptrs, mask=row_ok[:, None] & k_ok[None, :], other=0.0)
        acc = _dot(a, tl.load(b_ptrs, mask=col_ok[None, :] & k_ok[:, None], other=0.0), acc, IEEE)
    return acc


@triton.jit
def _route_tiles(count_ptr, rwidth_ptr, NR, R_P2: tl.constexpr, BM: tl.constexpr, BN: tl.constexpr, N_COLS,
                 COLS_FROM_WIDTH: tl.constexpr):
    """Per route (a [R_P2] vector): row blocks, column blocks and tiles. Column blocks: cdiv(width, BN) when
    COLS_FROM_WIDTH (kernel 1: the route's neurons), else cdiv(N_COLS, BN) for non-empty routes (kernel 2: the
    model dimension). Skip routes (width 0) have no tile."""
    ridx = tl.arange(0, R_P2)
    rmask = ridx < NR
    cnt = tl.load(count_ptr + ridx, mask=rmask, other=0)
    wid = tl.load(rwidth_ptr + ridx, mask=rmask, other=0)
    mblocks = (cnt + BM - 1) // BM
    if COLS_FROM_WIDTH:
        nblocks = (wid + BN - 1) // BN
    else:
        nblocks = tl.where(wid > 0, (N_COLS + BN - 1) // BN, 0)
    return mblocks, nblocks, mblocks * nblocks


@triton.jit
def _find_tile(tile, mblocks, nblocks, tiles, R_P2: tl.constexpr, GROUP_M: tl.constexpr):
    """Map a tile index in [0, sum(tiles)) to (route, row block, column block); row blocks within a route are
    visited GROUP_M at a time (L2 reuse of the weight columns)."""
    ridx = tl.arange(0, R_P2)
    incl = tl.cumsum(tiles, 0)
    r = tl.sum((incl <= tile).to(tl.int32), 0)
    sel = ridx == r
    base = tl.sum(tl.where(sel, incl - tiles, 0), 0)
    mb = tl.sum(tl.where(sel, mblocks, 0), 0)
    nb = tl.sum(tl.where(sel, nblocks, 0), 0)
    local = tile - base
    in_group = GROUP_M * nb
    first_m = (local // in_group) * GROUP_M
    size_m = tl.minimum(mb - first_m, GROUP_M)
    pid_m = first_m + (local % in_group) % size_m
    pid_n = (local % in_group) // size_m
    return r, pid_m, pid_n


@triton.jit
def _tile_rows(tile, mblocks, nblocks, tiles, count_ptr, off_ptr, rstart_ptr, rwidth_ptr, order_ptr,
               R_P2: tl.constexpr, GROUP_M: tl.constexpr, BM: tl.constexpr, ALIGNED: tl.constexpr):
    """Tile -> (column block, route's first sorted row `off`, range start, width, [BM] positions within the route,
    their mask, their assignment ids): what both kernels read about a tile's route and rows."""
    r, pid_m, pid_n = _find_tile(tile, mblocks, nblocks, tiles, R_P2, GROUP_M)
    cnt = tl.load(count_ptr + r)
    off = tl.load(off_ptr + r)
    start = tl.load(rstart_ptr + r)
    width = tl.load(rwidth_ptr + r)
    if ALIGNED:
        start = tl.multiple_of(start, 16)
    rank = pid_m * BM + tl.arange(0, BM)  # [BM] position within the route
    row_ok = rank < cnt
    aid = tl.load(order_ptr + off + rank, mask=row_ok, other=0)  # [BM] assignment ids
    return pid_m, pid_n, off, start, width, rank, row_ok, aid


@triton.jit
def _split_gate_up(acc, BM: tl.constexpr, BN: tl.constexpr):
    """acc [BM, 2·BN] of interleaved gate/up columns -> (up, gate), each [BM, BN]."""
    acc_g, acc_u = tl.split(tl.reshape(acc, (BM, BN, 2)))
    return acc_u, acc_g


@triton.jit
def _paired_loop_desc(xs_desc, wgu_desc, m0, n0, D, IEEE: tl.constexpr, BM: tl.constexpr, BN: tl.constexpr,
                      BK: tl.constexpr):
    """Kernel 1's k loop over gate/up rows interleaved in one matrix (up_kernel's PAIRED), row tiles through
    descriptors (TMA == 2): one [BM, BK] row tile, one [2·BN, BK] weight tile and one product per k step into
    acc [BM, 2·BN] (zero-filled past D: no k tail). Returns (up, gate)."""
    acc = tl.zeros((BM, 2 * BN), dtype=tl.float32)
    for k0 in range(0, D, BK):
        acc = _dot(xs_desc.load([m0, k0]), wgu_desc.load([2 * n0, k0]).T, acc, IEEE)
    return _split_gate_up(acc, BM, BN)


@triton.jit
def _paired_loop_ptr(a_ptrs, wgu_desc, u_ptrs, g_ptrs, row_ok, col_ok, n0, D, IEEE: tl.constexpr,
                     BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr):
    """The same with gathered rows by pointers (TMA == 1): full BK blocks with the weights through the
    descriptor, then the masked k tail by pointers (u_ptrs / g_ptrs at k = 0). Returns (up, gate)."""
    acc = tl.zeros((BM, 2 * BN), dtype=tl.float32)
    k_full = D // BK * BK
    for k0 in range(0, k_full, BK):
        a = tl.load(a_ptrs, mask=row_ok[:, None], other=0.0)
        acc = _dot(a, wgu_desc.load([2 * n0, k0]).T, acc, IEEE)
        a_ptrs += BK
    acc_u, acc_g = _split_gate_up(acc, BM, BN)
    if k_full < D:
        tail_u, tail_g = _gate_up_loop(a_ptrs, u_ptrs + k_full, g_ptrs + k_full, row_ok, col_ok, D - k_full, True,
                                       IEEE, BM, BN, BK)
        acc_u += tail_u
        acc_g += tail_g
    return acc_u, acc_g


@triton.jit
def up_kernel(
    x_ptr, xs_ptr, wu_ptr, wg_ptr, wgu_ptr, bu_ptr, bg_ptr, h_ptr,
    order_ptr, count_ptr, off_ptr, rstart_ptr, rwidth_ptr,
    NR, D, K, NA, NF, WMAX, N_BUCKET,
    stride_x, stride_wu, stride_wg, stride_wgu, stride_h,
    R_P2: tl.constexpr, GATED: tl.constexpr, HAS_BU: tl.constexpr, HAS_BG: tl.constexpr, ACT: tl.constexpr,
    IEEE: tl.constexpr, ALIGNED: tl.constexpr, TMA: tl.constexpr,
    BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr, GROUP_M: tl.constexpr, PERSIST: tl.constexpr,
    FLATTEN: tl.constexpr, PAIRED: tl.constexpr = 0, CLAMPS: tl.constexpr = 0, GMAX: tl.constexpr = 0.0,
    AMAX: tl.constexpr = 0.0, ULIM: tl.constexpr = 0.0, UADD: tl.constexpr = 0.0, ALPHA: tl.constexpr = 1.0,
    XN: tl.constexpr = 0.0, XB: tl.constexpr = 0.0, XE: tl.constexpr = 0.0,
):
    """Kernel 1: h[rows, cols] = act(x[tok] Wg^T + bg) * (x[tok] Wu^T + bu)   (plain: act(x[tok] Wu^T + bu)),
    per (BM rows of route r) x (BN neurons of route r) tile; x rows gathered by token (pointer loads).
    TMA >= 1: the weight tiles [BN, BK] come through tensor descriptors (Hopper's bulk copy engine; zero-filled
    past NF rows and D columns, so they need no masks: neurons past the route's width are computed, not stored).
    TMA == 2: the x tiles too, from xs [NA, D], x's rows already gathered into sorted order by the host (rows
    past the route's count belong to the next route or are zeros past NA: computed, not stored).
    NF: rows of the weights; WMAX and N_BUCKET are autotune keys only; PERSIST only changes the host's grid.
    FLATTEN (persistent grids): the tile loop and the k loop are fused into one software-pipelined loop, so the
    next tile's first operand loads are in flight during this tile's epilogue (Triton's fuse-nested-loops).
    PAIRED (GATED, TMA >= 1): wgu_ptr [2·NF, D] (row stride stride_wgu) holds the gate and up rows interleaved
    (row 2n = gate neuron n, row 2n + 1 = up neuron n), so a tile's weights are one [2·BN, BK] descriptor load
    and one product into a [BM, 2·BN] accumulator (one wgmma chain of N = 2·BN instead of two of BN), split into
    gate and up columns after the loop; wu_ptr / wg_ptr (any row strides) serve the masked k tail."""
    # Tiles (route, row block, column block) are numbered route by route; program p runs tiles p, p + P, ...
    # (P = programs launched: the host's upper bound on the tile count, or fewer for a persistent grid).
    mblocks, nblocks, tiles = _route_tiles(count_ptr, rwidth_ptr, NR, R_P2, BM, BN, 0, True)
    total = tl.sum(tiles, 0)
    if TMA and not PAIRED:
        wu_desc = tl.make_tensor_descriptor(wu_ptr, shape=[NF, D], strides=[stride_wu, 1], block_shape=[BN, BK])
        wg_desc = tl.make_tensor_descriptor(wg_ptr, shape=[NF, D], strides=[stride_wg, 1], block_shape=[BN, BK])
    if PAIRED:
        wgu_desc = tl.make_tensor_descriptor(wgu_ptr, shape=[2 * NF, D], strides=[stride_wgu, 1],
                                             block_shape=[2 * BN, BK])
    if TMA == 2:
        xs_desc = tl.make_tensor_descriptor(xs_ptr, shape=[NA, D], strides=[stride_x, 1], block_shape=[BM, BK])
    for tile in tl.range(tl.program_id(0), total, tl.num_programs(0), flatten=FLATTEN):
        pid_m, pid_n, off, start, width, rank, row_ok, aid = _tile_rows(
            tile, mblocks, nblocks, tiles, count_ptr, off_ptr, rstart_ptr, rwidth_ptr, order_ptr, R_P2, GROUP_M,
            BM, ALIGNED)
        tok = (aid // K).to(tl.int64)
        col = pid_n * BN + tl.arange(0, BN)  # [BN] neuron index within the route
        col_ok = col < width
        neuron = (start + col).to(tl.int64)
        kk = tl.arange(0, BK)
        n0 = start + pid_n * BN  # first neuron of the tile (TMA row coordinate)

        a_ptrs = x_ptr + tok[:, None] * stride_x + kk[None, :]  # [BM, BK]
        u_ptrs = wu_ptr + neuron[None, :] * stride_wu + kk[:, None]  # [BK, BN]
        g_ptrs = wg_ptr + neuron[None, :] * stride_wg + kk[:, None]
        if TMA == 0:
            acc_u, acc_g = _gate_up_loop(a_ptrs, u_ptrs, g_ptrs, row_ok, col_ok, D, GATED, IEEE, BM, BN, BK)
        elif PAIRED:
            if TMA == 2:
                acc_u, acc_g = _paired_loop_desc(xs_desc, wgu_desc, off + pid_m * BM, n0, D, IEEE, BM, BN, BK)
            else:
                acc_u, acc_g = _paired_loop_ptr(a_ptrs, wgu_desc, u_ptrs, g_ptrs, row_ok, col_ok, n0, D, IEEE, BM,
                                                BN, BK)
        else:
            acc_u = tl.zeros((BM, BN), dtype=tl.float32)
            acc_g = tl.zeros((BM, BN), dtype=tl.float32)
            if TMA == 2:  # every operand through descriptors, zero-filled past D: no k tail
                m0 = off + pid_m * BM
                for k0 in range(0, D, BK):
                    a = xs_desc.load([m0, k0])
                    acc_u = _dot(a, wu_desc.load([n0, k0]).T, acc_u, IEEE)
                    if GATED:
                        acc_g = _dot(a, wg_desc.load([n0, k0]).T, acc_g, IEEE)
            else:  # gathered x rows by pointers, weights through descriptors; the k tail by pointers
                k_full = D // BK * BK
                for k0 in range(0, k_full, BK):
                    a = tl.load(a_ptrs, mask=row_ok[:, None], other=0.0)
                    acc_u = _dot(a, wu_desc.load([n0, k0]).T, acc_u, IEEE)
                    if GATED:
                        acc_g = _dot(a, wg_desc.load([n0, k0]).T, acc_g, IEEE)
                    a_ptrs += BK
                if k_full < D:
                    tail_u, tail_g = _gate_up_loop(a_ptrs, u_ptrs + k_full, g_ptrs + k_full, row_ok, col_ok,
                                                   D - k_full, GATED, IEEE, BM, BN, BK)
                    acc_u += tail_u
                    acc_g += tail_g
        hval = _gated_act(acc_u, acc_g, bu_ptr, bg_ptr, neuron, col_ok, GATED, HAS_BU, HAS_BG, ACT, CLAMPS, GMAX,
                          AMAX, ULIM, UADD, ALPHA, XN, XB, XE)
        h_rows = (off + rank).to(tl.int64)
        h_ptrs = h_ptr + h_rows[:, None] * stride_h + col[None, :]
        tl.store(h_ptrs, hval.to(h_ptr.dtype.element_ty), mask=row_ok[:, None] & col_ok[None, :])


@triton.jit
def down_kernel(
    h_ptr, wd_ptr, bd_ptr, gates_ptr, y_ptr,
    order_ptr, count_ptr, off_ptr, rstart_ptr, rwidth_ptr,
    NR, D, NA, NF, WMAX, N_BUCKET,
    stride_h, stride_wd, stride_y,
    R_P2: tl.constexpr, HAS_BD: tl.constexpr, HAS_GATES: tl.constexpr, IEEE: tl.constexpr,
    ALIGNED: tl.constexpr, TMA: tl.constexpr,
    BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr, GROUP_M: tl.constexpr, PERSIST: tl.constexpr,
    FLATTEN: tl.constexpr,
):
    """Kernel 2: y[aid, cols] = gate[aid] * (h[rows, :width_r] Wd[cols, start_r : start_r + width_r]^T + bd[cols]),
    per (BM rows of route r) x (BN model columns) tile; the reduction runs over the route's own
    width (a runtime loop bound). Rows of y are assignment ids (token * K + slot): with K = 1 that is the token,
    so y is the output itself; with K > 1 the caller sums the K slots. Skip routes launch no tile.
    TMA >= 1 (used only when ALIGNED: a descriptor's innermost coordinate, start + k, must be 16-byte aligned):
    the weight tiles [BN, BK] of Wd [D, NF] come through a tensor descriptor; TMA == 2: the h tiles too (h is
    [NA, stride_h]), the masked k tail by pointers either way."""
    # Tiles (route, row block, column block) are numbered route by route; program p runs tiles p, p + P, ...
    # (P = programs launched: the host's upper bound on the tile count, or fewer for a persistent grid).
    mblocks, nblocks, tiles = _route_tiles(count_ptr, rwidth_ptr, NR, R_P2, BM, BN, D, False)
    total = tl.sum(tiles, 0)
    USE_TMA: tl.constexpr = TMA and ALIGNED
    if USE_TMA:
        wd_desc = tl.make_tensor_descriptor(wd_ptr, shape=[D, NF], strides=[stride_wd, 1], block_shape=[BN, BK])
    if TMA == 2:
        h_desc = tl.make_tensor_descriptor(h_ptr, shape=[NA, stride_h], strides=[stride_h, 1], block_shape=[BM, BK])
    for tile in tl.range(tl.program_id(0), total, tl.num_programs(0), flatten=FLATTEN):
        pid_m, pid_n, off, start, width, rank, row_ok, aid = _tile_rows(
            tile, mblocks, nblocks, tiles, count_ptr, off_ptr, rstart_ptr, rwidth_ptr, order_ptr, R_P2, GROUP_M,
            BM, ALIGNED)
        col = pid_n * BN + tl.arange(0, BN)  # [BN] model columns
        col_ok = col < D
        kk = tl.arange(0, BK)
        h_rows = (off + rank).to(tl.int64)
        a_ptrs = h_ptr + h_rows[:, None] * stride_h + kk[None, :]  # [BM, BK]
        b_ptrs = wd_ptr + col.to(tl.int64)[None, :] * stride_wd + (start + kk)[:, None]  # [BK, BN]
        acc = tl.zeros((BM, BN), dtype=tl.float32)
        if (TMA == 2) | USE_TMA:
            k_full = width // BK * BK  # full blocks through descriptors, then the masked tail by pointers
            for k0 in range(0, k_full, BK):
                if TMA == 2:
                    a = h_desc.load([off + pid_m * BM, k0])
                else:
                    a = tl.load(a_ptrs + k0, mask=row_ok[:, None], other=0.0)
                if USE_TMA:
                    b = wd_desc.load([pid_n * BN, start + k0]).T
                else:
                    b = tl.load(b_ptrs + k0, mask=col_ok[None, :], other=0.0)
                acc = _dot(a, b, acc, IEEE)
            acc = _ptr_loop(a_ptrs + k_full, b_ptrs + k_full, row_ok, col_ok, k_full, width, acc, IEEE, BK)
        else:
            acc = _ptr_loop(a_ptrs, b_ptrs, row_ok, col_ok, 0, width, acc, IEEE, BK)

        if HAS_BD:
            acc += tl.load(bd_ptr + col, mask=col_ok, other=0.0).to(tl.float32)[None, :]
        if HAS_GATES:
            acc = acc * tl.load(gates_ptr + aid, mask=row_ok, other=0.0).to(tl.float32)[:, None]
        y_ptrs = y_ptr + aid.to(tl.int64)[:, None] * stride_y + col[None, :]
        tl.store(y_ptrs, acc.to(y_ptr.dtype.element_ty), mask=row_ok[:, None] & col_ok[None, :])


@triton.jit
def route_sort_kernel(routes_ptr, order_ptr, count_ptr, off_ptr, N, NR, BLOCK_N: tl.constexpr):
    """Routing metadata in one program (small N, e.g. a decode step): the counting sort of
    `routing.route_metadata` with buckets visited in a loop. Ids outside [0, NR - 1) go to the drop bucket NR - 1.
    BLOCK_N >= N (a power of two)."""
    ids = tl.arange(0, BLOCK_N)
    live = ids < N
    r = tl.load(routes_ptr + ids, mask=live, other=0)
    bucket = tl.where((r >= 0) & (r < NR - 1), r, NR - 1).to(tl.int32)
    off = 0
    for b in range(0, NR):
        sel = live & (bucket == b)
        sel_i = sel.to(tl.int32)
        rank = tl.cumsum(sel_i, 0) - 1
        cnt = tl.sum(sel_i, 0)
        tl.store(order_ptr + off + rank, ids, mask=sel)
        tl.store(count_ptr + b, cnt)
        tl.store(off_ptr + b, off)
        off += cnt
