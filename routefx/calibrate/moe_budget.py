"""The MoEBudget budget step: fit the global price λ of the expert-keeping rule (`passes/adapt_experts.py`) so
that the mean fraction of the top-k experts computed, over MoE layers and real calibration tokens, meets the budget.

The realised fraction is measured on the rewritten graph by `budget.route_stats` (each adapted op has E expert
ranges of cost 1 and one empty range of cost 0, so its compute fraction is the share of the K route slots that
run an expert) and searched by `budget.fit_lambda`, the same bisection on the same λ buffer as Duo's routers.
"""
from __future__ import annotations

import torch
from torch import fx

from routefx.calibrate.budget import fit_lambda, route_stats
from routefx.compiler.plan import BudgetRecord, LayerBudget, Plan
from routefx.errors import CalibrationError
from routefx.ir.model_ir import ModelIR
from routefx.ir.price import get_price, has_price, set_price_
from routefx.passes.adapt_experts import moe_ops

__all__ = ["FitMoEBudget", "fit_price_into_plan"]

TOL = 0.005  # bisection stops within this of the budget (the policy promises ±0.02)


def fit_price_into_plan(step: str, gm: fx.GraphModule, ir: ModelIR, plan: Plan, batches: list[dict],
                        target: float):
    """Fit the graph's λ buffer to `target` (from λ = 0: every expert kept), record it and the realised fractions in
    `plan.lam` / `plan.budget`, check the buffer holds the plan's λ; returns the route stats at λ = 0 and fitted."""
    set_price_(gm, 0.0)
    at0 = route_stats(gm, ir, batches)
    plan.lam, st = fit_lambda(gm, ir, batches, target, tol=TOL)
    plan.budget = BudgetRecord(target, st.budget, plan.lam, at0.budget,
                               [LayerBudget(b["key"], b["mix"], b["fraction"], a["fraction"])
                                for a, b in zip(at0.layers, st.layers)])
    if get_price(gm) != float(torch.tensor(plan.lam).float()):
        raise CalibrationError(f"calibration step '{step}': contract broken (ensures): the graph's λ "
                               f"{get_price(gm)} is not the plan's {plan.lam}")
    return at0, st


class FitMoEBudget:
    """Requires: adapted MoE ops and the λ buffer in the graph. Ensures: `plan.lam` is the fitted λ, the graph's
    buffer holds it, `plan.budget` records the realised fraction (and the one at λ = 0, every expert kept)."""

    name = "fit_moe_budget"

    def __call__(self, gm: fx.GraphModule, ir: ModelIR, plan: Plan, batches: list[dict], target: float) -> list[str]:
        ops = moe_ops(gm)
        if not ops or not has_price(gm):
            raise CalibrationError(f"calibration step '{self.name}': contract broken (requires): no adapted MoE "
                                   "block or no λ buffer in the graph")
        k = min(int(n.args[1].meta["val"].shape[-1]) for n in ops)
        if target < 1.0 / k - 1e-9:
            raise CalibrationError(f"MoEBudget: budget {target} is below 1/k = {1.0 / k:.3f}: the rule always keeps "
                                   f"a token's largest gate, so at least one of its top-{k} experts runs")
        at0, st = fit_price_into_plan(self.name, gm, ir, plan, batches, target)
        return [f"MoEBudget: λ={plan.lam:.4g} brings the fraction of top-k experts computed on calibration data "
                f"from {at0.budget:.3f} (λ=0) to {st.budget:.3f} (target {target})"]
