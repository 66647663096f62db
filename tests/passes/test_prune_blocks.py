"""PruneBlocks: Before (L blocks) -> Expected (the planned blocks gone, their nodes removed, the rest intact)."""
import pytest

from routefx.passes.manager import PassFailedError
from routefx.passes.prune_blocks import PruneBlocks
from routefx.passes.raise_ffn import RaiseFFN
from tests.passes.graphs import aten, captured, count, plan, routed_ops, run


def test_pruned_block_and_its_compute_are_gone():
    _, gm, _, _ = captured("plain_resized")
    sdpa = count(gm, aten.scaled_dot_product_attention.default)
    ir, reports = run(gm, [RaiseFFN(), PruneBlocks()], plan(pruned=[1]))
    assert [b.path for b in ir.blocks] == ["z.0", "z.2", "z.3"]
    assert [op.args[9] for op in routed_ops(gm)] == [[0, 76], [0, 76], [0, 76]]   # width 52 was block 1
    assert count(gm, aten.scaled_dot_product_attention.default) == sdpa - 1
    assert reports[1].rewrites == 1 and reports[1].notes == ["removed block 1 (z.1)"]


def test_an_empty_prune_plan_changes_nothing():
    _, gm, _, _ = captured("plain")
    run(gm, [RaiseFFN()])
    nodes = [(n.op, str(n.target)) for n in gm.graph.nodes]
    _, reports = run(gm, [PruneBlocks()], plan())
    assert reports[0].rewrites == 0 and [(n.op, str(n.target)) for n in gm.graph.nodes] == nodes


def test_a_block_that_does_not_exist_breaks_the_contract():
    _, gm, _, _ = captured("plain")
    with pytest.raises(PassFailedError, match=r"pass 'prune_blocks', the first pass: contract broken \(requires\): "
                                              r"planned block\(s\) \[7\] are not among the 3 blocks"):
        run(gm, [PruneBlocks()], plan(pruned=[7]))
