"""HoistMoERouters: pre-gating for MoE blocks (`MoEBudget(hoist=True)`): each MoE block but the first chooses its
experts and gates from the previous MoE block's router input, and the whole choice runs before that block.

Requires: MoE blocks raised by RaiseMoE; `ctx.plan.layers[key]` with router "pregate" (weight [E, d], bias [E])
          and `ctx.plan.calibration["moe_hoist"][key]["reads"]`, the previous MoE block it reads
          (`calibrate/moe_hoist.py`).
Ensures:  for each such block, its router product is linear(x_p, weight, bias) with x_p the routed_ffn input of
          block p, and every node its routes and gates depend on runs before block p's routed_ffn, so the block's
          dispatch (sort, counts) could be prepared one MoE block ahead.

What changes in the graph: only the router product. The block's scoring (softmax or sigmoid, top-k, renormalised
or not, MoEBudget's keep rule, which AdaptExperts inserted before this pass) is kept as captured and moved up
with it. A block whose choice needs anything computed after block p (for example a value of block p's own
output) is left as it is, reported as a miss.
"""
from __future__ import annotations

import torch
from torch import fx

from routefx.calibrate.moe_hoist import PREGATE
from routefx.ir import graph_utils as gu
from routefx.passes.attrs import add_tensor_attr
from routefx.passes.base import Miss, Pass, PassContext, PassResult, plan_layers, routed_op

aten = torch.ops.aten
__all__ = ["HoistMoERouters", "pregated", "router_product"]

_PRODUCTS = gu.targets(aten.linear, aten.mm, aten.matmul)
# ops that read a tensor argument for its shape / dtype only: (target, argument index)
_META_READS = {aten.type_as.default: 1, aten.sym_size.int: 0, aten.zeros_like.default: 0,
               aten.ones_like.default: 0, aten.empty_like.default: 0, aten.full_like.default: 0,
               aten.new_zeros.default: 0, aten.new_ones.default: 0, aten.new_empty.default: 0,
               aten.new_full.default: 0}


def pregated(ctx: PassContext) -> list[tuple[str, str]]:
    """(key, key of the MoE block it reads) for each planned pre-gating router."""
    reads = (ctx.plan.calibration.get("moe_hoist", {}) if ctx.plan is not None else {})
    return [(k, reads.get(k, {}).get("reads")) for k in plan_layers(ctx, lambda lp: lp.router == PREGATE)]


def router_product(op: fx.Node, reads: fx.Node | None = None) -> fx.Node | None:
    """The node computing the logits a MoE routed_ffn's routes come from: a linear / mm / matmul of `reads` (the
    op's own input by default; a cast of it counts) with one output per expert; None if there is not exactly one."""
    reads = op.args[0] if reads is None else reads
    r = op.args[9]
    n_experts = sum(1 for i in range(0, len(r), 2) if r[i + 1] > r[i])   # an adapted op's skip range is empty

    def reads_x(a):
        return a is reads or isinstance(a, fx.Node) and a.target is aten.to.dtype and a.args[0] is reads

    earlier = gu.ancestors([op.args[0]])          # earlier blocks' routers reach this op through its input
    found = [n for n in gu.ancestors([op.args[1]]) - earlier if n.op == "call_function" and n.target in _PRODUCTS
             and reads_x(n.args[0]) and gu.val(n) is not None and gu.val(n).shape[-1] == n_experts]
    return found[0] if len(found) == 1 else None


class HoistMoERouters(Pass):
    name = "hoist_moe_routers"

    def requires(self, gm: fx.GraphModule, ctx: PassContext) -> str | None:
        for key, prev in pregated(ctx):
            if routed_op(ctx.ir, key) is None or prev is None or routed_op(ctx.ir, prev) is None:
                return f"MoE block {key} or the block it reads ({prev}) has no routed_ffn (run raise_moe first)"
        return None

    def run(self, gm: fx.GraphModule, ctx: PassContext) -> PassResult:
        res = PassResult()
        for key, prev in pregated(ctx):
            op, op_prev = routed_op(ctx.ir, key), routed_op(ctx.ir, prev)
            why = self._hoist(gm, ctx.plan.layers[key], key, op, op_prev)
            if why:
                res.misses.append(Miss(key, f"router not hoisted: {why}"))
            else:
                res.rewrites += 1
        if res.rewrites:
            res.notes.append(f"{res.rewrites} MoE router(s) pre-gated: computed one MoE block ahead from that "
                             "block's router input (fitted at calibration)")
        return res

    @staticmethod
    def _hoist(gm: fx.GraphModule, lp, key: str, op: fx.Node, op_prev: fx.Node) -> str | None:
        g = gm.graph
        router = router_product(op)
        if router is None:
            return "no single router product (linear over the block input, one output per expert) found"
        x_prev, x_in = op_prev.args[0], router.args[0]
        if gu.val(x_prev).shape != gu.val(x_in).shape:
            return f"the previous block's input {list(gu.val(x_prev).shape)} does not match the router's input"
        dt, dev = gu.val(x_in).dtype, gu.val(x_in).device
        with g.inserting_before(router):
            src = x_prev if gu.val(x_prev).dtype == dt else g.call_function(aten.to.dtype, (x_prev, dt))
            w = g.get_attr(add_tensor_attr(gm, f"routefx_{key}_pregate_w", lp.weight.to(dev, dt)))
            b = g.get_attr(add_tensor_attr(gm, f"routefx_{key}_pregate_b", lp.bias.to(dev, dt)))
            lin = g.call_function(aten.linear.default, (src, w, b))
        lin.meta["val"] = gu.val(router)
        chain = gu.ancestors([op.args[1], op.args[2]]) | {op.args[1], op.args[2]}
        router.replace_all_uses_with(lin, delete_user_cb=lambda u: u in chain)
        same = gu.val(x_prev).dtype == dt
        meta_reads = [n for n in chain if n.target in _META_READS and same
                      and len(n.args) > _META_READS[n.target] and n.args[_META_READS[n.target]] is x_in]
        for n in meta_reads:            # the block's input read for its shape or dtype: x_p has the same
            n.update_arg(_META_READS[n.target], x_prev)
        need = gu.ancestors([op.args[1], op.args[2]]) | {op.args[1], op.args[2]}
        after_prev = gu.descendants(op_prev) | {op_prev}
        if need & after_prev:
            order = {n: i for i, n in enumerate(g.nodes)}
            bad = min(need & after_prev, key=order.get)
            lin.replace_all_uses_with(router)
            for n in meta_reads:
                n.update_arg(_META_READS[n.target], x_in)
            for n in (lin, b, w, *([src] if src is not x_prev else [])):
                g.erase_node(n)
            for n in (w, b):
                delattr(gm, n.target)
            return f"its choice reads {bad.name}, computed after the previous MoE block"
        past = False
        for n in list(g.nodes):         # in graph order: what the choice needs after block p moves before it
            if n is op_prev:
                past = True
            elif past and n in need:
                op_prev.prepend(n)
        return None

    def ensures(self, gm: fx.GraphModule, ctx: PassContext, after) -> str | None:
        order = {n: i for i, n in enumerate(gm.graph.nodes)}
        for key, prev in pregated(ctx):
            op, op_prev = routed_op(after, key), routed_op(after, prev)
            if op is None or op_prev is None:
                return f"MoE block {key} or {prev} lost its routed_ffn"
            if router_product(op, op_prev.args[0]) is None:
                continue  # not hoisted: reported as a miss
            if max(order[op.args[1]], order[op.args[2]]) > order[op_prev]:
                return f"MoE block {key}: its routes or gates are computed after block {prev} runs"
        return None
