"""Cleanup: Before (a graph with dead nodes) -> Expected (the dead ones gone, observable ones kept)."""
import torch
from torch import fx

from routefx.passes.base import PassContext
from routefx.passes.cleanup import Cleanup

aten = torch.ops.aten


def _graph():
    """x -> relu -> output, plus: a dead pure chain, a dead in-place write into a temporary, an in-place write
    into the input, an in-place write into a temporary that is read afterwards, and an assertion."""
    g = fx.Graph()
    x = g.placeholder("x")
    live = g.call_function(aten.relu.default, (x,))
    dead = g.call_function(aten.mul.Tensor, (g.call_function(aten.exp.default, (x,)), 2.0))
    tmp = g.call_function(aten.zeros_like.default, (x,))
    g.call_function(aten.add_.Tensor, (g.call_function(aten.view.default, (tmp, [-1])), 1.0))  # dead write
    g.call_function(aten.mul_.Tensor, (x, 3.0))                                                # into an input
    tmp2 = g.call_function(aten.clone.default, (live,))
    g.call_function(aten.add_.Tensor, (tmp2, 1.0))                                             # read below
    out = g.call_function(aten.sub.Tensor, (tmp2, live))
    g.call_function(aten._assert_async.msg, (g.call_function(aten.any.default, (x,)), "x"))
    g.output((live, out))
    del dead
    return fx.GraphModule(torch.nn.Module(), g)


def test_dead_nodes_go_and_observable_ones_stay():
    gm = _graph()
    res = Cleanup().run(gm, PassContext(ir=None))
    kept = [str(n.target) for n in gm.graph.nodes if n.op == "call_function"]
    assert kept == ["aten.relu.default", "aten.mul_.Tensor", "aten.clone.default", "aten.add_.Tensor",
                    "aten.sub.Tensor", "aten.any.default", "aten._assert_async.msg"]
    assert res.rewrites == 5                                   # exp, mul, zeros_like, view, add_ into it
    assert Cleanup().ensures(gm, PassContext(ir=None), None) is None
    assert Cleanup().run(gm, PassContext(ir=None)).rewrites == 0


def test_ensures_names_what_was_left():
    gm = _graph()
    msg = Cleanup().ensures(gm, PassContext(ir=None), None)
    assert msg == "unused pure nodes remain: ['mul_tensor', 'add__tensor']"
