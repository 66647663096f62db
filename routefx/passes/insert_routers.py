"""InsertRouters: give each planned routed FFN its skip / small / big ranges and a router choosing per token.

Requires: routed FFNs whose neurons are in importance order; `ctx.plan.layers[key]` with either
          `static_route` or a linear router (`weight` [3, d], `bias` [3]); `ctx.plan.lam` (None = 0).
Ensures:  ranges = [0,0, 0,k, 0,F] (route 0 skip, 1 small, 2 big); routes [..., 1] =
          argmax(x·Wᵀ + b − λ·cost) where x is the FFN's input and cost = (0, k/F, 1), λ a graph buffer
          `routefx_lambda` shared by all routers; a static layer gets constant routes.
"""
from __future__ import annotations

import torch
from torch import fx

from routefx.ir.graph_utils import eliminate_dead_code_
from routefx.passes.attrs import add_tensor_attr
from routefx.passes.base import Pass, PassContext, PassResult, planned_ffns

aten = torch.ops.aten
__all__ = ["InsertRouters", "LAMBDA_ATTR"]

LAMBDA_ATTR = "routefx_lambda"
BIG_LAMBDA = -1e30  # budget 1.0: every token takes the big branch, whatever the router says


class InsertRouters(Pass):
    name = "insert_routers"

    def run(self, gm: fx.GraphModule, ctx: PassContext) -> PassResult:
        res = PassResult()
        layers = ctx.plan.layers if ctx.plan is not None else {}
        g = gm.graph
        lam = 0.0 if ctx.plan is None or ctx.plan.lam is None else ctx.plan.lam
        if any(lp.static_route is None for lp in layers.values()) and not hasattr(gm, LAMBDA_ATTR):
            dev = next((n.meta["val"].device for n in gm.graph.nodes if n.op == "placeholder"
                        and isinstance(n.meta.get("val"), torch.Tensor)), None)
            gm.register_buffer(LAMBDA_ATTR, torch.tensor(lam, dtype=torch.float32, device=dev))
        for key, lp, op in planned_ffns(ctx, res):
            x = op.args[0]
            with g.inserting_before(op):
                first = g.call_function(aten.slice.Tensor, (x, -1, 0, 1))                      # [..., 1]
                if lp.static_route is not None:
                    routes = g.call_function(aten.full_like.default, (first, lp.static_route),
                                             {"dtype": torch.int64})
                else:
                    dt, dev = x.meta["val"].dtype, x.meta["val"].device
                    w = g.get_attr(add_tensor_attr(gm, f"routefx_{key}_router_w", lp.weight.to(dev, dt)))
                    bias = g.get_attr(add_tensor_attr(gm, f"routefx_{key}_router_b", lp.bias.to(dev, dt)))
                    cost = g.get_attr(add_tensor_attr(gm, f"routefx_{key}_cost",
                                                      torch.tensor(lp.costs, dtype=dt, device=dev)))
                    logits = g.call_function(aten.linear.default, (x, w, bias))                 # [..., 3]
                    price = g.call_function(aten.mul.Tensor, (cost, g.get_attr(LAMBDA_ATTR)))  # [3]
                    adj = g.call_function(aten.sub.Tensor, (logits, price))
                    routes = g.call_function(aten.argmax.default, (adj, -1, True))             # [..., 1]
            op.update_arg(1, routes)
            op.update_arg(9, lp.ranges)
            res.rewrites += 1
        eliminate_dead_code_(g)
        return res
