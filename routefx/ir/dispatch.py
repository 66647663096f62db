"""Grouped dispatch: the implementation `routefx::routed_ffn` runs for K routes per token and/or gates (MoE top-k,
Duo routing), on any device; `routefx.ir.ops.routed_ffn_reference` defines the same function plainly.

With T = tokens, K = routes per token, N = T*K (token, slot) assignments, R = routes, n_r = assignments to r:

    order   = argsort(routes.flat, stable)        # [N] positions grouped by route id, ties in position order
    counts  = bincount(routes.flat).tolist()       # [R] the one host read (it also checks the route ids)
    xs      = x[order // K]                         # [N, d] one gather: route r's rows are xs[b_r:b_r + n_r]
    per route r with n_r > 0 and a non-empty range [s_r, e_r):
        ys[b_r:b_r + n_r] = FFN_r(xs[b_r:b_r + n_r])   # [n_r, d] torch GEMMs on exactly r's rows, written in place
    ys     *= gates.flat[order]                     # [N, d] one gate multiply over every assignment
    out     = index_add(zeros[T, d], order // K, ys)   # one scatter back; a token's K contributions add
                                                    # (K = 1: index_copy, every token once)

One range, K = 1 and no gates (the dense FFN, a static route) is the FFN on all rows, with no sort or gather.
Skip routes (empty ranges) and routes no token takes run nothing: their rows of `ys` stay 0 (only the rows of
live routes are computed, the others are zero-filled once). Contributions are added in route order per token, as
in the reference, so for K <= 2 the result is bit-identical to it.

`torch._grouped_mm` (the CPU kernel Hugging Face's experts call) was measured on the Mixtral layer of issue 15
(d=1024, 8 experts x 1408, top-2, 512 tokens, 1 thread, interleaved, on a shared machine): 0.82-0.87 of the
dense-equivalent FFN's speed against 0.77-0.89 for these per-route GEMMs in two runs, no consistent gain, so it
is not used; it would also need one stacked [E, d, F] weight of equal widths, which Duo's ranges are not.
"""
from __future__ import annotations

from typing import Callable, List, Optional

import torch
from torch import Tensor

from routefx.errors import RoutedFFNError

__all__ = ["ffn_hidden", "route_counts", "grouped_routed_ffn", "dispatch"]

# Accumulate low-precision outputs in fp32; fp32 / fp64 accumulate in their own dtype.
ACC_DTYPE = {torch.float16: torch.float32, torch.bfloat16: torch.float32}


def ffn_hidden(x: Tensor, w_up: Tensor, w_gate: Optional[Tensor], b_up: Optional[Tensor], b_gate: Optional[Tensor],
               act, start: int, end: int) -> Tensor:
    """The FFN's hidden activations on neurons [start, end): x [n, d] -> [n, end - start] (weight views, no copy)."""
    up = torch.nn.functional.linear(x, w_up[start:end], None if b_up is None else b_up[start:end])
    if w_gate is None:
        return act(up)
    return act.glu(torch.nn.functional.linear(x, w_gate[start:end], None if b_gate is None else b_gate[start:end]), up)


def route_counts(flat_routes: Tensor, num_ranges: int, ranges: List[int]) -> List[int]:
    """Assignments per route ([R] ints) with one host read, which also checks that every route id is in [0, R)
    (`RoutedFFNError` otherwise): a negative id makes `bincount` refuse, an id >= R makes its result longer."""
    try:
        counts = torch.bincount(flat_routes, minlength=num_ranges).tolist()  # [R], or longer
    except RuntimeError:  # negative ids
        counts = None
    if counts is None or len(counts) > num_ranges:
        lo, hi = (int(v) for v in torch.aminmax(flat_routes))
        raise RoutedFFNError(f"route id {lo if lo < 0 else hi} is outside [0, R={num_ranges}) for ranges "
                             f"{list(ranges)}")
    return counts


def grouped_routed_ffn(
    x: Tensor,
    routes: Tensor,
    gates: Optional[Tensor],
    w_up: Tensor,
    w_gate: Optional[Tensor],
    w_down: Tensor,
    b_up: Optional[Tensor],
    b_gate: Optional[Tensor],
    b_down: Optional[Tensor],
    ranges: List[int],
    act,
) -> Tensor:
    """`routed_ffn`'s semantics (see `routefx.ir.ops.routed_ffn`) by one sort and per-route GEMMs on contiguous
    slices (module docstring). Inputs are already checked statically; route ids are checked here."""

    def run_route(r: int, rows: Tensor, out: Tensor) -> None:
        s, f = ranges[2 * r], ranges[2 * r + 1]
        h = ffn_hidden(rows, w_up, w_gate, b_up, b_gate, act, s, f)  # [n_r, F_r]
        if b_down is None:
            torch.mm(h, w_down[:, s:f].t(), out=out)  # [n_r, d] written in place
        else:
            torch.addmm(b_down, h, w_down[:, s:f].t(), out=out)

    return dispatch(x, routes, gates, ranges, run_route)


def dispatch(x: Tensor, routes: Tensor, gates: Optional[Tensor], ranges: List[int],
             run_route: Callable[[int, Tensor, Tensor], None]) -> Tensor:
    """The grouped dispatch around per-route FFNs: `run_route(r, rows, out)` writes route r's FFN (b_down
    included) of `rows` [n_r, d] (contiguous, x's dtype) into `out` [n_r, d]; it is called once per route with a
    non-empty range that some assignment takes. Returns [..., d] like x."""
    num_ranges = len(ranges) // 2
    k_routes = routes.shape[-1]
    d = x.shape[-1]
    x2 = x.reshape(-1, d)  # [T, d]
    n_tokens = x2.shape[0]
    acc_dtype = ACC_DTYPE.get(x.dtype, x.dtype)
    flat_routes = routes.reshape(-1)  # [N]
    counts = route_counts(flat_routes, num_ranges, ranges)
    live = [(r, c) for r, c in enumerate(counts) if c > 0 and ranges[2 * r] < ranges[2 * r + 1]]
    if not live:
        return torch.zeros(x.shape, dtype=x.dtype, device=x.device)  # every assignment is a skip: exactly 0
    if num_ranges == 1 and k_routes == 1 and gates is None:  # every token takes the one range: no sort, no gather
        out = torch.empty(n_tokens, d, dtype=x.dtype, device=x.device)
        run_route(0, x2.contiguous(), out)
        return out.reshape(x.shape)

    order = torch.argsort(flat_routes, stable=True)  # [N] positions grouped by route id
    token_of = order if k_routes == 1 else torch.div(order, k_routes, rounding_mode="floor")  # [N]
    xs = x2.index_select(0, token_of)  # [N, d] rows in sorted order
    skipped = sum(counts) - sum(c for _, c in live)
    ys = (torch.zeros if skipped else torch.empty)(xs.shape, dtype=x.dtype, device=x.device)  # [N, d]
    begins = [0]
    for c in counts:
        begins.append(begins[-1] + c)
    for r, _ in live:
        b, e = begins[r], begins[r + 1]
        run_route(r, xs[b:e], ys[b:e])  # [n_r, d] rows contiguous, written in place
    ys = ys.to(acc_dtype)
    if gates is not None:
        ys.mul_(gates.reshape(-1).index_select(0, order).to(acc_dtype).unsqueeze(1))  # [N, d] * [N, 1]
    if k_routes == 1:  # every token once: un-permute by a copy (no zero fill, no add)
        out = torch.empty(n_tokens, d, dtype=acc_dtype, device=x.device).index_copy_(0, token_of, ys)
    else:
        out = torch.zeros(n_tokens, d, dtype=acc_dtype, device=x.device).index_add_(0, token_of, ys)  # [T, d]
    return out.to(x.dtype).reshape(x.shape)
