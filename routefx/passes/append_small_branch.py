"""AppendSmallBranch: append each planned separate small branch after the big one's neurons.

Requires: routed FFNs (neurons already permuted); `ctx.plan.layers[key]` with `small == "separate"` and its
          fitted weights (small_up/gate/down and biases).
Ensures:  the op's weights are [big F neurons; small k neurons] (copies; the user's weights are untouched), so
          the small branch is the range [F, F + k); the big range [0, F) computes what it did before.
"""
from __future__ import annotations

import torch
from torch import fx

from routefx.errors import PlanMismatchError
from routefx.ir.ffn import param_ref, resolve_weight
from routefx.ir.graph_utils import dynamic_nodes, val
from routefx.ir.model_ir import ModelIR
from routefx.passes.attrs import add_tensor_attr
from routefx.passes.base import Pass, PassContext, PassResult, layers_ready, plan_layers, planned_ffns, routed_op

__all__ = ["AppendSmallBranch"]

# routed_ffn argument position -> (plan field, concatenation dim)
_PARTS = {3: ("small_up", 0), 4: ("small_gate", 0), 5: ("small_down", 1), 6: ("small_b_up", 0),
          7: ("small_b_gate", 0)}


def _separate(ctx: PassContext) -> dict:
    return plan_layers(ctx, lambda lp: lp.small == "separate")


class AppendSmallBranch(Pass):
    name = "append_small_branch"

    def requires(self, gm: fx.GraphModule, ctx: PassContext) -> str | None:
        return layers_ready(ctx, _separate(ctx), lambda lp: lp.small_up is None or lp.small_down is None,
                            "have a separate small branch without fitted weights")

    def run(self, gm: fx.GraphModule, ctx: PassContext) -> PassResult:
        res = PassResult()
        g = gm.graph
        dyn = dynamic_nodes(g)
        added = 0
        for key, lp, op in planned_ffns(ctx, res):
            if lp.small != "separate":
                continue
            with g.inserting_before(op):
                for pos, (field, dim) in _PARTS.items():
                    extra = getattr(lp, field)
                    cur = op.args[pos]
                    if extra is None or cur is None:
                        if (extra is None) != (cur is None):
                            raise PlanMismatchError(f"{key}: the plan has {'no' if extra is None else 'a'} "
                                                    f"{field} but the FFN has {'no' if cur is None else 'a'} "
                                                    "matching weight; plan and graph must agree")
                        continue
                    w = resolve_weight(gm, param_ref(cur, dyn))
                    cat = torch.cat([w, extra.to(w.device, w.dtype)], dim=dim).contiguous()
                    op.update_arg(pos, g.get_attr(add_tensor_attr(gm, f"routefx_{key}_{field}_cat", cat)))
            added += lp.added_bytes
            res.rewrites += 1
        if res.rewrites:
            res.notes.append(f"separate small branches add {added:,} weight bytes")
        return res

    def ensures(self, gm: fx.GraphModule, ctx: PassContext, after: ModelIR) -> str | None:
        for key, lp in _separate(ctx).items():
            op = routed_op(after, key)
            rows = None if op is None else val(op.args[3]).shape[0]
            if rows != lp.F + lp.k:
                return f"layer {key}: w_up has {rows} rows, expected F + k = {lp.F + lp.k}"
        return None
