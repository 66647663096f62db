"""A plan does not depend on the input form: calibrate once, call with or without an attention mask."""
import pytest
import torch

import routefx
from routefx.calibrate import budget as budget_step
from routefx.compiler import compile as driver
from routefx.policies import Duo
from tests.compare import assert_close_nonpad
from tests.tolerances import EXACT_REWRITE, ONNX_VS_EAGER
from tests.zoo import ZOO, example_inputs


def _cal(entry, n=3, seed=10, mask=True):
    out = []
    for i in range(n):
        args, kwargs = example_inputs(entry, batch=4, seq=12, left_pad=3, seed=seed + i)
        out.append({"input_ids": args[0], **(kwargs if mask else {})})
    return out


@pytest.fixture
def counted(monkeypatch):
    """How often calibration and the budget step ran."""
    calls = {"calibrate": 0, "fit_budget": 0}
    real_cal, real_fit = driver.calibrate, budget_step.FitBudget.run

    def cal(*a, **k):
        calls["calibrate"] += 1
        return real_cal(*a, **k)

    def fit(self, *a, **k):
        calls["fit_budget"] += 1
        return real_fit(self, *a, **k)

    monkeypatch.setattr(driver, "calibrate", cal)
    monkeypatch.setattr(budget_step.FitBudget, "run", fit)
    return calls


@pytest.mark.parametrize("backend", ["eager", "onnx"])
def test_calibrated_with_masks_called_without(counted, backend):
    entry = ZOO["llama"]
    cm = routefx.compile(entry.build(), Duo(budget=0.5, router="local", small="nested"),
                         calibration=_cal(entry), backend=backend)
    plan = cm.plan
    ids = example_inputs(entry, batch=3, seq=9, seed=42)[0][0]
    no_mask = cm(input_ids=ids)                                       # a new input form: recaptured
    assert cm.plan is plan and counted == {"calibrate": 1, "fit_budget": 1}
    assert any("plan reused" in n for n in cm.report.notes)
    ones = cm(input_ids=ids, attention_mask=torch.ones_like(ids))      # the calibration form's graph
    tol = EXACT_REWRITE if backend == "eager" else ONNX_VS_EAGER
    assert_close_nonpad(no_mask, ones, None, tol)
    args, kwargs = example_inputs(entry, batch=1, seq=5, left_pad=2, seed=3)
    assert cm(*args, **kwargs).logits.shape == (1, 5, entry.vocab)     # another batch and length, padded
    assert counted == {"calibrate": 1, "fit_budget": 1}


def test_calibration_batches_may_omit_the_mask(counted):
    """Batches without a mask mean all ones: the plan equals the one from explicit all-ones masks."""
    entry = ZOO["llama"]
    bare = _cal(entry, mask=False)
    mixed = [bare[0], {**bare[1], "attention_mask": torch.ones_like(bare[1]["input_ids"])}, bare[2]["input_ids"]]
    explicit = [{**b, "attention_mask": torch.ones_like(b["input_ids"])} for b in bare]
    policy = Duo(budget=0.5, router="local", small="nested")
    a = routefx.compile(entry.build(), policy, calibration=mixed).plan
    b = routefx.compile(entry.build(), policy, calibration=explicit).plan
    assert a.lam == b.lam and list(a.layers) == list(b.layers)
    for key in a.layers:
        assert torch.equal(a.layers[key].perm, b.layers[key].perm)
        assert torch.equal(a.layers[key].weight, b.layers[key].weight)


def test_calibration_batches_must_agree_on_other_inputs():
    entry = ZOO["llama"]
    cal = _cal(entry)
    cal[1] = {**cal[1], "position_ids": torch.arange(12).expand(4, 12)}
    with pytest.raises(routefx.CalibrationError, match=r"calibration batch 0 lacks \['position_ids'\], which other "
                                                       r"batches carry; only 'attention_mask' has a default"):
        routefx.compile(entry.build(), Duo(budget=0.5, router="local", small="nested"), calibration=cal)
