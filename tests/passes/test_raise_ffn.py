"""RaiseFFN: Before (dense FFN subgraphs) -> Expected (one routed_ffn per dense FFN, full range, same function)."""
import torch

from routefx.passes.raise_ffn import RaiseFFN
from tests.compare import assert_close_nonpad
from tests.passes.graphs import ROUTED, aten, captured, count, routed_ops, run
from tests.tolerances import EXACT_REWRITE
from tests.zoo import ZOO


def test_each_dense_ffn_becomes_one_full_range_routed_ffn():
    model, gm, args, kwargs = captured("plain")
    linears_before = count(gm, aten.linear.default)
    ir, reports = run(gm, [RaiseFFN()])
    widths = ZOO["plain"].expect.inter
    ops = routed_ops(gm)
    assert [op.args[9] for op in ops] == [[0, f] for f in widths]
    assert [b.ffn.routed for b in ir.blocks] == [[[0, f]] for f in widths]
    # each gated FFN had two products (fused gate-up, down): both are gone, attention's remain
    assert count(gm, aten.linear.default) == linears_before - 2 * len(widths)
    assert reports[0].rewrites == len(widths) and reports[0].dead_nodes_removed > 0
    with torch.no_grad():
        assert_close_nonpad(gm(*args, **kwargs), model(*args, **kwargs), None, EXACT_REWRITE)


def test_moe_ffns_are_misses_and_a_second_run_does_not_fire():
    _, gm, _, _ = captured("qwen2moe")
    _, reports = run(gm, [RaiseFFN(), RaiseFFN()])
    first, second = reports
    assert first.rewrites == 1 and [m["where"] for m in first.misses] == ["block 0 (model.layers.0.mlp)",
                                                                          "block 2 (model.layers.2.mlp)"]
    assert all("MoE FFN left as it is" in m["reason"] for m in first.misses)
    assert second.rewrites == 0 and count(gm, ROUTED) == 1
