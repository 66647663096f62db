"""MoEfyFFN: turn each planned dense routed FFN into E experts (equal neuron ranges) chosen per token by a router.

Requires: routed FFNs (after RaiseFFN) whose neurons are in expert order (PermuteNeurons ran with the plan's
          `perm`); `ctx.plan.layers[key]` with router `weight` [E, d] and `bias` [E], E = F / k experts of k
          neurons; `ctx.plan.calibration["moefy"]` with `top_k[key]` (static) or a `rule` (per token).
Ensures:  per planned layer, ranges = [0, k, k, 2k, ..., F - k, F] (+ an empty range [F, F] with a rule), no gates
          (every chosen expert has gate 1, so all E experts sum to the dense FFN), and routes [..., K] from the
          router on the FFN's input x (T = tokens):
              logits = x·Wᵀ + b                                      # [T, E]
              static:  routes = top-k(logits, K = top_k[key])         # [T, K]
              rule:    routes = `adapt_experts.keep_rule` on the experts sorted by softmax(logits), at the global
                       price λ (`ir/price.py`), dropped ones -> the empty range E   # [T, E]
          The down-projection bias, which every expert would otherwise add, is added once after the op.
"""
from __future__ import annotations

import operator

import torch
from torch import fx

from routefx.ir.graph_utils import val
from routefx.ir.model_ir import ModelIR
from routefx.ir.price import LAMBDA_ATTR, add_price_, has_price
from routefx.passes.adapt_experts import keep_rule
from routefx.passes.attrs import add_tensor_attr
from routefx.passes.base import Pass, PassContext, PassResult, layers_ready, plan_layers, planned_ffns, routed_op

aten = torch.ops.aten
__all__ = ["MoEfyFFN", "expert_ranges"]


def expert_ranges(n_neurons: int, width: int, skip: bool) -> list[int]:
    """Flat ranges of the E = n_neurons / width experts, then an empty range [F, F] when `skip`."""
    flat = [v for e in range(n_neurons // width) for v in (e * width, (e + 1) * width)]
    return flat + ([n_neurons, n_neurons] if skip else [])


def _settings(ctx: PassContext) -> dict:
    return (ctx.plan.calibration.get("moefy") or {}) if ctx.plan is not None else {}


def _broken(lp, settings: dict, key: str) -> bool:
    n_experts = lp.F // lp.k if lp.k else 0
    return (lp.weight is None or lp.bias is None or lp.k <= 0 or lp.F % lp.k or n_experts < 2
            or tuple(lp.weight.shape[:1]) != (n_experts,) or tuple(lp.bias.shape) != (n_experts,)
            or (settings.get("rule") is None and not 1 <= settings.get("top_k", {}).get(key, 0) <= n_experts))


def _trace_rule(g: fx.Graph, routes: fx.Node, gates: fx.Node, lam: fx.Node, skip: int, rule: str) -> fx.Node:
    """Copy `keep_rule` into `g` before the current insertion point; returns its routes node."""
    traced = fx.symbolic_trace(lambda r, q, p: keep_rule(r, q, p, skip, rule))
    env, ins = {}, iter([routes, gates, lam])
    for n in traced.graph.nodes:
        if n.op == "placeholder":
            env[n] = next(ins)
        elif n.op == "output":
            return env[n.args[0][0]]
        else:
            env[n] = g.node_copy(n, lambda a: env[a])
    raise AssertionError("traced rule has no output")


class MoEfyFFN(Pass):
    name = "moefy"

    def requires(self, gm: fx.GraphModule, ctx: PassContext) -> str | None:
        s = _settings(ctx)
        if not s:
            return "the plan has no MoEfy settings (plan.calibration['moefy'])"
        return layers_ready(ctx, plan_layers(ctx), lambda lp: False, "") or next(
            (f"layer {k} has no valid expert router or top-k in the plan (F={lp.F}, width={lp.k})"
             for k, lp in plan_layers(ctx).items() if _broken(lp, s, k)), None)

    def run(self, gm: fx.GraphModule, ctx: PassContext) -> PassResult:
        res = PassResult()
        g = gm.graph
        s = _settings(ctx)
        rule = s.get("rule")
        if rule is not None:
            lam = 0.0 if ctx.plan.lam is None else ctx.plan.lam
            dev = next((n.meta["val"].device for n in g.nodes if n.op == "placeholder"
                        and isinstance(n.meta.get("val"), torch.Tensor)), None)
            add_price_(gm, lam, device=dev)
        for key, lp, op in planned_ffns(ctx, res):
            x = op.args[0]
            dt, dev = val(x).dtype, val(x).device
            n_experts = lp.F // lp.k
            with g.inserting_before(op):
                w = g.get_attr(add_tensor_attr(gm, f"routefx_{key}_router_w", lp.weight.to(dev, dt)))
                b = g.get_attr(add_tensor_attr(gm, f"routefx_{key}_router_b", lp.bias.to(dev, dt)))
                logits = g.call_function(aten.linear.default, (x, w, b))                        # [..., E]
                if rule is None:
                    top = g.call_function(aten.topk.default, (logits, s["top_k"][key], -1, True, True))
                    routes = g.call_function(operator.getitem, (top, 1))                         # [..., K]
                else:
                    probs = g.call_function(aten._softmax.default, (logits, -1, False))         # [..., E]
                    top = g.call_function(aten.topk.default, (probs, n_experts, -1, True, True))  # sorted
                    q, order = (g.call_function(operator.getitem, (top, i)) for i in (0, 1))
                    routes = _trace_rule(g, order, q, g.get_attr(LAMBDA_ATTR), n_experts, rule)  # [..., E]
            b_down = op.args[8]
            op.update_arg(1, routes)
            op.update_arg(2, None)
            op.update_arg(8, None)
            op.update_arg(9, expert_ranges(lp.F, lp.k, rule is not None))
            if b_down is not None:
                with g.inserting_after(op):
                    biased = g.call_function(aten.add.Tensor, (op, b_down))
                op.replace_all_uses_with(biased, delete_user_cb=lambda u: u is not biased)
            res.rewrites += 1
        if res.rewrites:
            res.notes.append(f"{res.rewrites} FFN(s) split into experts ("
                             + (f"per-token rule {rule!r}" if rule else "static top-k") + ")")
        return res

    def ensures(self, gm: fx.GraphModule, ctx: PassContext, after: ModelIR) -> str | None:
        s = _settings(ctx)
        rule = s.get("rule")
        for key, lp in plan_layers(ctx).items():
            op = routed_op(after, key)
            want = expert_ranges(lp.F, lp.k, rule is not None)
            if op is None or op.args[9] != want:
                return f"layer {key} does not have its {lp.F // lp.k} expert ranges"
            k_routes = val(op.args[1]).shape[-1]
            if op.args[2] is not None or op.args[8] is not None:
                return f"layer {key}: the experts have gates or a down bias each (they must sum to the dense FFN)"
            if k_routes != (lp.F // lp.k if rule else s["top_k"][key]):
                return f"layer {key} takes {k_routes} routes per token"
        if rule is not None and not has_price(gm):
            return "no λ buffer for the per-token rule"
        return None

