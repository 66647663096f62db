"""AdaptExperts: per token, drop the routed experts the MoEBudget rule does not need (adaptive expert counts).

Requires: MoE blocks raised by RaiseMoE (routed_ffn with E equal non-empty ranges, K > 1 routes and gates).
Ensures:  each such op gains one empty range (route id E: a skip, which costs nothing on every backend); its
          routes and gates are those of `keep_rule` at the global price λ (the graph buffer of `ir/price.py`,
          set from `ctx.plan.lam`, fitted afterwards by the budget step `calibrate/moe_budget.py`).

The rule, per token, on the K captured gates g (T = tokens):
    q = g / sum(g)                                    # [T, K] normalised gate mass
    top_p:     keep the fewest experts, in decreasing q, whose mass reaches p = 1 - λ
    threshold: keep the experts with q >= τ = λ
    the largest gate is always kept; kept gates are rescaled to the original sum(g), dropped routes -> E
so raising λ keeps fewer experts (the budget falls), λ <= 0 keeps all K (the captured model).
"""
from __future__ import annotations

import torch
from torch import fx

from routefx.ir import graph_utils as gu
from routefx.ir.price import LAMBDA_ATTR, add_price_
from routefx.passes.base import Pass, PassContext, PassResult

aten = torch.ops.aten
__all__ = ["AdaptExperts", "keep_rule", "moe_ops", "adapted", "RULES"]

RULES = ("top_p", "threshold")


def keep_rule(routes: torch.Tensor, gates: torch.Tensor, lam: torch.Tensor, skip: int, rule: str):
    """(routes, gates) [T, K] after the rule (module docstring), written with aten ops so that it traces into the
    graph and lowers on every backend."""
    total = aten.sum.dim_IntList(gates, [-1], True)                        # [T, 1]
    q = aten.div.Tensor(gates, total)                                      # [T, K]
    qs, order = aten.sort.default(q, -1, True)                             # [T, K] descending
    if rule == "top_p":
        before = aten.sub.Tensor(aten.cumsum.default(qs, -1), qs)          # mass of the experts ahead
        # still short of p = 1 - λ (1 - λ as full_like - λ: the ONNX exporter's registry has no aten.rsub, which
        # would send the whole graph through its slower decomposition path)
        p = aten.sub.Tensor(aten.full_like.default(lam, 1.0), lam)
        keep_sorted = aten.lt.Tensor(before, p)
    else:
        keep_sorted = aten.ge.Tensor(qs, lam)
    first = aten.eq.Scalar(aten.cumsum.default(aten.ones_like.default(qs), -1), 1.0)  # [T, K] the largest gate
    keep_sorted = aten.logical_or.default(keep_sorted, first)
    keep = aten.scatter.src(aten.zeros_like.default(keep_sorted), -1, order, keep_sorted)  # [T, K] original order
    kept = aten.where.self(keep, gates, aten.zeros_like.default(gates))
    kept = aten.mul.Tensor(kept, aten.div.Tensor(total, aten.sum.dim_IntList(kept, [-1], True)))
    routes = aten.where.self(keep, routes, aten.full_like.default(routes, skip))
    return routes, kept


def adapted(n: fx.Node) -> bool:
    """Does this MoE op already end in the rule's empty (skip) range?"""
    r = n.args[9]
    return len(r) >= 6 and r[-1] == r[-2]


def moe_ops(gm: fx.GraphModule) -> list[fx.Node]:
    """routed_ffn nodes of raised MoE blocks: gates given, K > 1 routes, >= 2 equal non-empty ranges (then,
    once adapted, one empty range)."""
    out = []
    for n in gm.graph.nodes:
        if not gu.is_routed(n) or n.args[2] is None or gu.val(n.args[1]).shape[-1] < 2:
            continue
        r = n.args[9][:-2] if adapted(n) else n.args[9]
        widths = {r[i + 1] - r[i] for i in range(0, len(r), 2)}
        if len(r) >= 4 and len(widths) == 1 and 0 not in widths:
            out.append(n)
    return out


class AdaptExperts(Pass):
    name = "adapt_experts"

    def __init__(self, rule: str = "top_p"):
        self.rule = rule

    def requires(self, gm: fx.GraphModule, ctx: PassContext) -> str | None:
        if self.rule not in RULES:
            return f"unknown rule {self.rule!r}; supported: {', '.join(RULES)}"
        if moe_ops(gm):
            return None
        top1 = [n for n in gm.graph.nodes if gu.is_routed(n) and n.args[2] is not None
                and gu.val(n.args[1]).shape[-1] == 1]
        if top1:
            return (f"the model's {len(top1)} MoE block(s) choose one expert per token (top-1): MoEBudget drops "
                    "experts among each token's top-k and always keeps the first, so it needs k >= 2")
        return "no MoE block raised to routed_ffn (RaiseMoE found none to rewrite)"

    def run(self, gm: fx.GraphModule, ctx: PassContext) -> PassResult:
        res = PassResult()
        g = gm.graph
        lam = 0.0 if ctx.plan is None or ctx.plan.lam is None else ctx.plan.lam
        dev = next((n.meta["val"].device for n in g.nodes if n.op == "placeholder"
                    and isinstance(n.meta.get("val"), torch.Tensor)), None)
        add_price_(gm, lam, device=dev)
        for op in [n for n in moe_ops(gm) if not adapted(n)]:
            skip = len(op.args[9]) // 2
            n_neurons = op.args[9][-1]
            rule = self.rule
            traced = fx.symbolic_trace(lambda routes, gates, lam: keep_rule(routes, gates, lam, skip, rule))
            with g.inserting_before(op):
                env = {}
                ins = iter([op.args[1], op.args[2], g.get_attr(LAMBDA_ATTR)])
                for n in traced.graph.nodes:
                    if n.op == "placeholder":
                        env[n] = next(ins)
                    elif n.op == "output":
                        new_routes, new_gates = (env[a] for a in n.args[0])
                    else:
                        env[n] = g.node_copy(n, lambda a: env[a])
            op.update_arg(1, new_routes)
            op.update_arg(2, new_gates)
            op.update_arg(9, list(op.args[9]) + [n_neurons, n_neurons])
            res.rewrites += 1
        return res

    def ensures(self, gm: fx.GraphModule, ctx: PassContext, after) -> str | None:
        ops = moe_ops(gm)
        bad = [n.name for n in ops if not adapted(n)
               or not any(a.op == "get_attr" and a.target == LAMBDA_ATTR for a in gu.ancestors([n.args[1]]))]
        return f"MoE routed FFNs {bad} are not adapted (an empty skip range, routes read λ)" if bad else None
