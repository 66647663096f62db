"""Oracle routing (routefx/analysis/oracle.py) against exhaustive search, on a 3-layer Llama where tokens do not
interact (every token is its own length-1 sequence), with the routed model built from the model's own modules
(tests/reference_ffn.py) so the expected losses never come from routefx's FFN code."""
import itertools

import pytest
import torch
import torch.nn.functional as F

import routefx
from routefx.analysis.forced import ForcedRoutes
from routefx.analysis.oracle import oracle_routes
from routefx.policies import Duo
from tests.reference_ffn import routed_reference
from tests.tolerances import EXACT_REWRITE
from tests.zoo import ZOO


@pytest.fixture(scope="module")
def setup():
    entry = ZOO["llama"]
    torch.manual_seed(0)
    model = entry.build()
    g = torch.Generator().manual_seed(3)
    cal = [{"input_ids": torch.randint(1, entry.vocab, (4, 12), generator=g)} for _ in range(2)]
    cm = routefx.compile(model, Duo(budget=0.5, router="random", small="nested"), calibration=cal)
    ids = torch.randint(1, entry.vocab, (40, 1), generator=g)                  # 40 tokens, each alone
    labels = torch.randint(1, entry.vocab, (40, 1), generator=g)
    forced, (batch,) = ForcedRoutes.from_compiled(cm, [{"input_ids": ids}])
    return model, cm, forced, batch, labels


def _exhaustive(model, plan, ids, labels):
    """{assignment (r0, r1, r2): per-token loss [N]} over all 27 assignments, by hooks on the model's MLPs."""
    keys = list(plan.layers)
    out = {}
    for assign in itertools.product(range(3), repeat=len(keys)):
        ffns = {k: (lambda x, r=r: torch.full(x.shape[:-1], r), plan.layers[k].perm[:plan.layers[k].k])
                for k, r in zip(keys, assign)}
        with torch.no_grad(), routed_reference(model, ffns, down="down_proj"):
            logits = model(input_ids=ids, use_cache=False).logits
        out[assign] = F.cross_entropy(logits[:, 0].double(), labels[:, 0], reduction="none")
    return out


def _cost(plan, assign):
    return sum(lp.costs[r] for lp, r in zip(plan.layers.values(), assign))


@pytest.mark.parametrize("mode", ["eps", "budget"])
def test_full_beam_equals_exhaustive_search(setup, mode):
    model, cm, forced, batch, labels = setup
    table = _exhaustive(model, cm.plan, batch["input_ids"], labels)
    dense = table[(2, 2, 2)]
    if mode == "eps":
        eps = float(torch.quantile((torch.stack(list(table.values())) - dense).clamp_min(0), 0.4))  # some meet it
        res = oracle_routes(forced, batch, labels, eps=eps, beam=9)
    else:
        res = oracle_routes(forced, batch, labels, budget=0.45, beam=9)
    assert torch.allclose(res.dense_loss[:, 0], dense, atol=EXACT_REWRITE)
    chosen = []
    for t in range(len(dense)):
        if mode == "eps":
            ok = [a for a, l in table.items() if l[t] <= dense[t] + eps]
            best = min(ok, key=lambda a: (round(_cost(cm.plan, a), 9), float(table[a][t])))
        else:
            ok = [a for a, l in table.items() if _cost(cm.plan, a) <= 0.45 * 3 + 1e-9]
            best = min(ok, key=lambda a: float(table[a][t]))
        chosen.append(best)
        assert tuple(res.routes[:, t, 0].tolist()) == best, t
        assert float(res.loss[t, 0]) == pytest.approx(float(table[best][t]), abs=EXACT_REWRITE)
    assert len(set(chosen)) > 3                                   # the answer depends on the token
    assert res.violations == 0.0


def test_greedy_beam_is_feasible_and_never_cheaper_than_exhaustive(setup):
    model, cm, forced, batch, labels = setup
    table = _exhaustive(model, cm.plan, batch["input_ids"], labels)
    dense = table[(2, 2, 2)]
    eps = 0.05
    full = oracle_routes(forced, batch, labels, eps=eps, beam=9)
    for beam in (1, 2):
        res = oracle_routes(forced, batch, labels, eps=eps, beam=beam)
        assert bool((res.loss[:, 0] <= dense + eps + EXACT_REWRITE).all())
        assert bool((res.cost >= full.cost - 1e-9).all())
    assert float(full.cost.mean()) < 1.0


def test_oracle_needs_one_bound(setup):
    _, _, forced, batch, labels = setup
    with pytest.raises(routefx.PolicyError, match=r"exactly one of eps= or budget=; got eps=None, budget=None"):
        oracle_routes(forced, batch, labels)


def test_forcing_the_routers_own_routes_reproduces_the_compiled_model(setup):
    from routefx.calibrate.record import run_recording
    from routefx.analysis.forced import routed_layers
    _, cm, forced, batch, _ = setup
    g = torch.Generator().manual_seed(5)
    batch = {**batch, "input_ids": torch.randint(1, 101, (3, 9), generator=g)}   # tokens interact here
    gm = cm.graph_module
    nodes = [n for _, n in routed_layers(gm, cm.ir)]
    vals = run_recording(gm, batch, [n.args[1] for n in nodes])
    own = torch.stack([vals[n.args[1]][..., 0] for n in nodes])                   # [L, B, S]
    assert len(set(own.reshape(-1).tolist())) > 1                                  # mixed routes
    assert torch.allclose(forced(batch, own), cm(**batch).logits, atol=EXACT_REWRITE)
    other = (own + 1) % 3
    assert not torch.allclose(forced(batch, other), cm(**batch).logits, atol=EXACT_REWRITE)
