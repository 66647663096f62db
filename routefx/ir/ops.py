"""The `routefx::routed_ffn` custom op: an FFN whose neurons are split into ranges, evaluated per token on the
ranges its routes pick.

The function registered here is the eager implementation for every device: the plain FFN for one full range, and
otherwise the grouped dispatch of `routefx.ir.dispatch` (one sort, per-route GEMMs on contiguous slices, one
scatter back). `routed_ffn_reference` states the same semantics plainly (per route: gather, FFN, gate, add); the
tests hold both against a float64 per-token loop, and every backend is tested against the op. The fake kernel
makes the op traceable by fx and `torch.export` (the output has `x`'s shape and dtype, contiguous). The op is
inference-only: it has no autograd formula.

Importing this module registers the op once (module imports are cached).
"""

from __future__ import annotations

from typing import List, Optional

import torch
import torch.nn.functional as F
from torch import Tensor

from routefx.errors import RoutedFFNError
from routefx.ir.activations import get_activation
from routefx.ir.dispatch import ACC_DTYPE as _ACC_DTYPE, ffn_hidden, grouped_routed_ffn

__all__ = ["routed_ffn", "routed_ffn_reference"]


def _check_static(
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
    activation: str,
) -> None:
    """Checks that depend only on shapes, dtypes and the static arguments (shared by the reference and the
    fake kernel). Raises `RoutedFFNError`, or `UnsupportedActivationError` for an unknown activation."""
    if w_gate is None and not get_activation(activation).spec.gate_only:
        raise RoutedFFNError(f"activation {activation!r} has parameters on the up side of a gated unit, but w_gate "
                             "is None (a plain FFN has no up side to clamp or shift)")
    if x.dim() < 1:
        raise RoutedFFNError(f"x must have at least 1 dim [..., d], found shape {tuple(x.shape)}")
    if not x.is_floating_point():
        raise RoutedFFNError(f"x must be a floating tensor, found dtype {x.dtype}")
    d = x.shape[-1]
    if w_up.dim() != 2 or w_up.shape[1] != d:
        raise RoutedFFNError(f"w_up must have shape [F, d={d}], found {list(w_up.shape)}")
    n = w_up.shape[0]
    expected = {"w_up": (n, d), "w_gate": (n, d), "w_down": (d, n), "b_up": (n,), "b_gate": (n,), "b_down": (d,)}
    given = {"w_up": w_up, "w_gate": w_gate, "w_down": w_down, "b_up": b_up, "b_gate": b_gate, "b_down": b_down}
    for name, t in given.items():
        if t is None:
            continue
        if tuple(t.shape) != expected[name]:
            raise RoutedFFNError(
                f"{name} must have shape {list(expected[name])} (F={n}, d={d}), found {list(t.shape)}"
            )
        if t.dtype != x.dtype or t.device != x.device:
            raise RoutedFFNError(
                f"{name} must match x's dtype and device ({x.dtype}, {x.device}), found ({t.dtype}, {t.device})"
            )
    if w_gate is None and b_gate is not None:
        raise RoutedFFNError("b_gate was given without w_gate; a plain (non-gated) FFN has no gate bias")

    if routes.dtype != torch.int64:
        raise RoutedFFNError(f"routes must be int64, found {routes.dtype}")
    if routes.dim() != x.dim() or routes.shape[:-1] != x.shape[:-1]:
        raise RoutedFFNError(
            f"routes must have shape [*x.shape[:-1], K] = [{', '.join(map(str, x.shape[:-1]))}, K], "
            f"found {list(routes.shape)}"
        )
    if gates is not None:
        if gates.shape != routes.shape:
            raise RoutedFFNError(
                f"gates must have the shape of routes {list(routes.shape)}, found {list(gates.shape)}"
            )
        if not gates.is_floating_point():
            raise RoutedFFNError(f"gates must be a floating tensor, found dtype {gates.dtype}")

    if len(ranges) % 2 != 0:
        raise RoutedFFNError(
            f"ranges must be a flat list (start0, end0, start1, end1, ...) of even length, found length {len(ranges)}"
        )
    for r in range(len(ranges) // 2):
        start, end = ranges[2 * r], ranges[2 * r + 1]
        if not 0 <= start <= end <= n:
            raise RoutedFFNError(f"range {r} = [{start}, {end}) must satisfy 0 <= start <= end <= F={n}")


def _ffn_slice(
    x: Tensor,
    w_up: Tensor,
    w_gate: Optional[Tensor],
    w_down: Tensor,
    b_up: Optional[Tensor],
    b_gate: Optional[Tensor],
    b_down: Optional[Tensor],
    act,
    start: int,
    end: int,
) -> Tensor:
    """FFN on neurons [start, end): x [n, d] -> [n, d]. Weight slices are views; nothing is copied."""
    h = ffn_hidden(x, w_up, w_gate, b_up, b_gate, act, start, end)  # [n, F_r]
    return F.linear(h, w_down[:, start:end], b_down)  # [n, d]


@torch.library.custom_op("routefx::routed_ffn", mutates_args=())
def routed_ffn(
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
    activation: str,
) -> Tensor:
    """Routed FFN: each token runs the FFN restricted to the neuron ranges its routes pick.

    Shapes (T = tokens = prod(x.shape[:-1]), d = hidden, F = neurons, K = routes per token,
    R = len(ranges) // 2 = number of ranges):
        x       [..., d]   floating
        routes  [..., K]   int64, same leading dims as x, values in [0, R)
        gates   [..., K]   floating, or None (every gate is 1)
        w_up    [F, d];  w_gate [F, d] or None (None = plain, non-gated MLP);  w_down [d, F]
        b_up [F], b_gate [F] (only with w_gate), b_down [d]: each optional
        ranges  flat [start_0, end_0, ..., start_{R-1}, end_{R-1}], 0 <= start_r <= end_r <= F
        activation  a name in `routefx.ir.activations.ACTIVATIONS`, optionally with parameters (ActivationSpec)
        returns [..., d]  with x's shape and dtype

    Semantics, per token t:
        y[t] = sum_k g[t, k] * FFN_{routes[t, k]}(x[t])          (g = 1 when gates is None)
        gated: FFN_r(x) = glu(x Wg_r^T + bg_r, x Wu_r^T + bu_r) Wd_r^T + b_down,  glu(g, u) = act(g) * u
               (or the clamped unit a parametrised activation name gives: `routefx.ir.activations`)
        plain: FFN_r(x) = act(x Wu_r^T + bu_r) Wd_r^T + b_down
    with Wg_r = w_gate[s_r:e_r], Wu_r = w_up[s_r:e_r], Wd_r = w_down[:, s_r:e_r] and the biases sliced alike.
    A route to an empty range (s_r == e_r) contributes exactly 0: b_down is not added for it. Ranges may
    overlap; a token may pick the same route more than once (its contributions add).

    Matmuls run in x's dtype; contributions accumulate in fp32 for fp16/bf16 inputs (x's dtype otherwise).
    Raises `RoutedFFNError` for broken shapes, dtypes, ranges or route ids, `UnsupportedActivationError` for
    an unknown activation. Inference-only: there is no autograd formula.
    """
    _check_static(x, routes, gates, w_up, w_gate, w_down, b_up, b_gate, b_down, ranges, activation)
    act = get_activation(activation)
    if x.numel() == 0 or routes.numel() == 0:
        return x.new_zeros(x.shape)
    return grouped_routed_ffn(x, routes, gates, w_up, w_gate, w_down, b_up, b_gate, b_down, ranges, act)


def routed_ffn_reference(
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
    activation: str,
) -> Tensor:
    """The op's semantics written plainly (not registered): per route, gather its tokens, run the FFN on its
    range, gate and add back. The op computes the same with one sort and one gather and scatter for all routes
    (`routefx.ir.dispatch`); tests hold the two together and both against a float64 per-token loop."""
    _check_static(x, routes, gates, w_up, w_gate, w_down, b_up, b_gate, b_down, ranges, activation)
    act = get_activation(activation)
    num_ranges = len(ranges) // 2
    k_routes = routes.shape[-1]
    if x.numel() == 0 or routes.numel() == 0:
        return x.new_zeros(x.shape)
    lo, hi = (int(v) for v in torch.aminmax(routes))  # data-dependent check (syncs on accelerators)
    if lo < 0 or hi >= num_ranges:
        bad = lo if lo < 0 else hi
        raise RoutedFFNError(f"route id {bad} is outside [0, R={num_ranges}) for ranges {list(ranges)}")

    d = x.shape[-1]
    x2 = x.reshape(-1, d)  # [T, d]
    n_tokens = x2.shape[0]
    acc_dtype = _ACC_DTYPE.get(x.dtype, x.dtype)
    out = torch.zeros(n_tokens, d, dtype=acc_dtype, device=x.device)  # [T, d]

    # Group the T*K (token, route) assignments by route with one stable sort and one host sync.
    flat_routes = routes.reshape(-1)  # [T*K]
    order = torch.argsort(flat_routes, stable=True)  # [T*K], positions grouped by route id
    counts = torch.bincount(flat_routes, minlength=num_ranges).tolist()  # [R]
    token_of = torch.div(order, k_routes, rounding_mode="floor")  # [T*K] token index of each sorted position
    flat_gates = None if gates is None else gates.reshape(-1).index_select(0, order)  # [T*K], sorted

    offset = 0
    for r, count in enumerate(counts):
        begin, offset = offset, offset + count
        start, end = ranges[2 * r], ranges[2 * r + 1]
        if count == 0 or start == end:
            continue  # no token, or an empty range: contributes exactly 0
        idx = token_of[begin:offset]  # [n] tokens routed to r (repeats allowed)
        y = _ffn_slice(x2.index_select(0, idx), w_up, w_gate, w_down, b_up, b_gate, b_down, act, start, end)
        y = y.to(acc_dtype)  # [n, d]
        if flat_gates is not None:
            y = y * flat_gates[begin:offset].to(acc_dtype).unsqueeze(1)
        out.index_add_(0, idx, y)
    return out.to(x.dtype).reshape(x.shape)


@routed_ffn.register_fake
def _routed_ffn_fake(
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
    activation: str,
) -> Tensor:
    """Meta kernel: static checks only (no route-id check, it needs data); output like x, contiguous."""
    _check_static(x, routes, gates, w_up, w_gate, w_down, b_up, b_gate, b_down, ranges, activation)
    return x.new_empty(x.shape)
