"""PruneLayers: removing block i equals the same model with layer i deleted; keep= picks by Block Influence."""
import copy

import pytest
import torch
from torch import nn

import routefx
from routefx.policies import PruneLayers
from tests.compare import assert_close_nonpad
from tests.flop_reference import counted_by_torch, uncounted_per_token
from tests.tolerances import EXACT_REWRITE
from tests.zoo import DECODERS, ZOO, example_inputs

_LAYER_LISTS = {"gpt2": "transformer.h", "bert": "encoder.layer"}


def _layers_attr(name):
    if name.startswith("plain"):
        return "z"
    return _LAYER_LISTS.get(name, "model.layers")


def _delete_layer(model, name, i):
    ref = copy.deepcopy(model)
    owner_path, attr = _layers_attr(name).rsplit(".", 1) if "." in _layers_attr(name) else ("", "z")
    owner = ref.get_submodule(owner_path) if owner_path else ref
    layers = getattr(owner, attr)
    setattr(owner, attr, nn.ModuleList([m for j, m in enumerate(layers) if j != i]))
    return ref


@pytest.mark.parametrize("name", DECODERS + ["bert"])
def test_pruning_equals_deleting_the_layer(name):
    # Layers here do not depend on their index (no per-layer sliding windows); where a layer's behaviour does
    # (e.g. Gemma-2's alternating windows), deleting it from the list is not the same model and the
    # comparison would not hold.
    entry = ZOO[name]
    model = entry.build()
    i = 1
    args, kwargs = example_inputs(entry, batch=2, seq=6)
    cm = routefx.compile(model, PruneLayers(layers=[i]), example_inputs=args, example_kwargs=kwargs)
    assert len(cm.ir.blocks) == entry.expect.blocks - 1
    ref = _delete_layer(model, name, i)
    args, kwargs = example_inputs(entry, batch=3, seq=11, left_pad=4, seed=5)
    with torch.no_grad():
        expected = ref(*args, **kwargs, **({"use_cache": False} if entry.name not in ("bert",) and
                                             not name.startswith("plain") else {}))
    assert_close_nonpad(cm(*args, **kwargs), expected, kwargs.get("attention_mask"), EXACT_REWRITE)
    rep = cm.report.pass_report("prune_blocks")
    assert rep.rewrites == 1 and rep.notes[0].startswith(f"removed block {i}")
    # the pruned block's compute is gone from the graph, not just bypassed: FlopCounterMode on the model with
    # and without the layer, plus the closed forms it does not count (tests/flop_reference.py)
    f = cm.report.flops_per_token
    args6, kwargs6 = example_inputs(entry, batch=2, seq=f["S"])
    removed = (counted_by_torch(model, entry, args6, kwargs6) - counted_by_torch(ref, entry, args6, kwargs6)) / (
        2 * f["S"]) + uncounted_per_token(model, entry, f["S"], blocks=[i])
    assert f["before"] - f["after"] == pytest.approx(removed, rel=1e-9)


def test_pruning_two_adjacent_blocks():
    entry = ZOO["plain_resized"]
    model = entry.build()
    args, _ = example_inputs(entry, seq=8)
    cm = routefx.compile(model, PruneLayers(layers=[2, 1]), example_inputs=args)
    ref = _delete_layer(_delete_layer(model, "plain", 2), "plain", 1)
    with torch.no_grad():
        assert_close_nonpad(cm(*args), ref(*args), None, EXACT_REWRITE)
    assert [b.ffn.intermediate_size for b in cm.ir.blocks] == [76, 76]


def _calibration(entry, n=3):
    out = []
    for s in range(n):
        args, kwargs = example_inputs(entry, batch=2, seq=12, left_pad=3, seed=100 + s)
        out.append({"input_ids": args[0], **kwargs})
    return out


def test_keep_removes_the_identity_block_first():
    entry = ZOO["llama"]
    model = entry.build()
    # make block 2 an identity: zero the output projections of both branches
    with torch.no_grad():
        model.model.layers[2].self_attn.o_proj.weight.zero_()
        model.model.layers[2].mlp.down_proj.weight.zero_()
    cm = routefx.compile(model, PruneLayers(keep=0.75), calibration=_calibration(entry))
    plan = cm.plan
    assert plan.pruned == [2]                                  # floor(0.25 * 3 + 0.5) = 1 block
    assert plan.block_influence[2] == pytest.approx(0.0, abs=1e-9)
    assert min(plan.block_influence[:2]) > 1e-3
    assert "block influence" in cm.report.passes[-1].notes[0]
    assert cm.report.plan["pruned"] == [2]


def test_keep_fraction_rounding_and_at_least_one_block():
    entry = ZOO["plain_resized"]                                # 4 blocks
    cal = _calibration(entry, 1)
    cal = [{"input_ids": b["input_ids"]} for b in cal]
    for keep, removed in [(1.0, 0), (0.75, 1), (0.5, 2), (0.3, 3), (0.01, 3)]:
        cm = routefx.compile(entry.build(), PruneLayers(keep=keep), calibration=cal)
        assert len(cm.plan.pruned) == removed, keep
        assert len(cm.ir.blocks) == 4 - removed


# ---- bad inputs --------------------------------------------------------------------------------------

@pytest.mark.parametrize("kw,match", [
    ({"keep": 0.0}, r"keep must be a fraction in \(0, 1\], got 0.0"),
    ({"keep": 1.5}, r"keep must be a fraction in \(0, 1\], got 1.5"),
    ({}, r"exactly one of layers=.* or keep="),
    ({"layers": [1], "keep": 0.5}, r"exactly one of layers=.* or keep="),
    ({"layers": []}, r"non-empty list of block indices"),
    ({"layers": [1, 1]}, r"lists a block twice"),
])
def test_bad_policy_values(kw, match):
    with pytest.raises(routefx.PolicyError, match=match):
        PruneLayers(**kw)


def test_bad_layer_index_and_pruning_everything():
    entry = ZOO["plain"]
    args, _ = example_inputs(entry)
    with pytest.raises(routefx.PolicyError, match=r"block 3 does not exist; the model has 3 blocks \(0..2\)"):
        routefx.compile(entry.build(), PruneLayers(layers=[0, 3]), example_inputs=args)
    with pytest.raises(routefx.PolicyError, match="would remove all 3 blocks; keep at least one"):
        routefx.compile(entry.build(), PruneLayers(layers=[0, 1, 2]), example_inputs=args)


def test_keep_without_calibration():
    with pytest.raises(routefx.CalibrationError, match=r"PruneLayers\(layers=None, keep=0.5\) needs calibration"):
        routefx.compile(ZOO["plain"].build(), PruneLayers(keep=0.5))


def test_policy_json_round_trip():
    p = PruneLayers(layers=[3, 1])
    assert routefx.policies.policy_from_json(p.to_json()) == p
    assert routefx.policies.policy_from_json(PruneLayers(keep=0.5).to_json()) == PruneLayers(keep=0.5)
