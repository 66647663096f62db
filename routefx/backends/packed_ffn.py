"""Routed FFNs on pre-packed CPU weights, for the inductor backend.

Inductor's freezing pre-packs the weights of the products it compiles for oneDNN, but a `routefx::routed_ffn`
stays an opaque op (its routes have data-dependent sizes), and its per-route GEMMs on plain weight slices run
torch's default CPU GEMM. Measured on an AMD EPYC (2 threads, [n, 768] x [768, 2048]): 91-151 GFLOP/s unpacked
against 183-214 packed, at n = 256 / 170 / 86 / 40 rows. So a routed layer ran its FFN at up to half the rate of
the dense layer it replaces, and Duo on backend "inductor" was slower than dense (shape B of bench/cpu.py:
efficiency 0.70).

`pack_routed_ffns(gm)` replaces each such op in a copy of the graph by `routefx::routed_ffn_packed(x, routes,
gates, handle)`: `handle` names a `PackedFFN` holding every live range's weights packed once for oneDNN
(`torch.ops.mkldnn._reorder_linear_weight`) with their biases; the op runs the same grouped dispatch
(`routefx.ir.dispatch.dispatch`) with `torch.ops.mkldnn._linear_pointwise` per route. The packed weights are a
second copy of the routed FFNs' weights (overlapping ranges, such as nested small / big branches, each get
their own), held by the returned objects: the caller keeps them as long as the compiled graph runs. Only fp32
CPU graphs are packed, and only where oneDNN is available; anything else is left as it is.
"""
from __future__ import annotations

import itertools
import weakref
from typing import Optional

import torch
from torch import Tensor, fx

import routefx.ir.ops  # noqa: F401  (registers torch.ops.routefx.routed_ffn)
from routefx.errors import RoutedFFNError
from routefx.ir.activations import get_activation
from routefx.ir import graph_utils as gu
from routefx.ir.dispatch import dispatch

__all__ = ["PackedFFN", "pack_routed_ffns", "routed_ffn_packed"]

_ROUTED_FFN = torch.ops.routefx.routed_ffn.default
_handles = itertools.count()
_PACKED: "weakref.WeakValueDictionary[int, PackedFFN]" = weakref.WeakValueDictionary()


def _pack(w: Tensor) -> Tensor:
    return torch.ops.mkldnn._reorder_linear_weight(w.contiguous(), None)


def _linear(x: Tensor, packed: Tensor, bias: Optional[Tensor]) -> Tensor:
    return torch.ops.mkldnn._linear_pointwise(x, packed, bias, "none", [], "")


class PackedFFN:
    """One routed FFN's live ranges, packed: per range r with start < end, the packed up / gate / down weights
    ([F_r, d], [F_r, d], [d, F_r]) and their bias slices; `b_down` and the activation are shared."""

    def __init__(self, w_up, w_gate, w_down, b_up, b_gate, b_down, ranges, activation: str):
        self.ranges = [int(v) for v in ranges]
        self.act = get_activation(activation)
        self.b_down = None if b_down is None else b_down.detach().contiguous()
        self.routes: dict[int, tuple] = {}
        for r in range(len(self.ranges) // 2):
            s, f = self.ranges[2 * r], self.ranges[2 * r + 1]
            if s >= f:
                continue
            self.routes[r] = (
                _pack(w_up.detach()[s:f]), None if b_up is None else b_up.detach()[s:f].contiguous(),
                None if w_gate is None else _pack(w_gate.detach()[s:f]),
                None if b_gate is None else b_gate.detach()[s:f].contiguous(),
                _pack(w_down.detach()[:, s:f]))
        self.handle = next(_handles)
        _PACKED[self.handle] = self

    def run_route(self, r: int, rows: Tensor, out: Tensor) -> None:
        up, b_up, gate, b_gate, down = self.routes[r]
        u = _linear(rows, up, b_up)
        h = self.act(u) if gate is None else self.act.glu(_linear(rows, gate, b_gate), u)
        out.copy_(_linear(h, down, self.b_down))


@torch.library.custom_op("routefx::routed_ffn_packed", mutates_args=())
def routed_ffn_packed(x: Tensor, routes: Tensor, gates: Optional[Tensor], handle: int) -> Tensor:
    """`routefx::routed_ffn` of the `PackedFFN` registered as `handle` (its weights, ranges and activation) on
    x [..., d], routes [..., K], gates [..., K] or None; returns [..., d]."""
    packed = _PACKED.get(handle)
    if packed is None:
        raise RoutedFFNError(f"routed_ffn_packed: no packed FFN {handle} (its compiled model was released)")
    if x.numel() == 0 or routes.numel() == 0:
        return x.new_zeros(x.shape)
    return dispatch(x, routes, gates, packed.ranges, packed.run_route)


@routed_ffn_packed.register_fake
def _routed_ffn_packed_fake(x, routes, gates, handle):
    return torch.empty_like(x)


def _value(gm: fx.GraphModule, a):
    """The tensor a get_attr argument names (None for None); `LookupError` when `a` is computed in the graph."""
    if a is not None and not (isinstance(a, fx.Node) and a.op == "get_attr"):
        raise LookupError
    return None if a is None else gu.fetch_attr(gm, a.target)


def pack_routed_ffns(gm: fx.GraphModule) -> tuple[fx.GraphModule, list[PackedFFN]]:
    """`gm` with each fp32 CPU `routefx::routed_ffn` whose weights are module tensors calling
    `routefx::routed_ffn_packed` instead (in place; see the module docstring). Returns (gm, the packed FFNs):
    keep the list alive while the graph runs."""
    if not torch.backends.mkldnn.is_available():
        return gm, []
    packed = []
    for n in list(gm.graph.nodes):
        if n.op != "call_function" or n.target is not _ROUTED_FFN:
            continue
        x, routes, gates, w_up, w_gate, w_down, b_up, b_gate, b_down, ranges, activation = n.args
        try:
            ws = [_value(gm, a) for a in (w_up, w_gate, w_down, b_up, b_gate, b_down)]
        except (LookupError, AttributeError):
            continue  # weights computed in the graph: left to the plain op
        x_val = x.meta.get("val") if isinstance(x, fx.Node) else None
        if ws[0].device.type != "cpu" or getattr(x_val, "dtype", None) != torch.float32 \
                or any(w is not None and w.dtype != torch.float32 for w in ws):
            continue
        p = PackedFFN(*ws, ranges, activation)
        packed.append(p)
        with gm.graph.inserting_before(n):
            rep = gm.graph.call_function(torch.ops.routefx.routed_ffn_packed.default, (x, routes, gates, p.handle))
        rep.meta.update(n.meta)
        n.replace_all_uses_with(rep)
        gm.graph.erase_node(n)
    if packed:
        gm.graph.eliminate_dead_code()
        gm.recompile()
    return gm, packed
