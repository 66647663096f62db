"""PermuteNeurons: Before (routed_ffn reading the user's weights) -> Expected (permuted copies, same function)."""
import pytest
import torch

from routefx.passes.manager import PassFailedError
from routefx.passes.permute_neurons import PermuteNeurons
from routefx.passes.raise_ffn import RaiseFFN
from tests.compare import assert_close_nonpad
from tests.passes.graphs import captured, layer, plan, routed_ops, run
from tests.tolerances import EXACT_REWRITE


def _attr(gm, n):
    return gm.get_parameter(n.target) if n.target in dict(gm.named_parameters()) else gm.get_buffer(n.target)


def test_weights_are_permuted_copies_and_the_function_is_kept():
    model, gm, args, kwargs = captured("plain_sandwich")          # plain MLP with biases: up, b_up, down
    perm = torch.randperm(76, generator=torch.Generator().manual_seed(0))
    run(gm, [RaiseFFN(), PermuteNeurons()], plan({"z.1.b": layer(76, 19, perm=perm)}))
    op = routed_ops(gm)[1]
    ffn = model.z[1].b
    assert torch.equal(_attr(gm, op.args[3]), ffn.a.weight[perm])           # up rows
    assert torch.equal(_attr(gm, op.args[6]), ffn.a.bias[perm])             # b_up
    assert torch.equal(_attr(gm, op.args[5]), ffn.b.weight[:, perm])        # down columns
    assert torch.equal(_attr(gm, op.args[8]), ffn.b.bias)                   # b_down is not permuted
    assert all(a.op != "get_attr" or a.target.startswith("z.") for a in routed_ops(gm)[0].args[3:9]
               if isinstance(a, torch.fx.Node))                              # unplanned layer 0: user's weights
    with torch.no_grad():
        assert_close_nonpad(gm(*args, **kwargs), model(*args, **kwargs), None, EXACT_REWRITE)


def test_a_layer_without_perm_is_left_alone():
    _, gm, _, _ = captured("plain")
    _, reports = run(gm, [RaiseFFN(), PermuteNeurons()], plan({"z.0.b": layer(76, 19)}))
    assert reports[1].rewrites == 0


def test_a_perm_that_is_not_a_permutation_breaks_the_contract():
    _, gm, _, _ = captured("plain")
    bad = torch.zeros(76, dtype=torch.long)
    with pytest.raises(PassFailedError, match=r"pass 'permute_neurons', after raise_ffn: contract broken "
                                              r"\(requires\): layer\(s\) \['z.0.b'\] have a perm that is not a permutation"):
        run(gm, [RaiseFFN(), PermuteNeurons()], plan({"z.0.b": layer(76, 19, perm=bad)}))
