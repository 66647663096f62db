"""Routing-aware fine-tune of separate small branches (routefx/calibrate/finetune.py): it lowers the LM loss
under random routes, leaves the dense model (every route big) exactly as the original Hugging Face model computes
it, keeps the plan and the graph in step (a model rebuilt from the plan is the fine-tuned one) and the budget met;
nested small branches are refused."""
import pytest
import torch

import routefx
from routefx.analysis.forced import ForcedRoutes
from routefx.analysis.oracle import IGNORE, shifted_labels, token_losses
from routefx.calibrate.finetune import finetune_compiled_
from routefx.errors import PolicyError
from routefx.policies import Duo
from tests.tiny_lm import batches as text_batches
from tests.tiny_lm import trained_llama
from tests.tolerances import EXACT_REWRITE

BUDGET_TOL = 0.02


def _routed_loss(forced, batches, routes):
    tot, n = 0.0, 0
    for b, r in zip(batches, routes):
        lab = shifted_labels(b)
        tot += float(token_losses(forced(b, r), lab)[lab != IGNORE].sum())
        n += int((lab != IGNORE).sum())
    return tot / n


def test_finetune_lowers_routed_loss_keeps_dense_and_plan():
    torch.manual_seed(0)
    model = trained_llama()
    cal = text_batches(2, 6, 48, seed=100)
    cm = routefx.compile(model, Duo(budget=0.5, router="local", small="separate"), calibration=cal)
    forced, fb = ForcedRoutes.from_compiled(cm, cal)          # shares the graph's tensors
    gen = torch.Generator().manual_seed(7)
    routes = [torch.randint(0, 3, (forced.num_layers, *b["input_ids"].shape), generator=gen) for b in fb]
    before = _routed_loss(forced, fb, routes)
    small_before = cm.plan.layers[forced.keys[0]].small_down.clone()

    info = finetune_compiled_(cm, cal, steps=40, lr=3e-3, routes="random", progress=False)

    assert _routed_loss(forced, fb, routes) < before
    assert info["last_loss"] < info["first_loss"]
    assert not torch.equal(cm.plan.layers[forced.keys[0]].small_down, small_before)
    with torch.no_grad():
        for b in fb:                                          # big branches frozen: all-big is the HF model
            ref = model(input_ids=b["input_ids"], attention_mask=b["attention_mask"]).logits
            got = forced(b, forced.all_big(b["input_ids"].shape))
            assert (got - ref).abs().max() <= EXACT_REWRITE
    rebuilt = routefx.compile(model, cm.plan)                # the plan holds the fine-tuned branches
    for b in cal:
        assert (rebuilt(**b).logits - cm(**b).logits).abs().max() <= EXACT_REWRITE
    assert abs(cm.route_stats(cal).budget - 0.5) <= BUDGET_TOL
    with pytest.raises(PolicyError, match="routes='bogus'; supported: random, router"):
        finetune_compiled_(cm, cal, steps=1, routes="bogus", progress=False)


def test_finetune_refuses_nested_small_branches():
    model = trained_llama()
    cal = text_batches(1, 4, 32, seed=100)
    cm = routefx.compile(model, Duo(budget=0.5, router="local", small="nested"), calibration=cal)
    with pytest.raises(PolicyError, match="nested.*separate"):
        finetune_compiled_(cm, cal, steps=1, progress=False)


def test_on_policy_finetune_lowers_the_loss_under_the_routers_own_routes():
    from bench.quality import router_routes
    model = trained_llama()
    cal = text_batches(2, 6, 48, seed=100)
    cm = routefx.compile(model, Duo(budget=0.5, router="local", small="separate"), calibration=cal)
    forced, fb = ForcedRoutes.from_compiled(cm, cal)
    own = router_routes(cm, cal)                              # [L, B, S] per batch, the routes it deploys
    before = _routed_loss(forced, fb, own)
    info = finetune_compiled_(cm, cal, steps=30, lr=3e-3, routes="router", progress=False)
    assert info["routes"] == "router"
    assert _routed_loss(forced, fb, own) < before
