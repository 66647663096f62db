"""Recognition and compilation follow the model's device. On a `meta` model (shapes, no values) `inspect` finds
what it finds on CPU, and `compile` works for policies that need no calibration: the compiled model, called on
meta inputs, returns the output structure and shapes of the model on CPU. Calibration needs values, so policies
that calibrate are refused there with a typed error. The probes that need values (attention masks, activations)
run on CPU and read nothing from the device."""
import pytest
import torch

import routefx
from routefx.compiler.plan_io import check_fingerprint, fingerprint
from routefx.errors import BackendError, CalibrationError, PlanMismatchError
from routefx.ir import recognize
from routefx.policies import Dense, Duo, PruneLayers
from tests.compare import assert_close_nonpad, main_output
from tests.tolerances import EXACT_REWRITE
from tests.zoo import ZOO, example_inputs


def _to_meta(args, kwargs):
    return tuple(a.to("meta") for a in args), {k: v.to("meta") for k, v in kwargs.items()}


def _outputs(out) -> dict:
    """name -> shape of every tensor of a model output (a bare tensor is named "")."""
    if isinstance(out, torch.Tensor):
        return {"": tuple(out.shape)}
    return {k: tuple(v.shape) for k, v in out.items() if isinstance(v, torch.Tensor)}


@pytest.mark.parametrize("name", ["llama", "gemma3"])   # causal; sliding window + causal
def test_inspect_on_meta_matches_cpu(name, zoo_capture):
    entry = ZOO[name]
    args, kwargs = example_inputs(entry)
    cpu = recognize(zoo_capture(name)[1]).to_dict()
    meta = entry.build().to("meta")
    got = routefx.inspect(meta, *_to_meta(args, kwargs))
    assert got.to_dict() == cpu
    assert all(a.pattern != "custom" for b in got.blocks for a in b.attention)   # the mask probe really ran


@pytest.mark.parametrize("name, policy", [("llama", Dense()), ("llama", PruneLayers(layers=(1,))),
                                          ("bert", Dense()), ("plain", PruneLayers(layers=(0, 2)))],
                         ids=["llama-dense", "llama-prune", "bert-dense", "plain-prune"])   # mask, encoder, no mask
def test_compile_on_meta_gives_the_models_output_shapes(name, policy):
    entry = ZOO[name]
    meta = entry.build().to("meta")
    cpu = entry.build()
    args, kwargs = _to_meta(*example_inputs(entry))
    cm = routefx.compile(meta, policy, example_inputs=args, example_kwargs=kwargs)
    assert len(cm.ir.blocks) == entry.expect.blocks - len(getattr(policy, "layers", ()))
    for batch, seq in [(2, 7), (3, 5), (1, 1)]:                    # the captured size, others, one token
        args, kwargs = example_inputs(entry, batch=batch, seq=seq)
        margs, mkwargs = _to_meta(args, kwargs)
        out = cm(*margs, **mkwargs)
        assert main_output(out).device.type == "meta"
        with torch.no_grad():
            want = cpu(*args, **kwargs)
        assert type(out) is type(want)
        assert _outputs(out) == _outputs(want)


def test_a_plan_made_on_meta_compiles_the_real_model():
    entry = ZOO["llama"]
    args, kwargs = example_inputs(entry, left_pad=2)
    on_meta = routefx.compile(entry.build().to("meta"), Dense(), example_inputs=_to_meta(args, kwargs)[0],
                              example_kwargs=_to_meta(args, kwargs)[1])
    assert all(p["sha256"] is None for p in on_meta.plan.fingerprint["params"].values())   # no values to hash
    model = entry.build()
    real = routefx.compile(model, on_meta.plan, example_inputs=args, example_kwargs=kwargs)
    with torch.no_grad():
        want = model(*args, **kwargs)
    assert_close_nonpad(real(*args, **kwargs), want, kwargs["attention_mask"], EXACT_REWRITE)
    # shapes and dtypes are still checked against a plan without weight hashes
    with pytest.raises(PlanMismatchError, match="dtype"):
        check_fingerprint(on_meta.plan.fingerprint, entry.build().to(torch.float64))
    # and hashes still are between two real models
    other = entry.build()
    with torch.no_grad():
        next(other.parameters()).add_(1.0)
    with pytest.raises(PlanMismatchError, match="weights differ"):
        check_fingerprint(fingerprint(model), other)


def test_calibrating_policies_on_meta_are_refused():
    entry = ZOO["llama"]
    args, kwargs = _to_meta(*example_inputs(entry))
    cal = [dict(input_ids=args[0]) | kwargs]
    for policy in (Duo(budget=0.5, small="nested"), PruneLayers(keep=0.5)):
        with pytest.raises(CalibrationError, match="meta device .* calibration needs real weights"):
            routefx.compile(entry.build().to("meta"), policy, calibration=cal)


def test_backends_other_than_eager_refuse_a_meta_model():
    entry = ZOO["llama"]
    args, kwargs = _to_meta(*example_inputs(entry))
    with pytest.raises(BackendError, match="meta device.*only the eager backend.*'onnx'"):
        routefx.compile(entry.build().to("meta"), Dense(), example_inputs=args, example_kwargs=kwargs,
                        backend="onnx")
