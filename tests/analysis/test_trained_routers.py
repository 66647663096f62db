"""Trained routers (oracle-imitation, loss-trained) through `routefx.compile`: the budget is met (±0.02) on the
calibration data, measured by routing the model's own MLP modules with the plan's routers (tests/reference_ffn.py),
and the routers are the trained ones, not the local router they start from."""
import pytest
import torch

import routefx
from routefx.calibrate import loss_router
from routefx.policies import Duo
from tests.reference_ffn import plan_router, routed_reference
from tests.tiny_lm import batches as text_batches
from tests.tiny_lm import trained_llama

BUDGET_TOL = 0.02


def _reference_budget(model, plan, batches):
    routes = {key: [] for key in plan.layers}
    ffns = {key: (plan_router(lp, plan.lam, routes[key]), lp.perm[:lp.k]) for key, lp in plan.layers.items()}
    with torch.no_grad(), routed_reference(model, ffns, down="down_proj"):
        for b in batches:
            model(**b, use_cache=False)
    fractions = []
    for key, lp in plan.layers.items():
        r = torch.cat([x.reshape(-1) for x in routes[key]])
        fractions.append(float(torch.tensor(lp.costs, dtype=torch.float64)[r].mean()))
    return sum(fractions) / len(fractions)


@pytest.mark.parametrize("router,budget", [("imitation", 0.5), ("loss", 0.25)])
def test_trained_router_meets_the_budget(router, budget, monkeypatch):
    monkeypatch.setitem(loss_router.LOSS_ROUTER_DEFAULTS, "steps", 25)
    model = trained_llama()
    cal = text_batches(2, 6, 48, seed=100)
    cm = routefx.compile(model, Duo(budget=budget, router=router, small="nested"), calibration=cal)
    assert abs(_reference_budget(model, cm.plan, cal) - budget) <= BUDGET_TOL
    assert cm.plan.calibration["router_training"]["kind"] == router
    assert any(n.startswith(f"{router} routers trained") for n in cm.report.notes)
    info = cm.plan.calibration["router_training"]
    if router == "imitation":      # labels: an oracle at the budget, on every calibration token with a target
        assert abs(info["oracle_fraction"] - budget) <= 0.01 and info["label_tokens"] == 2 * 6 * 47
        assert info["fit_agreement"] > 1 / 3                  # better than chance on its own labels
    else:                          # the price pulled the expected compute towards the budget while training
        assert abs(info["final_expected_fraction"] - budget) < abs(1.0 - budget)
