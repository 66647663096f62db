"""The pass manager verifies the graph after every pass and names the pass that broke it."""
import pytest
import torch

import routefx
from routefx.compiler import pipeline
from routefx.passes.base import Pass, PassResult
from routefx.passes.manager import PassFailedError
from tests.zoo import ZOO, example_inputs


class _Corrupt(Pass):
    """Test-only: rewires the first FFN output to a value of the wrong shape."""

    name = "corrupt_graph"

    def run(self, gm, ctx):
        g = gm.graph
        op = next(n for n in g.nodes if n.target is torch.ops.routefx.routed_ffn.default)
        with g.inserting_after(op):
            bad = g.call_function(torch.ops.aten.slice.Tensor, (op, -1, 0, 3))
        op.replace_all_uses_with(bad)
        bad.update_arg(0, op)
        return PassResult(rewrites=1)


class _Dangling(Pass):
    """Test-only: leaves a node that uses a value defined after it."""

    name = "dangling_use"

    def run(self, gm, ctx):
        nodes = [n for n in gm.graph.nodes if n.op == "call_function"]
        nodes[0].update_arg(0, nodes[-1])
        return PassResult(rewrites=1)


@pytest.mark.parametrize("bad,match", [
    (_Corrupt, r"pass 'corrupt_graph', after raise_ffn failed: .*"),
    (_Dangling, r"pass 'dangling_use', after raise_ffn failed: .*"),
])
def test_a_corrupting_pass_is_named(monkeypatch, bad, match):
    original = pipeline.build_pipeline
    monkeypatch.setattr("routefx.compiler.compile.build_pipeline", lambda p: pipeline.Pipeline(original(p).passes + [bad()]))
    entry = ZOO["plain"]
    args, kwargs = example_inputs(entry)
    with pytest.raises(PassFailedError, match=match):
        routefx.compile(entry.build(), routefx.policies.Dense(), example_inputs=args, example_kwargs=kwargs)
