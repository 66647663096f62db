"""Families outside the core zoo (other norms, ALiBi, soft-capping, parallel branches, other MoE routers):
compile(Dense) reproduces the model, with one block per configured layer; Duo meets its budget on the dense
ones. Recognition details (forms, FFN kinds, experts, top-k) are checked in tests/ir/test_inspect.py."""
import pytest
import torch

import routefx
from routefx.policies import Dense, Duo
from tests.compare import assert_close_nonpad
from tests.tolerances import EXACT_REWRITE
from tests.zoo import FAMILIES, FAMILIES_DENSE, ZOO, example_inputs


def _reference(model, args, kwargs):
    with torch.no_grad():
        return model(*args, **kwargs)


@pytest.mark.parametrize("name", FAMILIES)
def test_dense_reproduces_the_model(name, zoo_capture):
    model, _ = zoo_capture(name)
    args, kwargs = example_inputs(ZOO[name], batch=3, seq=9, left_pad=3, seed=5)
    cm = routefx.compile(model, Dense(), example_inputs=args, example_kwargs=kwargs)
    assert len(cm.ir.blocks) == model.config.num_hidden_layers
    assert cm.ir.notes == []
    out = cm(*args, **kwargs)
    assert_close_nonpad(out, _reference(model, args, kwargs), kwargs["attention_mask"], EXACT_REWRITE)


@pytest.mark.parametrize("name", FAMILIES_DENSE)
def test_duo_meets_the_budget(name, zoo_capture):
    model, _ = zoo_capture(name)
    cal = [dict(zip(("input_ids",), a)) | k for a, k in
           (example_inputs(ZOO[name], batch=3, seq=12, left_pad=2, seed=40 + i) for i in range(2))]
    cm = routefx.compile(model, Duo(budget=0.5, small="nested"), calibration=cal)
    realised = cm.plan.budget.realised
    assert abs(realised - 0.5) <= 0.02, realised
    assert abs(cm.route_stats(cal).budget - realised) < 1e-9        # the compiled graph takes those routes
    args, kwargs = example_inputs(ZOO[name], batch=2, seq=10, left_pad=1, seed=9)
    assert torch.isfinite(cm(*args, **kwargs).logits[kwargs["attention_mask"].bool()]).all()


def test_constants_through_var_kwargs(zoo_capture):
    """GraniteMoE's forward takes use_cache only through **kwargs: given there, it is baked into the graph."""
    model, _ = zoo_capture("granitemoe")
    args, kwargs = example_inputs(ZOO["granitemoe"], batch=2, seq=8, left_pad=2, seed=3)
    cm = routefx.compile(model, Dense(), example_inputs=args, example_kwargs=kwargs | {"use_cache": False})
    ref = _reference(model, args, kwargs | {"use_cache": False})
    assert_close_nonpad(cm(*args, **kwargs, use_cache=False), ref, kwargs["attention_mask"], EXACT_REWRITE)
    with pytest.raises(routefx.CaptureError, match=r"with use_cache=False; got use_cache=True"):
        cm(*args, **kwargs, use_cache=True)
    assert model.config.use_cache is True        # capture turned the cache off for the export only
