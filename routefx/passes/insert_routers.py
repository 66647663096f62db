"""InsertRouters: give each planned routed FFN its skip / small / big ranges and a router choosing per token.

Requires: routed FFNs whose neurons are in importance order; `ctx.plan.layers[key]` with either
          `static_route` or a linear router (`weight` [3, d], `bias` [3]); `ctx.plan.lam` (None = 0).
Ensures:  ranges = `LayerPlan.ranges` (route 0 skip, 1 small, 2 big); routes [..., 1] =
          argmax(x·Wᵀ + b − λ·cost) where x is the FFN's input and cost = (0, k/F, 1), λ the graph buffer of
          `routefx/ir/price.py` shared by all routers; a static layer gets constant routes. Routers of an
          fp16 / bf16 FFN compute in fp32 (x cast, W, b and cost stored in fp32): a route is a discrete choice, and
          scores rounded to 8 bits of mantissa tie often, so backends that round intermediates differently
          (eager rounds every op's output, Inductor fuses the subtraction and keeps fp32) would pick different
          routes on the same input; calibration fits the routers in fp32 too.
"""
from __future__ import annotations

import torch
from torch import fx

from routefx.ir.model_ir import ModelIR
from routefx.ir.price import add_price_, has_price
from routefx.passes.attrs import add_tensor_attr
from routefx.passes.base import Pass, PassContext, PassResult, layers_ready, plan_layers, planned_ffns, routed_op

aten = torch.ops.aten
__all__ = ["InsertRouters", "router_dtype"]


def router_dtype(dtype: torch.dtype) -> torch.dtype:
    """The dtype a router computes in for an FFN input of `dtype`: fp32 for fp16 / bf16, else `dtype`."""
    return torch.float32 if dtype in (torch.float16, torch.bfloat16) else dtype


def _layers(ctx: PassContext) -> dict:
    return plan_layers(ctx)


class InsertRouters(Pass):
    name = "insert_routers"

    def requires(self, gm: fx.GraphModule, ctx: PassContext) -> str | None:
        return layers_ready(ctx, _layers(ctx), lambda lp: lp.static_route is None and (lp.weight is None
                                                                                        or lp.bias is None),
                            "have neither a static route nor router weights")

    def run(self, gm: fx.GraphModule, ctx: PassContext) -> PassResult:
        res = PassResult()
        g = gm.graph
        lam = 0.0 if ctx.plan is None or ctx.plan.lam is None else ctx.plan.lam
        if any(lp.static_route is None for lp in _layers(ctx).values()):
            dev = next((n.meta["val"].device for n in g.nodes if n.op == "placeholder"
                        and isinstance(n.meta.get("val"), torch.Tensor)), None)
            price = add_price_(gm, lam, device=dev)
        for key, lp, op in planned_ffns(ctx, res):
            x = op.args[0]
            with g.inserting_before(op):
                first = g.call_function(aten.slice.Tensor, (x, -1, 0, 1))                      # [..., 1]
                if lp.static_route is not None:
                    routes = g.call_function(aten.full_like.default, (first, lp.static_route),
                                             {"dtype": torch.int64})
                else:
                    dev = x.meta["val"].device
                    dt = router_dtype(x.meta["val"].dtype)
                    xr = x if dt == x.meta["val"].dtype else g.call_function(aten.to.dtype, (x, dt))
                    w = g.get_attr(add_tensor_attr(gm, f"routefx_{key}_router_w", lp.weight.to(dev, dt)))
                    bias = g.get_attr(add_tensor_attr(gm, f"routefx_{key}_router_b", lp.bias.to(dev, dt)))
                    cost = g.get_attr(add_tensor_attr(gm, f"routefx_{key}_cost",
                                                      torch.tensor(lp.costs, dtype=dt, device=dev)))
                    logits = g.call_function(aten.linear.default, (xr, w, bias))                # [..., 3]
                    priced = g.call_function(aten.mul.Tensor, (cost, g.get_attr(price)))       # [3]
                    adj = g.call_function(aten.sub.Tensor, (logits, priced))
                    routes = g.call_function(aten.argmax.default, (adj, -1, True))             # [..., 1]
            op.update_arg(1, routes)
            op.update_arg(9, lp.ranges)
            res.rewrites += 1
        return res

    def ensures(self, gm: fx.GraphModule, ctx: PassContext, after: ModelIR) -> str | None:
        for key, lp in _layers(ctx).items():
            op = routed_op(after, key)
            if op is None or op.args[9] != lp.ranges:
                return f"layer {key} does not have the planned ranges {lp.ranges}"
            if lp.static_route is None and op.args[1].target is not aten.argmax.default:
                return f"layer {key}: routes are not chosen by its router"
        if any(lp.static_route is None for lp in _layers(ctx).values()) and not has_price(gm):
            return "no λ buffer for the routers"
        return None
