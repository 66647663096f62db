"""MoEfyFFN (Before: a dense routed_ffn; Expected: E expert ranges chosen by a router) and MoEfy's two fits,
balanced k-means and the expert router, against planted structure."""
import pytest
import torch

from routefx.calibrate.moefy_cluster import balanced_assign, balanced_kmeans, fit_expert_router, top_k_targets
from routefx.passes.manager import PassFailedError
from routefx.passes.moefy import MoEfyFFN
from routefx.passes.permute_neurons import PermuteNeurons
from routefx.passes.raise_ffn import RaiseFFN
from tests.compare import assert_close_nonpad
from tests.passes.graphs import captured, layer, plan, routed_ops, run
from tests.reference_ffn import neuron_subset
from tests.tolerances import EXACT_REWRITE


def _moefy_plan(key, F, E, perm, bias, top_k):
    p = plan({key: layer(F, F // E, perm=perm, router="moefy", weight=torch.zeros(E, 36), bias=bias)})
    p.calibration["moefy"] = {"experts": E, "rule": None, "top_k": {key: top_k}}
    return p


def test_the_chosen_experts_compute_the_ffn_on_their_neurons_and_the_down_bias_is_added_once():
    # plain MLP with biases (up, b_up, down, b_down); a router that always ranks experts 2 > 0 > 3 > 1
    model, gm, args, kwargs = captured("plain_sandwich")
    F, E = 76, 4
    perm = torch.randperm(F, generator=torch.Generator().manual_seed(3))
    p = _moefy_plan("z.1.b", F, E, perm, torch.tensor([2.0, 0.0, -1.0, 5.0]), top_k=2)
    _, reports = run(gm, [RaiseFFN(), PermuteNeurons(), MoEfyFFN()], p)
    assert reports[2].rewrites == 1
    op = routed_ops(gm)[1]
    assert op.args[9] == [0, 19, 19, 38, 38, 57, 57, 76] and op.args[2] is None and op.args[8] is None
    chosen = torch.cat([perm[3 * 19:4 * 19], perm[0:19]])           # experts 3 and 0 as neuron sets of the user's FFN
    with torch.no_grad(), neuron_subset(model.z[1].b, "b", chosen):
        ref = model(*args, **kwargs)
    with torch.no_grad():
        assert_close_nonpad(gm(*args, **kwargs), ref, None, EXACT_REWRITE)


def test_a_plan_without_top_k_breaks_the_contract():
    _, gm, _, _ = captured("plain")
    p = _moefy_plan("z.0.b", 76, 4, torch.arange(76), torch.zeros(4), top_k=2)
    p.calibration["moefy"]["top_k"] = {}
    with pytest.raises(PassFailedError, match=r"pass 'moefy'.*contract broken \(requires\): layer z.0.b has no valid "
                                              r"expert router or top-k"):
        run(gm, [RaiseFFN(), PermuteNeurons(), MoEfyFFN()], p)


def test_balanced_kmeans_recovers_planted_co_activation_groups():
    # 48 neurons in 6 planted groups of 8; each group fires on its own random subset of 200 tokens
    gen = torch.Generator().manual_seed(0)
    group = torch.randperm(48, generator=gen) % 6                                   # [F] true group
    fires = torch.rand(6, 200, generator=gen) < 0.3                                 # [groups, N]
    features = fires[group].double() * (0.5 + torch.rand(48, 200, generator=gen, dtype=torch.float64))
    assign = balanced_kmeans(features, 6, torch.Generator().manual_seed(1))
    assert torch.bincount(assign, minlength=6).tolist() == [8] * 6                  # balanced
    pairs = {(int(a), int(g)) for a, g in zip(assign, group)}
    assert len(pairs) == 6                                                          # a bijection: groups recovered


def test_balanced_assign_fills_every_cluster_to_capacity_even_when_all_prefer_one():
    scores = torch.tensor([[9.0, 1.0, 0.0]] * 6)
    assert torch.bincount(balanced_assign(scores, 2), minlength=3).tolist() == [2, 2, 2]


def test_the_router_learns_a_linearly_separable_labelling():
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(400, 10, generator=gen) * 3 + 1
    mass = torch.softmax(x[:, :4] * 2, -1).double()                 # [N, E=4] the top expert is argmax of x[:, :4]
    w, b = fit_expert_router(x, top_k_targets(mass, 1), steps=200)
    acc = float(((x @ w.T + b).argmax(-1) == mass.argmax(-1)).double().mean())
    assert acc > 0.9                                                # chance is 0.25
