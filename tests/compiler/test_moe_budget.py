"""MoEBudget: the fitted price meets the budget (±0.02) on the calibration data, and the compiled model equals the
Hugging Face model whose experts receive gates changed by a plain per-token implementation of the rule."""
import pytest
import torch

import routefx
from routefx.errors import CalibrationError, PolicyError
from routefx.policies import MoEBudget
from tests.compare import assert_close_nonpad
from tests.tolerances import EXACT_REWRITE, ONNX_VS_EAGER
from tests.zoo import ZOO, example_inputs


def _cal(entry):
    return [{"input_ids": a[0], **k} for a, k in
            (example_inputs(entry, batch=3, seq=12, left_pad=2, seed=40 + i) for i in range(2))]


def _rule_reference(weights: torch.Tensor, lam: float, rule: str) -> torch.Tensor:
    """The rule, token by token in float64: keep the largest gates (top_p: until their normalised mass reaches
    1 - λ; threshold: those with normalised gate >= λ; the largest always), rescale the kept ones to the sum."""
    out = torch.zeros_like(weights)
    for t, g in enumerate(weights.double()):
        q = g / g.sum()
        mass = 0.0
        for j, i in enumerate(torch.argsort(q, descending=True).tolist()):
            keep = j == 0 or (mass < 1 - lam if rule == "top_p" else q[i] >= lam)
            if keep:
                out[t, i] = g[i]
            mass += float(q[i])
        out[t] *= float(g.sum() / out[t].double().sum())
    return out


def _reference_model(model, lam, rule):
    """The HF model with every experts module fed the rule's gates (a dropped expert gets gate 0)."""
    for layer in model.model.layers:
        experts = layer.mlp.experts
        orig = experts.forward
        experts.forward = (lambda f: lambda h, idx, w: f(h, idx, _rule_reference(w, lam, rule).to(w.dtype)))(orig)
    return model


@pytest.mark.parametrize("name,rule,budget,backend", [("mixtral", "top_p", 0.75, "eager"),
                                                      ("qwen3moe", "threshold", 0.6, "eager"),
                                                      ("qwen3moe", "top_p", 0.5, "onnx")])
def test_budget_is_met_and_output_follows_the_rule(name, rule, budget, backend):
    entry = ZOO[name]
    cal = _cal(entry)
    cm = routefx.compile(entry.build(), MoEBudget(budget=budget, rule=rule), calibration=cal, backend=backend)
    rec = cm.plan.budget
    assert abs(rec.realised - budget) <= 0.02 and rec.at_lambda_0 == pytest.approx(1.0)
    assert abs(cm.route_stats(cal).budget - rec.realised) < 1e-9       # the compiled graph takes those routes
    args, kwargs = example_inputs(entry, batch=2, seq=10, left_pad=3, seed=9)
    ref_model = _reference_model(entry.build(), cm.plan.lam, rule)
    with torch.no_grad():
        ref = ref_model(*args, **kwargs)
    tol = EXACT_REWRITE if backend == "eager" else ONNX_VS_EAGER
    assert_close_nonpad(cm(*args, **kwargs), ref, kwargs["attention_mask"], tol)
    with torch.no_grad():
        full = entry.build()(*args, **kwargs)
    assert (cm(*args, **kwargs).logits - full.logits).abs().max() > 1e-3   # experts were dropped: output differs


def test_refusals():
    with pytest.raises(PolicyError, match=r"unknown rule 'top_k'; supported: top_p, threshold"):
        MoEBudget(rule="top_k")
    with pytest.raises(PolicyError, match=r"budget must be a fraction"):
        MoEBudget(budget=1.5)
    entry = ZOO["mixtral"]
    with pytest.raises(CalibrationError, match=r"below 1/k = 0.500"):
        routefx.compile(entry.build(), MoEBudget(budget=0.3), calibration=_cal(entry))
    assert MoEBudget.from_json(MoEBudget(budget=0.6, rule="threshold").to_json()) == MoEBudget(0.6, "threshold")
