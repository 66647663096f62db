"""AppendSmallBranch: Before (routed_ffn over F neurons) -> Expected (F + k neurons: the fitted small branch
appended; the big range [0, F) computes what it did before)."""
import pytest
import torch

from routefx.errors import PlanMismatchError
from routefx.passes.append_small_branch import AppendSmallBranch
from routefx.passes.raise_ffn import RaiseFFN
from tests.compare import assert_close_nonpad
from tests.passes.graphs import captured, layer, plan, routed_ops, run
from tests.tolerances import EXACT_REWRITE


def _separate(d=36, F=76, k=7, gated=False, seed=0):
    g = torch.Generator().manual_seed(seed)
    parts = {"small_up": torch.randn(k, d, generator=g), "small_down": torch.randn(d, k, generator=g),
             "small_b_up": torch.randn(k, generator=g)}
    if gated:
        parts["small_gate"] = torch.randn(k, d, generator=g)
    return layer(F, k, small="separate", **parts)


def test_small_weights_are_appended_after_the_big_ones():
    model, gm, args, kwargs = captured("plain_sandwich")          # plain MLP with biases
    lp = _separate()
    _, reports = run(gm, [RaiseFFN(), AppendSmallBranch()], plan({"z.2.b": lp}))
    op = routed_ops(gm)[2]
    ffn = model.z[2].b
    up, down, b_up = (gm.get_buffer(op.args[i].target) for i in (3, 5, 6))
    assert torch.equal(up, torch.cat([ffn.a.weight, lp.small_up]))          # [F + k, d]
    assert torch.equal(down, torch.cat([ffn.b.weight, lp.small_down], 1))   # [d, F + k]
    assert torch.equal(b_up, torch.cat([ffn.a.bias, lp.small_b_up]))
    assert op.args[9] == [0, 76] and reports[1].rewrites == 1
    assert reports[1].notes == [f"separate small branches add {lp.added_bytes:,} weight bytes"]
    with torch.no_grad():                                                    # routes still all big: [0, F)
        assert_close_nonpad(gm(*args, **kwargs), model(*args, **kwargs), None, EXACT_REWRITE)


def test_nested_layers_do_not_fire():
    _, gm, _, _ = captured("plain")
    _, reports = run(gm, [RaiseFFN(), AppendSmallBranch()], plan({"z.0.b": layer(76, 19)}))
    assert reports[1].rewrites == 0 and reports[1].notes == []


def test_a_gate_for_an_ungated_ffn_is_a_plan_mismatch():
    _, gm, _, _ = captured("plain_sandwich")
    with pytest.raises(PlanMismatchError, match=r"z.0.b: the plan has a small_gate but the FFN has no matching "
                                                r"weight.*in pass 'append_small_branch'"):
        run(gm, [RaiseFFN(), AppendSmallBranch()], plan({"z.0.b": _separate(gated=True)}))
