"""One plan for prefill, decode and the model's own graph: the cached steps of a rewritten model compute what the
whole-sequence compiled model computes; routing leaves every cache entry in place; pruned layers have none."""
import os

import pytest
import torch

import routefx
from routefx.compiler import compile as driver
from routefx.generate import graphs as graphs_module
from routefx.generate.graphs import generation_graphs
from routefx.generate.loop import Stepper
from routefx.policies import Dense, Duo, PruneLayers
from tests.compare import assert_close_nonpad
from tests.tolerances import EXACT_REWRITE, ONNX_VS_EAGER, TRITON_VS_EAGER
from tests.zoo import ZOO, example_inputs


def _cal(entry, n=2):
    out = []
    for i in range(n):
        args, kwargs = example_inputs(entry, batch=4, seq=12, left_pad=3, seed=10 + i)
        out.append({"input_ids": args[0], **kwargs})
    return out


def _prompt(entry):
    args, kwargs = example_inputs(entry, batch=2, seq=6, left_pad=2, seed=4)
    return args[0], kwargs["attention_mask"]


def _steps_match_whole_sequence(cm, ids, mask, tol, steps=3):
    """Greedy steps through the cache; at each, the last logits equal the compiled model on the whole sequence."""
    st = Stepper(cm, mask)
    logits, seq = st.prefill(ids), ids
    for _ in range(steps):
        whole = cm(input_ids=seq, attention_mask=st.mask).logits[:, -1]
        assert_close_nonpad(logits, whole, None, tol)
        nxt = whole.argmax(-1)[:, None]
        seq = torch.cat([seq, nxt], dim=1)
        logits = st.decode(nxt)
    return st


@pytest.fixture(scope="module")
def duo():
    """A Duo-routed llama (eager) with its generation graphs, and how often calibration ran for all of it."""
    calls = []
    real = driver.calibrate
    with pytest.MonkeyPatch.context() as mp:
        for owner in (driver, graphs_module):
            mp.setattr(owner, "calibrate", lambda *a, **k: calls.append(1) or real(*a, **k))
        entry = ZOO["llama"]
        model = entry.build()
        cm = routefx.compile(model, Duo(budget=0.5, router="local", small="nested"), calibration=_cal(entry))
        plan = cm.plan
        generation_graphs(cm)
    assert cm.plan is plan
    return model, cm, calls


def test_duo_calibrates_once_and_decode_matches_whole_sequence(duo):
    model, cm, calls = duo
    st = _steps_match_whole_sequence(cm, *_prompt(ZOO["llama"]), EXACT_REWRITE)
    assert len(calls) == 1
    g = generation_graphs(cm)
    assert g.plan is cm.plan and g.kept == [0, 1, 2]
    for graph in (g.prefill, g.decode):              # the same rewrite as the whole-sequence graph
        routed = [n for n in graph.gm.graph.nodes if n.target is torch.ops.routefx.routed_ffn.default]
        assert len(routed) == 3
    assert [tuple(t.shape) for t in st.past] == [(2, 2, 6 + 3, 12)] * 6   # every layer keeps its K and V


def test_duo_plan_on_onnx(duo):
    """The plan, given to an ONNX compile: no calibration; the ONNX decode steps match its whole-sequence graph."""
    model, cm, _ = duo
    onnx = routefx.compile(model, cm.plan, backend="onnx")
    _steps_match_whole_sequence(onnx, *_prompt(ZOO["llama"]), ONNX_VS_EAGER)


@pytest.mark.skipif(os.environ.get("TRITON_INTERPRET", "0") in ("", "0"),
                    reason="TRITON_INTERPRET is off (CUDA present): the CPU interpreter tests run where CUDA is hidden")
def test_duo_plan_on_triton_under_the_interpreter(duo):
    """The plan on backend "triton" (CPU, Triton's interpreter): its prefill and decode graphs lower like any
    other (paired gate/up weights, router reductions); the decode steps match its whole-sequence graph and greedy
    generation equals the eager model's."""
    model, cm, _ = duo
    tri = routefx.compile(model, cm.plan, backend="triton")
    ids, mask = _prompt(ZOO["llama"])
    _steps_match_whole_sequence(tri, ids, mask, TRITON_VS_EAGER)
    assert generation_graphs(tri).decode.run.stats.triton_ops == 3
    assert torch.equal(tri.generate(ids, mask, max_new_tokens=4), cm.generate(ids, mask, max_new_tokens=4))


def test_routing_leaves_the_cache_untouched(duo):
    """Layer 0's K/V come before any routed FFN: identical under Duo and Dense."""
    model, cm, _ = duo
    ids, mask = _prompt(ZOO["llama"])
    a, b = Stepper(cm, mask), Stepper(routefx.compile(model, Dense()), mask)
    a.prefill(ids), b.prefill(ids)
    assert torch.equal(a.past[0], b.past[0]) and torch.equal(a.past[1], b.past[1])
    assert (a.past[2] - b.past[2]).abs().max() > 0   # layer 1's input went through a routed FFN


def test_pruned_layer_has_no_cache_entry(backend="eager"):
    entry = ZOO["llama"]
    cm = routefx.compile(entry.build(), PruneLayers(layers=[1]), backend=backend)
    g = generation_graphs(cm)
    assert g.kept == [0, 2]
    inputs = [n.target for n in g.decode.gm.graph.nodes if n.op == "placeholder"]
    assert [n for n in inputs if n.startswith("past_")] == ["past_key_0", "past_value_0", "past_key_2",
                                                           "past_value_2"]
    assert len(g.prefill.ir.blocks) == len(g.decode.ir.blocks) == 2
    ids, mask = _prompt(entry)
    st = _steps_match_whole_sequence(cm, ids, mask, EXACT_REWRITE if backend == "eager" else ONNX_VS_EAGER)
    assert len(st.past) == 4
