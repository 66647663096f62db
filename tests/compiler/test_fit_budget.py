"""The budget step (`routefx.calibrate.budget.FitBudget`): its contract is checked like a pass's, and λ lands in
the plan, its typed record and the graph's buffer alike."""
import pytest
import torch

import routefx
from routefx.calibrate.budget import FitBudget
from routefx.compiler.plan import BudgetRecord
from routefx.ir.price import get_price
from routefx.policies import Duo
from tests.zoo import ZOO, example_inputs


def _compiled(router="random"):
    entry = ZOO["plain"]
    cal = [{"input_ids": example_inputs(entry, batch=3, seq=10, seed=s)[0][0]} for s in (1, 2)]
    return routefx.compile(entry.build(), Duo(budget=0.5, router=router, small="nested"), calibration=cal), cal


def test_lambda_is_one_value_in_plan_record_and_graph():
    cm, _ = _compiled()
    assert isinstance(cm.plan.budget, BudgetRecord) and cm.plan.budget.lam == cm.plan.lam
    assert get_price(cm.graph_module) == pytest.approx(cm.plan.lam, rel=1e-6)
    assert cm.plan.budget.at_lambda_0 is not None and len(cm.plan.budget.layers) == 3
    assert BudgetRecord.from_dict(cm.plan.budget.to_dict()) == cm.plan.budget


def test_a_graph_without_the_planned_ranges_breaks_the_contract():
    cm, cal = _compiled()
    op = next(n for n in cm.graph_module.graph.nodes if n.target is torch.ops.routefx.routed_ffn.default)
    op.update_arg(9, [0, 76])
    with pytest.raises(routefx.CalibrationError, match=r"calibration step 'fit_budget': contract broken \(requires\)"
                                                       r": layer\(s\) \['z.0.b'\] are not routed with their planned"):
        FitBudget()(cm.graph_module, cm.ir, cm.plan, list(cal), 0.5)
