"""HoistRouters: Read-ME-style pre-gating for Duo routers: each routed layer but the first chooses its routes from
the previous routed layer's FFN input, one layer ahead.

Requires: routers inserted by InsertRouters (routes = argmax(linear(x, W, b) - price) of each planned layer's own
          FFN input x, cast to fp32 first for an fp16 / bf16 FFN); `ctx.plan.policy["hoist"]` true (otherwise the
          pass changes nothing).
Ensures:  for planned layers l_0 < l_1 < ... (block order), the router of l_i (i >= 1) reads x_{l_{i-1}}, the FFN
          input of the previous routed layer, and its nodes run before that layer's routed_ffn, so l_i's route ids
          (all a backend needs to sort and count its dispatch) exist one routed layer ahead. l_0 is unchanged.

Semantics. A router whose input is the next layer's normalised FFN input cannot be moved earlier exactly: that
input does not exist yet. A hoisted router is therefore a *different* router: same form (a linear map over the
routes, the same global price λ on branch cost), fitted at calibration (`calibrate/duo.py`, `Duo(hoist=True)`)
by the same trainer as the local routers, on layer l_{i-1}'s FFN input against layer l_i's labels. Its choices
are less informed; the budget step fits λ on the hoisted graph, so the budget is met as usual. Only the
router's linear product changes input; the graph computes the same number of router products.
"""
from __future__ import annotations

import torch
from torch import fx

from routefx.ir import graph_utils as gu
from routefx.ir.model_ir import ModelIR
from routefx.passes.base import Miss, Pass, PassContext, PassResult, plan_layers, routed_op

aten = torch.ops.aten
__all__ = ["HoistRouters", "hoisted_layers"]


def hoisted_layers(ctx: PassContext, ir: ModelIR) -> list[tuple[str, str]]:
    """(key, previous key) for each planned per-token-router layer after the first, in block order; [] when the
    plan's policy does not ask for hoisting."""
    if ctx.plan is None or not (ctx.plan.policy or {}).get("hoist"):
        return []
    layers = plan_layers(ctx, lambda lp: lp.static_route is None)
    keys = [b.key for b in ir.blocks if b.key in layers]
    return list(zip(keys[1:], keys[:-1]))


def _router(routes, x: fx.Node) -> tuple[fx.Node, list[fx.Node]] | None:
    """(the router's node that reads x: its linear product, or the dtype cast feeding it (fp32 routers of a
    low-precision FFN); the router's nodes in graph order) when `routes` is an argmax over `linear(x, ...)` or
    `linear(x.to(dtype), ...)` and needs nothing but x and constants; None otherwise."""
    if not isinstance(routes, fx.Node) or routes.target is not aten.argmax.default:
        return None
    inside = gu.ancestors([routes], stop={x}) | {routes}
    chain = [n for n in routes.graph.nodes if n in inside and n is not x]
    heads = [n for n in chain if x in n.all_input_nodes]
    if len(heads) != 1 or any(n.op not in ("call_function", "get_attr") for n in chain):
        return None
    head = heads[0]
    if head.target is aten.to.dtype and len(head.users) == 1:  # x.to(fp32) -> linear
        lin, reads = next(iter(head.users)), head
    else:
        lin, reads = head, x
    if lin.target is not aten.linear.default or lin.args[0] is not reads:
        return None
    return head, chain


class HoistRouters(Pass):
    name = "hoist_routers"

    def requires(self, gm: fx.GraphModule, ctx: PassContext) -> str | None:
        for key, prev in hoisted_layers(ctx, ctx.ir):
            for k in (key, prev):
                op = routed_op(ctx.ir, k)
                if op is None:
                    return f"no routed FFN for planned layer {k} (run raise_ffn first)"
                if _router(op.args[1], op.args[0]) is None:
                    return f"layer {k}: routes are not chosen by a linear router over its input (run insert_routers)"
        return None

    def run(self, gm: fx.GraphModule, ctx: PassContext) -> PassResult:
        res = PassResult()
        for key, prev in hoisted_layers(ctx, ctx.ir):
            op, op_prev = routed_op(ctx.ir, key), routed_op(ctx.ir, prev)
            found = _router(op.args[1], op.args[0])
            if found is None:
                res.misses.append(Miss(key, "routes are not chosen by a linear router over the FFN input"))
                continue
            head, chain = found
            head.update_arg(0, op_prev.args[0])  # [..., d] -> the previous routed layer's FFN input
            for n in chain:                     # in graph order: dependencies stay before their users
                op_prev.prepend(n)
            res.rewrites += 1
        if res.rewrites:
            res.notes.append(f"{res.rewrites} router(s) hoisted one routed layer ahead (fitted on the previous "
                             "routed layer's FFN input)")
        return res

    def ensures(self, gm: fx.GraphModule, ctx: PassContext, after: ModelIR) -> str | None:
        order = {n: i for i, n in enumerate(gm.graph.nodes)}
        for key, prev in hoisted_layers(ctx, after):
            op, op_prev = routed_op(after, key), routed_op(after, prev)
            if op is None or op_prev is None or _router(op.args[1], op_prev.args[0]) is None:
                return f"layer {key}: its router does not read the FFN input of the previous routed layer {prev}"
            if order[op.args[1]] > order[op_prev]:
                return f"layer {key}: its routes are computed after the previous routed layer {prev} runs"
        return None
