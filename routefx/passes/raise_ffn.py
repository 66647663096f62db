"""RaiseFFN: replace each recognised dense FFN by one `routefx::routed_ffn` with a single full range.

Requires: `ctx.ir` recognised on `gm`; dense FFNs (kind gated/mlp) carry a `DenseFFNMatch`.
Ensures:  every dense FFN that was not yet routed is a `routed_ffn` call with `ranges=[0, F]` and all routes 0
          (the dense function, unchanged); MoE and unknown FFNs are untouched and reported as misses.
Weights are not copied: the op reads the parameters through view nodes (a transpose for [in, out] storage as in
GPT-2's Conv1D, a row slice for each half of a fused gate-up weight).
"""
from __future__ import annotations

import torch
from torch import fx

from routefx.ir.graph_utils import ROUTED_FFN
from routefx.ir.model_ir import ModelIR, WeightRef
from routefx.passes.base import Miss, Pass, PassContext, PassResult

aten = torch.ops.aten
__all__ = ["RaiseFFN", "weight_node"]


def weight_node(graph: fx.Graph, ref: WeightRef | None) -> fx.Node | None:
    """A node reading `ref` as its [out, in] matrix (or bias vector), through views only."""
    if ref is None:
        return None
    n = graph.get_attr(ref.target)
    if ref.index is not None:
        n = graph.call_function(aten.select.int, (n, 0, ref.index))
    if ref.transposed:
        n = graph.call_function(aten.t.default, (n,))
    if ref.rows is not None:
        n = graph.call_function(aten.slice.Tensor, (n, 0, ref.rows[0], ref.rows[1]))
    return n


class RaiseFFN(Pass):
    name = "raise_ffn"

    def run(self, gm: fx.GraphModule, ctx: PassContext) -> PassResult:
        res = PassResult()
        g = gm.graph
        for block in ctx.ir.blocks:
            f = block.ffn
            where = f"block {block.index}" + (f" ({f.path})" if f and f.path else "")
            if f is None:
                res.misses.append(Miss(where, "block has no FFN"))
                continue
            if f.routed is not None:
                continue  # already a routed_ffn (a raised MoE block included)
            if f.kind == "moe":
                res.misses.append(Miss(where, "MoE FFN left as it is by raise_ffn (raise_moe "
                                              "dispatches MoE experts; see its report)"))
                continue
            if f.kind == "unknown":
                res.misses.append(Miss(where, f"FFN not recognised: {f.reason}"))
                continue
            m = f.match
            with g.inserting_before(m.out):
                # routes [..., 1] int64, all 0: built from x so it follows the symbolic batch/sequence sizes
                first = g.call_function(aten.slice.Tensor, (m.inp, -1, 0, 1))
                routes = g.call_function(aten.zeros_like.default, (first,), {"dtype": torch.int64})
                w = {k: weight_node(g, getattr(m, k)) for k in ("up", "gate", "down", "b_up", "b_gate", "b_down")}
                op = g.call_function(ROUTED_FFN, (m.inp, routes, None, w["up"], w["gate"], w["down"], w["b_up"],
                                                  w["b_gate"], w["b_down"], [0, f.intermediate_size],
                                                  f.activation))
            op.meta["nn_module_stack"] = m.out.meta.get("nn_module_stack", {})
            op.meta["routefx_path"] = f.path
            m.out.replace_all_uses_with(op)
            res.rewrites += 1
        return res

    def ensures(self, gm: fx.GraphModule, ctx: PassContext, after: ModelIR) -> str | None:
        left = [b.index for b in after.dense_ffn_blocks if b.ffn.routed is None]
        if left:
            return f"dense FFN(s) of block(s) {left} are not routed_ffn calls"
        was = {b.key: b.ffn.intermediate_size for b in ctx.ir.dense_ffn_blocks if b.ffn.routed is None}
        wrong = [b.key for b in after.dense_ffn_blocks if b.key in was and b.ffn.routed != [[0, was[b.key]]]]
        return f"raised FFN(s) {wrong} do not have the one full range [0, F)" if wrong else None
