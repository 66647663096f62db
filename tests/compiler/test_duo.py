"""Duo routing: nested small/big/skip branches, routers and the compute budget."""
import pytest
import torch
import torch.nn.functional as F

import routefx
from routefx.ir.price import ALL_BIG, set_price_
from routefx.policies import Duo
from tests.compare import assert_close_nonpad
from tests.reference_ffn import ffn_inputs, neuron_subset, plan_router, routed_reference
from tests.tiny_lm import batches as text_batches
from tests.tiny_lm import trained_llama
from tests.tolerances import EXACT_REWRITE
from tests.zoo import DENSE, ZOO, example_inputs

BUDGET_TOL = 0.02


def _batches(entry, n, seed, batch=4, seq=16, pad=3):
    out = []
    for i in range(n):
        args, kwargs = example_inputs(entry, batch=batch, seq=seq, left_pad=pad, seed=seed + i)
        out.append({"input_ids": args[0], **kwargs})
    return out


def _reference(model, batch):
    kw = dict(batch)
    if hasattr(model, "config") and "attention_mask" in kw:
        kw["use_cache"] = False
    with torch.no_grad():
        return model(**kw)


@pytest.mark.parametrize("name", DENSE)
def test_budget_one_reproduces_dense(name):
    entry = ZOO[name]
    model = entry.build()
    router = ("static", "random", "local")[DENSE.index(name) % 3]
    cm = routefx.compile(model, Duo(budget=1.0, router=router, small="nested"), calibration=_batches(entry, 2, 10))
    batch = _batches(entry, 1, 99, batch=3, seq=11, pad=4)[0]
    assert_close_nonpad(cm(**batch), _reference(model, batch), batch.get("attention_mask"), EXACT_REWRITE)
    stats = cm.route_stats([batch])
    assert stats.budget == 1.0
    assert all(layer["mix"][2] == 1.0 for layer in stats.layers)


def _ffn_errors(model, cal, held, fraction=0.25, subsets=5):
    """Held-out output error of the importance-ordered top-k neurons vs random k-subsets, per layer, computed by
    the model's own `mlp` modules on their own inputs (tests/reference_ffn.py)."""
    cm = routefx.compile(model, Duo(budget=0.5, small_fraction=fraction, router="random"), calibration=cal)
    xs = ffn_inputs(model, list(cm.plan.layers), [b | {"use_cache": False} for b in held])
    out = []
    gen = torch.Generator().manual_seed(0)
    for key, lp in cm.plan.layers.items():
        mlp, x = model.get_submodule(key), xs[key]
        with torch.no_grad():
            y = mlp(x)

        def err(idx):
            with torch.no_grad(), neuron_subset(mlp, "down_proj", idx):
                return (mlp(x) - y).norm() / y.norm()

        rand = sum(err(torch.randperm(lp.F, generator=gen)[:lp.k]) for _ in range(subsets)) / subsets
        out.append((float(err(lp.perm[:lp.k])), float(rand)))
    return out


def test_importance_prefix_beats_random_subsets_on_a_trained_model():
    model = trained_llama()
    errs = _ffn_errors(model, text_batches(3, 8, 64, seed=100), text_batches(2, 8, 64, seed=300, split="held"))
    assert all(top < rnd for top, rnd in errs), errs


def test_permutation_alone_keeps_the_dense_function():
    entry = ZOO["gpt2"]
    model = entry.build()
    cm = routefx.compile(model, Duo(budget=0.5, router="random", small="nested"), calibration=_batches(entry, 2, 10))
    gm = cm.graph_module
    op = next(n for n in gm.graph.nodes if n.target is torch.ops.routefx.routed_ffn.default)
    lp = next(iter(cm.plan.layers.values()))
    assert sorted(lp.perm.tolist()) == list(range(lp.F)) and lp.perm.tolist() != list(range(lp.F))
    # force every token to the big branch: the permuted FFN must equal the original one
    set_price_(gm, ALL_BIG)
    batch = _batches(entry, 1, 50, batch=2, seq=9)[0]
    assert_close_nonpad(cm(**batch), _reference(model, batch), batch["attention_mask"], EXACT_REWRITE)
    assert op.args[9] == [0, 0, 0, lp.k, 0, lp.F]


@pytest.mark.parametrize("router", ["random", "local"])
@pytest.mark.parametrize("budget", [0.75, 0.5, 0.25])
def test_budget_is_met_with_mixed_routes(router, budget):
    entry = ZOO["plain_resized"]
    cal, held = _batches(entry, 4, 100, batch=6, seq=20), _batches(entry, 2, 200, batch=6, seq=20)
    model = entry.build()
    cm = routefx.compile(model, Duo(budget=budget, router=router, small="nested"), calibration=cal)
    ref_cal, ref_held = _reference_budget(model, cm.plan, cal), _reference_budget(model, cm.plan, held)
    on_cal, on_held = cm.route_stats(cal), cm.route_stats(held)
    assert abs(ref_cal["budget"] - budget) <= BUDGET_TOL, ref_cal
    # what routefx measures and reports equals the routing done here by the model's own modules
    report = cm.report.plan["budget"]
    assert report["target"] == budget and report["realised"] == pytest.approx(ref_cal["budget"], abs=1e-9)
    assert on_cal.budget == pytest.approx(ref_cal["budget"], abs=1e-9)
    assert on_held.budget == pytest.approx(ref_held["budget"], abs=1e-9)  # held-out: reported, not bounded
    assert on_held.tokens == sum(b["input_ids"].numel() for b in held)   # PlainLM: no padding
    mixed = sum(sum(f > 0.01 for f in mix) >= 2 for mix in ref_cal["mix"])
    assert mixed > len(ref_cal["mix"]) / 2, ref_cal
    # FLOPs per token with the realised routes, by closed form (PlainLM: d=36, 3 heads, V=89, S=20, gated FFNs
    # with widths 76, 52, 76, 76; a router is one [3, d] product per token)
    d, S, V, widths = 36, 20, 89, (76, 52, 76, 76)
    attention = 2 * d * 3 * d + 2 * d * d + 2 * 3 * (S + 1) / 2 * (2 * (d // 3))
    f = cm.report.flops_per_token["realised"]
    assert f["dense_calibration"] == pytest.approx(4 * attention + sum(6 * d * w for w in widths) + 2 * d * V)
    routed = sum(frac * 6 * d * w + 2 * d * 3 for frac, w in zip(ref_cal["fraction"], widths))
    assert f["calibration"] == pytest.approx(4 * attention + routed + 2 * d * V, rel=1e-9)


def _reference_budget(model, plan, batches):
    """Route PlainLM's FFNs per token with the plan's routers, λ and neuron order (tests/reference_ffn.py):
    the realised budget, and per layer the mix of routes and the compute fraction."""
    routes = {key: [] for key in plan.layers}
    ffns = {key: (plan_router(lp, plan.lam, routes[key]), lp.perm[:lp.k]) for key, lp in plan.layers.items()}
    with torch.no_grad(), routed_reference(model, ffns, down="b"):
        for b in batches:
            model(**b)
    mix, fraction = [], []
    for key, lp in plan.layers.items():
        r = torch.cat([x.reshape(-1) for x in routes[key]])
        mix.append((torch.bincount(r, minlength=3).double() / r.numel()).tolist())
        fraction.append(float(torch.tensor(lp.costs, dtype=torch.float64)[r].mean()))
    return {"budget": sum(fraction) / len(fraction), "mix": mix, "fraction": fraction}


def _kl(model, cm, held):
    tot, n = 0.0, 0
    for b in held:
        ref = _reference(model, b).logits
        out = cm(**b).logits
        keep = b["attention_mask"].bool()
        p, q = F.log_softmax(ref[keep].double(), -1), F.log_softmax(out[keep].double(), -1)
        tot += (p.exp() * (p - q)).sum().item()
        n += int(keep.sum())
    return tot / n


def test_local_router_is_closest_to_dense_at_equal_budget():
    """Trained tiny Llama (tests/tiny_lm.py), budget 0.5: KL(dense || routed) on held-out text."""
    model = trained_llama()
    cal = text_batches(6, 8, 64, seed=100, pad=5)
    held = text_batches(3, 8, 64, seed=200, split="held", pad=5)
    kl, realised = {}, {}
    for router in ("static", "random", "local"):
        cm = routefx.compile(model, Duo(budget=0.5, router=router, small="nested"), calibration=cal)
        realised[router] = cm.route_stats(cal).budget
        kl[router] = _kl(model, cm, held)
    assert all(abs(b - 0.5) <= BUDGET_TOL for b in realised.values()), realised
    assert kl["local"] < kl["static"] and kl["local"] < kl["random"], kl


def test_a_near_identity_layer_gets_less_compute():
    model = trained_llama()
    import copy
    model = copy.deepcopy(model)
    with torch.no_grad():
        model.model.layers[2].mlp.down_proj.weight.mul_(1e-3)
    cal = text_batches(4, 8, 64, seed=100, pad=5)
    cm = routefx.compile(model, Duo(budget=0.5, router="local", small="nested"), calibration=cal)
    fractions = [layer["fraction"] for layer in cm.route_stats(cal).layers]
    assert fractions[2] == min(fractions) and fractions[2] < 0.5 * max(fractions), fractions


def test_static_router_states_its_realised_budget():
    entry = ZOO["llama"]
    cm = routefx.compile(entry.build(), Duo(budget=0.4, router="static", small="nested"),
                         calibration=_batches(entry, 2, 10))
    b = cm.report.plan["budget"]
    # 3 layers, one branch each among costs {0, 26/104, 1}: the sums reachable near 3 x 0.4 = 1.2 are 1.0 and
    # 1.25; the nearest, 1.25 (skip + small + big), is the realised budget
    assert b["target"] == 0.4 and b["realised"] == pytest.approx(1.25 / 3, abs=1e-12)
    assert sorted(lp.static_route for lp in cm.plan.layers.values()) == [0, 1, 2]
    assert any("static routes: realised budget 0.417" in n for n in cm.report.notes)
    assert sorted(layer["mix"].index(1.0) for layer in b["layers"]) == [0, 1, 2]


# ---- bad inputs ---------------------------------------------------------------------------------------

@pytest.mark.parametrize("kw,match", [
    ({"budget": 0.0}, r"budget must be a compute fraction in \(0, 1\], got 0.0"),
    ({"budget": 1.2}, r"budget must be a compute fraction in \(0, 1\], got 1.2"),
    ({"small_fraction": 1.0}, r"small_fraction must be in \(0, 1\), got 1.0"),
    ({"small_fraction": 0}, r"small_fraction must be in \(0, 1\), got 0"),
    ({"router": "oracle"}, r"unknown router 'oracle'; supported: static, random, local, imitation, loss"),
    ({"layers": [-1]}, r"layers must be a non-empty list of block indices >= 0"),
])
def test_bad_policy_values(kw, match):
    with pytest.raises(routefx.PolicyError, match=match):
        Duo(**kw)


def test_bad_block_indices_and_missing_calibration():
    entry = ZOO["qwen2moe"]
    cal = _batches(entry, 1, 10)
    with pytest.raises(routefx.PolicyError, match=r"block 5 does not exist; the model has 3 blocks \(0..2\)"):
        routefx.compile(entry.build(), Duo(layers=[1, 5], small="nested"), calibration=cal)
    with pytest.raises(routefx.PolicyError, match=r"block 0 has a moe FFN; Duo routes dense FFNs"):
        routefx.compile(entry.build(), Duo(layers=[0], small="nested"), calibration=cal)
    with pytest.raises(routefx.CalibrationError, match=r"Duo\(budget=0.5.*needs calibration data"):
        routefx.compile(entry.build(), Duo(budget=0.5, router="random", small="nested"))


def test_duo_on_a_subset_of_layers_and_json():
    entry = ZOO["qwen2moe"]
    cm = routefx.compile(entry.build(), Duo(layers=[1], router="random", small="nested"),
                         calibration=_batches(entry, 2, 10))
    assert list(cm.plan.layers) == ["model.layers.1.mlp"]
    assert [layer["key"] for layer in cm.route_stats(_batches(entry, 1, 5)).layers] == ["model.layers.1.mlp"]
    p = Duo(budget=0.3, small_fraction=0.2, router="static", layers=[2, 0], seed=4)
    assert routefx.policies.policy_from_json(p.to_json()) == p
