"""`routefx.compile` with `Dense`: every recognised dense FFN runs through routed_ffn and the output is unchanged."""
import json

import pytest
import torch

import routefx
from routefx.ir.graph_utils import ROUTED_FFN
from tests.compare import assert_close_nonpad, main_output, max_abs_nonpad
from tests.tolerances import EXACT_REWRITE, MUST_DIFFER
from tests.zoo import DENSE, ZOO, example_inputs


def _reference(model, args, kwargs):
    kw = dict(kwargs)
    if "attention_mask" in kw and hasattr(model, "config"):
        kw["use_cache"] = False
    with torch.no_grad():
        return model(*args, **kw)


def _compile(name, **kw):
    entry = ZOO[name]
    model = entry.build()
    args, kwargs = example_inputs(entry, batch=2, seq=7)
    cm = routefx.compile(model, routefx.policies.Dense(), example_inputs=args, example_kwargs=kwargs, **kw)
    return entry, model, cm


@pytest.mark.parametrize("name", DENSE + ["qwen2moe"])
def test_dense_equals_original(name):
    entry, model, cm = _compile(name)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    # batch > 1, left padding, a length unlike the capture example
    args, kwargs = example_inputs(entry, batch=3, seq=13, left_pad=5, seed=7)
    out = cm(*args, **kwargs)
    ref = _reference(model, args, kwargs)
    assert type(out) is type(ref)
    assert_close_nonpad(out, ref, kwargs.get("attention_mask"), EXACT_REWRITE)
    if hasattr(out, "past_key_values"):
        assert out.past_key_values is None
    # every dense FFN block is rewritten, nothing else
    n_dense = sum(k in ("gated", "mlp") for k in entry.expect.kinds)
    rep = cm.report.pass_report("raise_ffn")
    assert rep.rewrites == n_dense
    ops = [n for n in cm.graph_module.graph.nodes if n.target is ROUTED_FFN and len(n.args[9]) == 2]
    assert len(ops) == n_dense
    assert [b.ffn.routed for b in cm.ir.dense_ffn_blocks if len(b.ffn.routed) == 1] == \
        [[[0, w]] for w, k in zip(entry.expect.inter, entry.expect.kinds) if k != "moe"]
    # the user's model is bit-identical afterwards
    after = model.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)


def test_moe_blocks_are_raised_by_raise_moe():
    """Qwen2-MoE: the MoE blocks' experts are raised by raise_moe (tests/compiler/test_moe.py checks them), the
    dense block by raise_ffn, and no block is reported as left as captured."""
    _, _, cm = _compile("qwen2moe")
    assert cm.report.pass_report("raise_ffn").rewrites == 1
    rep = cm.report.pass_report("raise_moe")
    assert rep.rewrites == 2 and rep.misses == []
    assert not any("MoE blocks" in n for n in cm.report.notes)


@pytest.mark.parametrize("name", ["llama", "gpt2", "bert", "plain_resized"])
def test_narrowing_a_range_changes_the_output(name):
    entry, model, cm = _compile(name)
    args, kwargs = example_inputs(entry, batch=2, seq=9, seed=3)
    full = main_output(cm(*args, **kwargs)).clone()
    gm = cm.graph_module
    op = [n for n in gm.graph.nodes if n.target is ROUTED_FFN][1]
    F = op.args[9][1]
    op.update_arg(9, [0, F // 2])
    gm.recompile()
    narrowed = cm(*args, **kwargs)
    assert max_abs_nonpad(narrowed, full, kwargs.get("attention_mask")) > MUST_DIFFER
    op.update_arg(9, [0, F])
    gm.recompile()
    assert max_abs_nonpad(cm(*args, **kwargs), full, kwargs.get("attention_mask")) == 0.0


def test_lazy_capture_and_recapture_on_new_keyword_form():
    entry = ZOO["llama"]
    model = entry.build()
    cm = routefx.compile(model, routefx.policies.Dense())
    with pytest.raises(routefx.NotCompiledError, match="compiles on its first call"):
        cm.report
    args, kwargs = example_inputs(entry, batch=1, seq=5)
    out = cm(*args, **kwargs)
    assert_close_nonpad(out, _reference(model, args, kwargs), kwargs["attention_mask"], EXACT_REWRITE)
    first = cm.graph_module
    cm(*args, **kwargs)
    assert cm.graph_module is first                      # same form: no new capture
    out = cm(*args)                                      # no attention_mask: a new form, captured again
    assert cm.graph_module is not first
    with torch.no_grad():
        ref = model(*args, use_cache=False)
    assert_close_nonpad(out, ref, None, EXACT_REWRITE)


def test_debug_dir_and_report_json(tmp_path):
    _, _, cm = _compile("llama", debug_dir=str(tmp_path))
    files = sorted(p.name for p in tmp_path.iterdir())
    assert files == ["00_capture.txt", "01_raise_moe.txt", "02_raise_ffn.txt"]
    text = (tmp_path / "02_raise_ffn.txt").read_text()
    assert "routefx.routed_ffn" in text and "# after raise_ffn" in text
    assert "routefx.routed_ffn" not in (tmp_path / "00_capture.txt").read_text()
    d = json.loads(cm.report.to_json())
    back = routefx.compiler.report.CompileReport.from_json(cm.report.to_json())
    assert back.to_dict() == cm.report.to_dict() == d
    assert [(p["name"], p["rewrites"]) for p in d["passes"]] == [("raise_moe", 0), ("raise_ffn", 3)]


# ---- bad inputs ---------------------------------------------------------------------------------------

def test_wrong_input_dtype_and_rank():
    entry, model, cm = _compile("llama")
    args, kwargs = example_inputs(entry)
    with pytest.raises(routefx.InputError, match=r"input 'input_ids' has dtype torch.float32 and rank 2; .* "
                                                 r"takes dtype torch.int64 and rank 2"):
        cm(args[0].float(), **kwargs)
    with pytest.raises(routefx.InputError, match=r"input 'attention_mask' has dtype torch.int64 and rank 3"):
        cm(*args, attention_mask=kwargs["attention_mask"][:, None, :])


def test_empty_or_one_shot_calibration_is_refused():
    model = ZOO["plain"].build()
    with pytest.raises(routefx.CalibrationError, match="calibration is empty"):
        routefx.compile(model, routefx.policies.Dense(), calibration=[])
    with pytest.raises(routefx.CalibrationError, match="re-iterable .* got generator"):
        routefx.compile(model, routefx.policies.Dense(), calibration=(torch.zeros(1, 3) for _ in range(2)))
    with pytest.raises(routefx.CalibrationError, match="batch 1 is a str"):
        routefx.compile(model, routefx.policies.Dense(), calibration=[torch.zeros(1, 3, dtype=torch.long), "x"])


def test_unknown_backend_and_policy():
    model = ZOO["plain"].build()
    with pytest.raises(routefx.BackendError, match="backend 'tpu' is not available; supported: eager"):
        routefx.compile(model, routefx.policies.Dense(), backend="tpu")
    with pytest.raises(routefx.PolicyError, match="policy must be a routefx policy .* got dict"):
        routefx.compile(model, {"policy": "Dense"})
