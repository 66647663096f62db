"""Calibration before the rewrite: policy + captured graph + data -> Plan (the decisions the passes apply).

Dense needs none; PruneLayers ranks blocks by Block Influence (`influence.py`); Duo orders neurons, sizes the
small branch and trains routers (`duo.py`); MoEfy clusters neurons into experts and fits expert routers
(`moefy.py`); MoEBudget(hoist=True) fits pre-gating routers (`moe_hoist.py`). What must be measured on the
rewritten graph (the price λ that meets the budget) is the pipeline's budget step (`budget.py`).
"""
from __future__ import annotations

import math

from torch import fx

from routefx.calibrate.duo import calibrate_duo
from routefx.calibrate.influence import block_influence
from routefx.calibrate.moe_hoist import calibrate_moe_hoist
from routefx.calibrate.moefy import calibrate_moefy
from routefx.compiler.plan import Plan
from routefx.compiler.policies import Dense, Duo, MoEBudget, MoEfy, Policy, PruneLayers
from routefx.errors import PolicyError
from routefx.ir.model_ir import ModelIR

__all__ = ["calibrate"]


def _prune(policy: PruneLayers, gm: fx.GraphModule, ir: ModelIR, batches: list[dict] | None, plan: Plan) -> None:
    L = len(ir.blocks)
    if policy.layers is not None:
        bad = [i for i in policy.layers if i >= L]
        if bad:
            raise PolicyError(f"PruneLayers: block {bad[0]} does not exist; the model has {L} blocks (0..{L - 1})")
        pruned = sorted(policy.layers)
    else:
        plan.block_influence = block_influence(gm, ir, batches)
        n = min(math.floor((1 - policy.keep) * L + 0.5), L - 1)
        order = sorted(range(L), key=lambda i: (plan.block_influence[i], i))
        pruned = sorted(order[:n])
    if len(pruned) >= L:
        raise PolicyError(f"PruneLayers would remove all {L} blocks; keep at least one")
    plan.pruned = pruned


def calibrate(policy: Policy, gm: fx.GraphModule, ir: ModelIR, batches: list[dict] | None) -> Plan:
    plan = Plan(policy=policy.to_dict(), block_paths=[b.path for b in ir.blocks])
    if isinstance(policy, MoEBudget) and policy.hoist:
        calibrate_moe_hoist(gm, ir, batches, plan)  # pre-gating routers; λ is fitted later, as without
    elif isinstance(policy, (Dense, MoEBudget)):
        pass  # MoEBudget's one decision, the price λ, is fitted on the rewritten graph (calibrate/moe_budget.py)
    elif isinstance(policy, PruneLayers):
        _prune(policy, gm, ir, batches, plan)
    elif isinstance(policy, Duo):
        calibrate_duo(policy, gm, ir, batches, plan)
    elif isinstance(policy, MoEfy):
        calibrate_moefy(policy, gm, ir, batches, plan)
    else:
        raise PolicyError(f"no calibration for policy {type(policy).__name__}")
    return plan
