"""InsertRouters: Before (routed_ffn with one full range, routes 0) -> Expected (skip/small/big ranges and a
router per token), checked against the model's own FFN modules routed by hooks (tests/passes/graphs.py)."""
import pytest
import torch

from routefx.ir.price import LAMBDA_ATTR
from routefx.passes.insert_routers import InsertRouters
from routefx.passes.manager import PassFailedError
from routefx.passes.raise_ffn import RaiseFFN
from tests.compare import assert_close_nonpad
from tests.passes.graphs import aten, captured, count, layer, plan, routed_ops, run
from tests.reference_ffn import routed_reference
from tests.tolerances import EXACT_REWRITE


def test_per_token_routers_and_a_static_layer():
    model, gm, args, kwargs = captured("plain_sandwich", batch=3, seq=9)
    g = torch.Generator().manual_seed(1)
    w, b = torch.randn(3, 36, generator=g), torch.randn(3, generator=g)
    lam = 0.7
    p = plan({"z.0.b": layer(76, 19, router="local", weight=w, bias=b), "z.2.b": layer(76, 19, static_route=1)})
    p.lam = lam
    _, reports = run(gm, [RaiseFFN(), InsertRouters()], p)
    assert [op.args[9] for op in routed_ops(gm)] == [[0, 0, 0, 19, 0, 76], [0, 76], [0, 0, 0, 19, 0, 76]]
    assert count(gm, aten.argmax.default) == 1 and float(getattr(gm, LAMBDA_ATTR)) == pytest.approx(lam)
    assert reports[1].rewrites == 2
    cost = torch.tensor([0.0, 19 / 76, 1.0])
    seen = []

    def router(x):
        r = (x @ w.T + b - lam * cost).argmax(-1)
        seen.append(r)
        return r

    with torch.no_grad(), routed_reference(model, {"z.0.b": (router, list(range(19))),
                                                   "z.2.b": (lambda x: torch.ones(x.shape[:-1], dtype=torch.long),
                                                             list(range(19)))}, down="b"):
        expected = model(*args, **kwargs)
    assert len(set(seen[0].flatten().tolist())) >= 2, "the test router should mix routes"
    with torch.no_grad():
        assert_close_nonpad(gm(*args, **kwargs), expected, None, EXACT_REWRITE)


def test_a_layer_without_router_or_static_route_breaks_the_contract():
    _, gm, _, _ = captured("plain")
    with pytest.raises(PassFailedError, match=r"contract broken \(requires\): layer\(s\) \['z.1.b'\] have neither "
                                              r"a static route nor router weights"):
        run(gm, [RaiseFFN(), InsertRouters()], plan({"z.1.b": layer(76, 19, router="local")}))


def test_without_layers_nothing_is_inserted():
    _, gm, _, _ = captured("plain")
    _, reports = run(gm, [RaiseFFN(), InsertRouters()], plan())
    assert reports[1].rewrites == 0 and not hasattr(gm, LAMBDA_ATTR)
