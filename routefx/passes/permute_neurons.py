"""PermuteNeurons: reorder each planned FFN's neurons by importance, so a prefix [0, k) is its small branch.

Requires: routed FFNs (after RaiseFFN); `ctx.plan.layers[key].perm` for the FFNs to permute.
Ensures:  the op reads permuted copies (w_up, w_gate, b_up, b_gate rows and w_down columns, in `perm` order);
          the dense function is unchanged up to summation order. The user's weights are never touched.
"""
from __future__ import annotations

from torch import fx

from routefx.ir.ffn import param_ref, resolve_weight
from routefx.ir.graph_utils import dynamic_nodes
from routefx.ir.model_ir import ModelIR
from routefx.passes.attrs import add_tensor_attr, is_own_copy
from routefx.passes.base import Pass, PassContext, PassResult, layers_ready, plan_layers, planned_ffns, routed_op

__all__ = ["PermuteNeurons"]

# routed_ffn argument positions: 3 w_up, 4 w_gate, 5 w_down, 6 b_up, 7 b_gate
_ROWS = {3: "up", 4: "gate", 6: "b_up", 7: "b_gate"}  # rows follow the permutation; w_down's columns do


def _permuted(ctx: PassContext) -> dict:
    return plan_layers(ctx, lambda lp: lp.perm is not None)


class PermuteNeurons(Pass):
    name = "permute_neurons"

    def requires(self, gm: fx.GraphModule, ctx: PassContext) -> str | None:
        return layers_ready(ctx, _permuted(ctx), lambda lp: sorted(lp.perm.tolist()) != list(range(lp.F)),
                            "have a perm that is not a permutation of range(F)")

    def run(self, gm: fx.GraphModule, ctx: PassContext) -> PassResult:
        res = PassResult()
        g = gm.graph
        dyn = dynamic_nodes(g)
        copies: dict = {}   # (weight, columns?, permutation) -> the copy made: runs of one module permuted alike
        seen: set = set()   # share one; a weight copied again (permuted differently) adds `again` bytes
        again = 0
        for key, lp, op in planned_ffns(ctx, res):
            if lp.perm is None:
                continue
            perm = lp.perm.to(resolve_weight(gm, param_ref(op.args[3], dyn)).device)
            order = lp.perm.numpy().tobytes()
            with g.inserting_before(op):
                for pos, field in (*_ROWS.items(), (5, "down")):
                    if op.args[pos] is None:
                        continue
                    ref = param_ref(op.args[pos], dyn)
                    token = (repr(ref), pos == 5, order)
                    if token not in copies:
                        w = resolve_weight(gm, ref)
                        w = (w[:, perm] if pos == 5 else w[perm]).contiguous()   # down's columns, the others' rows
                        again += w.nbytes if token[0] in seen else 0
                        seen.add(token[0])
                        copies[token] = add_tensor_attr(gm, f"routefx_{key}_{field}", w)
                    op.update_arg(pos, g.get_attr(copies[token]))
            res.rewrites += 1
        if again:
            res.notes.append(f"runs of one FFN module (a looped model) permuted differently each get a copy: "
                             f"{again:,} weight bytes beyond one copy per weight")
        return res

    def ensures(self, gm: fx.GraphModule, ctx: PassContext, after: ModelIR) -> str | None:
        for key in _permuted(ctx):
            op = routed_op(after, key)
            if op is None or not all(is_own_copy(gm, op.args[p]) for p in (3, 5)):
                return f"layer {key} does not read permuted copies of its weights"
        return None
