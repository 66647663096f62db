"""Routed FFNs whose route ids are constants of the graph (Dense, a static router), lowered to a plain FFN on
their one neuron range: the recognition (`constant_route`), the replacement op (`static_ffn`) and the graph
rewrite (`lower_routed`), shared by the inductor and triton backends."""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor, fx

import routefx.ir.ops  # noqa: F401  (registers torch.ops.routefx.routed_ffn)
from routefx.errors import BackendError
from routefx.ir.activations import get_activation
from routefx.ir.graph_utils import constant_route

__all__ = ["constant_route", "static_ffn", "copy_graph", "lower_routed", "with_route_outputs"]

_ROUTED_FFN = torch.ops.routefx.routed_ffn.default
_LOW_PRECISION = (torch.float16, torch.bfloat16)

def static_ffn(x: Tensor, gates: Optional[Tensor], w_up: Tensor, w_gate: Optional[Tensor], w_down: Tensor,
               b_up: Optional[Tensor], b_gate: Optional[Tensor], b_down: Optional[Tensor], start: int, end: int,
               k_routes: int, activation: str) -> Tensor:
    """`routed_ffn` when every token takes the same route [start, end) in all of its K slots: the plain FFN on
    that neuron range for all tokens (weight slices are views; no routing, no kernel launch of ours).

    x [..., d]; gates [..., K] or None -> [..., d]. y = (sum_k g_k) * FFN_[start,end)(x), K * FFN when gates is
    None; exactly 0 for an empty range (b_down is not added, as in the reference op).
    """
    if start == end:
        return torch.zeros_like(x)
    act = get_activation(activation)
    up = F.linear(x, w_up[start:end], None if b_up is None else b_up[start:end])  # [..., F_r]
    if w_gate is None:
        h = act(up)
    else:
        h = act.glu(F.linear(x, w_gate[start:end], None if b_gate is None else b_gate[start:end]), up)
    y = F.linear(h, w_down[:, start:end], b_down)  # [..., d]
    if gates is None and k_routes == 1:
        return y
    acc = torch.float32 if x.dtype in _LOW_PRECISION else x.dtype
    scale = float(k_routes) if gates is None else gates.to(acc).sum(-1, keepdim=True)  # [..., 1]
    return (y.to(acc) * scale).to(x.dtype)


def copy_graph(graph: fx.Graph) -> fx.Graph:
    """A copy of `graph`'s nodes that keeps its calling convention (the pytree codegen of an exported module,
    shared: it is not mutated). `copy.deepcopy` would also deep-copy the codegen's pytree specs."""
    new = fx.Graph()
    out, old_output = new.graph_copy(graph, {}, return_output_node=True)
    new._codegen = graph._codegen
    new.output(out, type_expr=getattr(old_output, "type", None)).meta.update(old_output.meta)
    return new


def copy_module(gm: fx.GraphModule) -> fx.GraphModule:
    """A GraphModule sharing `gm`'s weights and meta over a copy of its graph (`copy_graph`), to rewrite apart."""
    new = fx.GraphModule(gm, copy_graph(gm.graph), class_name=type(gm).__name__)
    new.meta.update(gm.meta)
    return new


def lower_routed(gm: fx.GraphModule, dynamic_op=None) -> tuple[fx.GraphModule, int, int]:
    """A new GraphModule (sharing `gm`'s weights; `gm` is left unchanged) whose constant-route routed FFNs are
    `static_ffn` calls on their range and, when `dynamic_op` is given, whose other routed FFNs call it with the
    same arguments. Returns (module, constant-route FFNs lowered, dynamic FFNs replaced)."""
    new = copy_module(gm)
    n_static = n_dynamic = 0
    for n in list(new.graph.nodes):
        if n.op != "call_function" or n.target is not _ROUTED_FFN:
            continue
        x, routes, gates, w_up, w_gate, w_down, b_up, b_gate, b_down, ranges, activation = n.args
        route = constant_route(routes)
        if route is None and dynamic_op is None:
            continue
        with new.graph.inserting_before(n):
            if route is not None:
                if not 0 <= route < len(ranges) // 2:
                    raise BackendError(f"{n.name}: the constant route id {route} is outside [0, R={len(ranges) // 2}) "
                                       f"for ranges {list(ranges)}")
                k_routes = int(routes.meta["val"].shape[-1])
                rep = new.graph.call_function(static_ffn, (x, gates, w_up, w_gate, w_down, b_up, b_gate, b_down,
                                                            ranges[2 * route], ranges[2 * route + 1], k_routes,
                                                            activation))
                n_static += 1
            else:
                rep = new.graph.call_function(dynamic_op, n.args, n.kwargs)
                n_dynamic += 1
        rep.meta.update(n.meta)
        n.replace_all_uses_with(rep)
        new.graph.erase_node(n)
    new.graph.eliminate_dead_code()
    new.recompile()
    return new, n_static, n_dynamic


def with_route_outputs(gm: fx.GraphModule) -> fx.GraphModule:
    """A copy of `gm` (sharing its weights; `gm` is left unchanged) that returns `(outputs, routes)`: its own
    outputs and a tuple of the route ids of each routed FFN whose routes are not constants, in graph order. For
    checking the routes a compiled backend really computes (Inductor may fuse a router otherwise than eager):
    lower and compile the copy like the graph itself."""
    import torch.utils._pytree as pytree
    new = copy_module(gm)
    g = new.graph
    routes = [n.args[1] for n in g.nodes if n.op == "call_function" and n.target is _ROUTED_FFN
              and constant_route(n.args[1]) is None]
    out = next(n for n in g.nodes if n.op == "output")
    info = getattr(g._codegen, "pytree_info", None)
    if info is None or info.out_spec is None:  # a plain graph: its output value as is
        out.args = ((out.args[0], tuple(routes)),)
    else:
        leaves = list(out.args[0])
        shape = pytree.tree_unflatten(list(range(len(leaves))), info.out_spec)
        spec = pytree.tree_structure((shape, tuple(range(len(routes)))))
        g._codegen = type(g._codegen)(info._replace(out_spec=spec))
        out.args = (tuple(leaves + routes),)
    new.recompile()
    return new
