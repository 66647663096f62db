"""PermuteNeurons: reorder each planned FFN's neurons by importance, so a prefix [0, k) is its small branch.

Requires: routed FFNs (after RaiseFFN); `ctx.plan.layers[key].perm` for the FFNs to permute.
Ensures:  the op reads permuted copies (w_up, w_gate, b_up, b_gate rows and w_down columns, in `perm` order);
          the dense function is unchanged up to summation order. The user's weights are never touched.
"""
from __future__ import annotations

from torch import fx

from routefx.ir.ffn import resolve_weight
from routefx.ir.graph_utils import eliminate_dead_code_
from routefx.passes.attrs import add_tensor_attr
from routefx.passes.base import Miss, Pass, PassContext, PassResult

__all__ = ["PermuteNeurons"]

# routed_ffn argument positions: 3 w_up, 4 w_gate, 5 w_down, 6 b_up, 7 b_gate
_ROWS = {3: "up", 4: "gate", 6: "b_up", 7: "b_gate"}


class PermuteNeurons(Pass):
    name = "permute_neurons"

    def run(self, gm: fx.GraphModule, ctx: PassContext) -> PassResult:
        res = PassResult()
        layers = ctx.plan.layers if ctx.plan is not None else {}
        blocks = {b.key: b for b in ctx.ir.blocks}
        g = gm.graph
        for key, lp in layers.items():
            b = blocks.get(key)
            if b is None or b.ffn is None or b.ffn.routed is None:
                res.misses.append(Miss(key, "no routed FFN with this key in the graph"))
                continue
            if lp.perm is None:
                continue
            m, op = b.ffn.match, b.ffn.match.out
            perm = lp.perm
            with g.inserting_before(op):
                for pos, field in _ROWS.items():
                    ref = getattr(m, field)
                    if ref is not None:
                        w = resolve_weight(gm, ref)[perm].contiguous()
                        op.update_arg(pos, g.get_attr(add_tensor_attr(gm, f"routefx_{key}_{field}", w)))
                down = resolve_weight(gm, m.down)[:, perm].contiguous()
                op.update_arg(5, g.get_attr(add_tensor_attr(gm, f"routefx_{key}_down", down)))
            res.rewrites += 1
        eliminate_dead_code_(g)
        return res
