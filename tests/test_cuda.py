"""A Llama in bf16 compiles, calibrates and runs on its device with the eager backend (every tensor routefx creates
follows the model's device; calibration statistics and router fits run in fp32 internally).

Each test runs twice: on CUDA (marked `cuda`; skipped, and reported as skipped, only where CUDA is absent) and its
CPU twin, the same body in bf16 on CPU, which runs everywhere.
"""
import pytest
import torch

import routefx
from routefx.policies import Dense, Duo
from tests.compare import main_output, max_abs_nonpad
from tests.zoo import ZOO, example_inputs

_ON_CUDA = [pytest.mark.cuda,
            pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA absent: the CUDA variant needs a GPU")]
DEVICES = [pytest.param("cpu", id="cpu"), pytest.param("cuda", id="cuda", marks=_ON_CUDA)]
# the CPU twin of the Duo test runs the separate small branch only (its least-squares fit is the one more step
# on the device than nested), for suite time
DUO = [pytest.param("cpu", "separate", id="cpu-separate"),
       pytest.param("cuda", "nested", id="cuda-nested", marks=_ON_CUDA),
       pytest.param("cuda", "separate", id="cuda-separate", marks=_ON_CUDA)]


def _model(device, dtype):
    return ZOO["llama"].build().to(device, dtype)


def _inputs(device, seed, batch=3, seq=11, pad=3):
    args, kwargs = example_inputs(ZOO["llama"], batch=batch, seq=seq, left_pad=pad, seed=seed)
    return tuple(a.to(device) for a in args), {k: v.to(device) for k, v in kwargs.items()}


def _run(model, args, kwargs):
    with torch.no_grad():
        return model(*args, **kwargs, use_cache=False)


def _check_like_the_model(cm, model, args, kwargs, device):
    """cm matches the fp32 model as closely as the bf16 model does (+ bf16 rounding slack)."""
    out = cm(*args, **kwargs)
    logits = main_output(out)
    assert logits.device.type == device and logits.dtype == torch.bfloat16
    mask = kwargs["attention_mask"]
    ref32 = main_output(_run(_model(device, torch.float32), args, kwargs))
    err_model = max_abs_nonpad(main_output(_run(model, args, kwargs)).float(), ref32, mask)
    err_cm = max_abs_nonpad(logits.float(), ref32, mask)
    assert err_cm <= 2 * err_model + 1e-2, (err_cm, err_model)


@pytest.mark.parametrize("device", DEVICES)
def test_dense_bf16(device):
    model = _model(device, torch.bfloat16)
    args, kwargs = _inputs(device, seed=1)
    cm = routefx.compile(model, Dense(), example_inputs=args, example_kwargs=kwargs)
    _check_like_the_model(cm, model, args, kwargs, device)


@pytest.mark.parametrize("device, small", DUO)
def test_duo_bf16(device, small):
    model = _model(device, torch.bfloat16)
    cal = [dict(input_ids=a[0]) | k for a, k in (_inputs(device, seed=40 + i, batch=4, seq=16, pad=2)
                                                 for i in range(2))]
    args, kwargs = _inputs(device, seed=2)
    full = routefx.compile(model, Duo(budget=1.0, small=small), calibration=cal)   # every token takes big
    _check_like_the_model(full, model, args, kwargs, device)
    half = routefx.compile(model, Duo(budget=0.5, small=small), calibration=cal)
    assert abs(half.plan.budget.realised - 0.5) <= 0.05
    logits = main_output(half(*args, **kwargs))
    assert logits.device.type == device and torch.isfinite(logits.float()).all()
    assert all(t.device.type == "cpu" for lp in half.plan.layers.values() for t in (lp.perm, lp.weight))
