"""On a CUDA device: a Llama in bf16 compiles, calibrates and runs there with the eager backend (every tensor
routefx creates follows the model's device; calibration statistics and router fits run in fp32 internally).
Skipped, and reported as skipped, only where CUDA is absent."""
import pytest
import torch

import routefx
from routefx.policies import Dense, Duo
from tests.compare import main_output, max_abs_nonpad
from tests.zoo import ZOO, example_inputs

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA absent: tests/test_cuda.py needs a GPU")

DEV = "cuda"


def _model(dtype):
    return ZOO["llama"].build().to(DEV, dtype)


def _inputs(seed, batch=3, seq=11, pad=3):
    args, kwargs = example_inputs(ZOO["llama"], batch=batch, seq=seq, left_pad=pad, seed=seed)
    return tuple(a.to(DEV) for a in args), {k: v.to(DEV) for k, v in kwargs.items()}


def _run(model, args, kwargs):
    with torch.no_grad():
        return model(*args, **kwargs, use_cache=False)


def _check_like_the_model(cm, model, args, kwargs):
    """cm matches the bf16 model as closely as the bf16 model matches its own fp32 version (+ rounding slack)."""
    out = cm(*args, **kwargs)
    logits = main_output(out)
    assert logits.device.type == "cuda" and logits.dtype == torch.bfloat16
    mask = kwargs["attention_mask"]
    ref32 = main_output(_run(_model(torch.float32), args, kwargs))
    err_model = max_abs_nonpad(main_output(_run(model, args, kwargs)).float(), ref32, mask)
    err_cm = max_abs_nonpad(logits.float(), ref32, mask)
    assert err_cm <= 2 * err_model + 1e-2, (err_cm, err_model)


def test_dense_bf16_on_cuda():
    model = _model(torch.bfloat16)
    args, kwargs = _inputs(seed=1)
    cm = routefx.compile(model, Dense(), example_inputs=args, example_kwargs=kwargs)
    _check_like_the_model(cm, model, args, kwargs)


@pytest.mark.parametrize("small", ["nested", "separate"])
def test_duo_bf16_on_cuda(small):
    model = _model(torch.bfloat16)
    cal = [dict(input_ids=a[0]) | k for a, k in (_inputs(seed=40 + i, batch=4, seq=16, pad=2) for i in range(2))]
    args, kwargs = _inputs(seed=2)
    full = routefx.compile(model, Duo(budget=1.0, small=small), calibration=cal)   # every token takes big
    _check_like_the_model(full, model, args, kwargs)
    half = routefx.compile(model, Duo(budget=0.5, small=small), calibration=cal)
    assert abs(half.plan.budget.realised - 0.5) <= 0.05
    logits = main_output(half(*args, **kwargs))
    assert logits.device.type == "cuda" and torch.isfinite(logits.float()).all()
    assert all(t.device.type == "cpu" for lp in half.plan.layers.values() for t in (lp.perm, lp.weight))
