"""The inductor backend (torch.compile of the rewritten graph) and the auto backend, on the hand-built routed
stack (skip, K=2 with gates, overlapping ranges, T=1) and on constant routes, against eager."""
from __future__ import annotations

import functools

import pytest
import torch

import routefx
from routefx.backends import auto, get_backend, inductor
from routefx.ir import capture
from tests.backends.routed_models import RoutedStack, stack_input
from tests.backends.test_onnx_routed import _StaticRoutes
from tests.tolerances import INDUCTOR_VS_EAGER


@functools.lru_cache(maxsize=None)
def _stack():
    x = stack_input(2, 5)
    gm = capture(RoutedStack().eval(), (x,))
    return gm, inductor.prepare(gm, {"x": x})


def _max_err(a, b) -> float:
    flat_a, flat_b = torch.utils._pytree.tree_leaves(a), torch.utils._pytree.tree_leaves(b)
    assert len(flat_a) == len(flat_b)
    return max((p.double() - q.double()).abs().max().item() for p, q in zip(flat_a, flat_b))


@pytest.mark.parametrize("batch,seq", [(3, 11), (1, 1)])
def test_routed_stack_equals_eager(batch, seq):
    gm, run = _stack()
    assert run.static_ffns == 0  # every layer's routes come from its router
    # the compiled copy runs every other layer on pre-packed weights; graph_module keeps the plain op
    assert len(run.packed_ffns) == (len(run.graph_module.graph.find_nodes(
        op="call_function", target=torch.ops.routefx.routed_ffn.default))
        if torch.backends.mkldnn.is_available() else 0)
    x = stack_input(batch, seq, seed=batch * 100 + seq)
    with torch.no_grad():
        ref = gm(x)
    out = run(x=x)
    for r, r_ref in zip(out[2], ref[2]):
        assert torch.equal(r, r_ref)
    assert _max_err(out, ref) <= INDUCTOR_VS_EAGER


def test_static_routes_become_plain_ffns_and_auto_keeps_the_fastest():
    x = stack_input(2, 3)
    gm = capture(_StaticRoutes().eval(), (), {"x": x})  # by keyword, as routefx.compile captures
    lowered, n = inductor.lower_static(gm)
    assert n == 3
    assert not any(node.target is torch.ops.routefx.routed_ffn.default for node in lowered.graph.nodes)
    run = auto.prepare(gm, {"x": x}, rounds=2)
    assert run.chosen in auto.CANDIDATES and set(run.ms) == set(auto.CANDIDATES) and not run.skipped
    assert run.chosen == min(run.ms, key=run.ms.get)
    assert run.notes[0].startswith(f"backend auto chose {run.chosen}")
    x = stack_input(3, 7, seed=4)
    with torch.no_grad():
        ref = gm(x=x)
    assert _max_err(run(x=x), ref) <= INDUCTOR_VS_EAGER
    compiled = inductor.prepare(gm, {"x": stack_input(2, 3)})  # the inductor candidate, whichever auto kept
    assert _max_err(compiled(x=x), ref) <= INDUCTOR_VS_EAGER


def test_backends_are_registered():
    assert get_backend("inductor") is inductor and get_backend("auto") is auto
    assert {"inductor", "auto"} <= set(routefx.backends.BACKENDS)


def _duo_llama(backend: str):
    from tests.compare import assert_close_nonpad, graph_kwargs
    from tests.zoo import ZOO, example_inputs

    entry = ZOO["llama"]
    cal = [{"input_ids": a[0], **k} for a, k in (example_inputs(entry, batch=3, seq=12, left_pad=2, seed=40 + i)
                                                  for i in range(2))]
    cm = routefx.compile(entry.build(), routefx.policies.Duo(budget=0.5, router="random", small="nested"),
                         calibration=cal,
                         backend=backend)
    args, kwargs = example_inputs(entry, batch=3, seq=13, left_pad=4, seed=5)
    out = cm(*args, **kwargs)
    gm = cm.graph_module
    with torch.no_grad():
        ref = gm(**graph_kwargs(gm, args, kwargs))
    assert_close_nonpad(out, ref, kwargs.get("attention_mask"), INDUCTOR_VS_EAGER)
    return cm


def test_duo_inductor_equals_eager():
    cm = _duo_llama("inductor")
    assert cm.report.backend == "inductor"


def test_compile_auto_reports_its_choice(monkeypatch):
    monkeypatch.setattr(auto, "CANDIDATES", ("eager", "onnx"))  # inductor's own compile is tested above
    cm = _duo_llama("auto")
    chosen = [n for n in cm.report.notes if n.startswith("backend auto chose ")]
    assert len(chosen) == 1 and chosen[0].split()[3] in ("eager", "onnx"), cm.report.notes
