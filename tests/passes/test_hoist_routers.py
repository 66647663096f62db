"""HoistRouters (Duo(hoist=True, small="nested")): each routed layer but the first picks its routes from the previous routed
layer's FFN input, with a router fitted on that input; the budget is still met; eager and ONNX agree; with
hoist off the pass is not in the pipeline and changes nothing when run."""
import functools

import pytest
import torch

import routefx
from routefx.compiler.pipeline import build_pipeline
from routefx.errors import PolicyError
from routefx.ir import graph_utils as gu
from routefx.ir import recognize
from routefx.passes.base import PassContext
from routefx.passes.hoist_routers import HoistRouters
from routefx.policies import Duo
from tests.compare import assert_close_nonpad, graph_kwargs
from tests.reference_ffn import plan_router, routed_reference
from tests.tolerances import EXACT_REWRITE, ONNX_VS_EAGER
from tests.zoo import ZOO, example_inputs

BUDGET_TOL = 0.02
aten = torch.ops.aten


def _batches(n, seed, batch=6, seq=20):
    out = []
    for i in range(n):
        args, kwargs = example_inputs(ZOO["plain_resized"], batch=batch, seq=seq, seed=seed + i)
        out.append({"input_ids": args[0], **kwargs})
    return out


@functools.lru_cache(maxsize=None)
def _compiled(hoist: bool):
    model = ZOO["plain_resized"].build()
    cm = routefx.compile(model, Duo(budget=0.5, router="local", hoist=hoist, small="nested"),
                         calibration=_batches(4, 100))
    return model, cm


def _routers(gm):
    """{routed_ffn node: the node its router's linear product reads}, in graph order (InsertRouters' form:
    routes = argmax(linear(x, W, b) - price))."""
    out = {}
    for op in (n for n in gm.graph.nodes if gu.is_routed(n)):
        routes = op.args[1]
        assert routes.target is aten.argmax.default and routes.args[0].target is aten.sub.Tensor
        lin = routes.args[0].args[0]
        assert lin.target is aten.linear.default
        out[op] = lin.args[0]  # an fp32 router of a low-precision FFN reads x.to(fp32): that cast node
    return out


def test_hoisted_router_reads_the_previous_layers_ffn_input_and_runs_before_it():
    _, cm = _compiled(True)
    gm = cm.graph_module
    order = {n: i for i, n in enumerate(gm.graph.nodes)}
    routers = _routers(gm)
    ops = list(routers)
    assert len(ops) == 4
    assert routers[ops[0]] is ops[0].args[0]                  # the first routed layer keeps its local router
    for prev, op in zip(ops, ops[1:]):
        assert routers[op] is prev.args[0]                    # [..., d] FFN input of the previous routed layer
        assert order[op.args[1]] < order[prev]                # routes ready before the previous layer runs
    (rep,) = [p for p in cm.report.passes if p.name == "hoist_routers"]
    assert rep.rewrites == 3 and rep.misses == []


def test_hoisted_routing_equals_the_model_routed_by_hand_and_meets_the_budget():
    """Reference: the model's own FFN modules routed with hooks, layer i's routes computed from layer i-1's FFN
    input with the plan's router weights and λ (tests/reference_ffn.py); its realised budget is within 0.02."""
    model, cm = _compiled(True)
    plan = cm.plan
    keys = list(plan.layers)
    prev_input, routes = {}, {k: [] for k in keys}

    def routes_fn(i, key):
        router = plan_router(plan.layers[key], plan.lam, routes[key])

        def fn(x):
            prev_input[i] = x
            return router(prev_input[i - 1] if i > 0 else x)
        return fn

    ffns = {k: (routes_fn(i, k), plan.layers[k].perm[:plan.layers[k].k]) for i, k in enumerate(keys)}
    cal = _batches(4, 100)
    with torch.no_grad(), routed_reference(model, ffns, down="b"):
        refs = [model(**b) for b in cal]
    for b, ref in zip(cal, refs):
        assert_close_nonpad(cm(**b), ref, b.get("attention_mask"), EXACT_REWRITE)
    costs = {k: torch.tensor(plan.layers[k].costs, dtype=torch.float64) for k in keys}
    budget = sum(float(costs[k][torch.cat([r.reshape(-1) for r in routes[k]])].mean()) for k in keys) / len(keys)
    assert abs(budget - 0.5) <= BUDGET_TOL
    assert cm.report.plan["budget"]["realised"] == pytest.approx(budget, abs=1e-9)


def test_hoisted_graph_runs_on_onnx_like_eager():
    model, cm = _compiled(True)
    batch = _batches(1, 300, batch=3, seq=11)[0]
    onnx = routefx.compile(model, cm.plan, backend="onnx")
    out, ref = onnx(**batch), cm(**batch)  # PlainLM returns the logits tensor
    assert (out - ref).abs().max().item() <= ONNX_VS_EAGER


def test_hoist_off_leaves_the_graph_as_it_was():
    """Off (the default): no HoistRouters in the pipeline, every router reads its own layer's input, and the pass,
    run anyway on that plan, changes nothing."""
    assert not any(isinstance(p, HoistRouters) for p in build_pipeline(Duo(small="nested")).passes)
    assert any(isinstance(p, HoistRouters) for p in build_pipeline(Duo(hoist=True, small="nested")).passes)
    _, cm = _compiled(False)
    gm = cm.graph_module
    assert all(x is op.args[0] for op, x in _routers(gm).items())
    before = gm.code
    res = HoistRouters().run(gm, PassContext(recognize(gm), cm.plan))
    assert res.rewrites == 0 and gm.code == before


@pytest.mark.parametrize("kw,match", [
    (dict(hoist=True, router="static"), "hoist=True needs a router fitted at calibration"),
    (dict(hoist=True, router="loss"), "got router 'loss'"),
    (dict(hoist=1), "hoist must be True or False"),
])
def test_bad_hoist_policies(kw, match):
    with pytest.raises(PolicyError, match=match):
        Duo(**kw)


def test_hoist_policy_json_round_trip_and_default():
    p = Duo(budget=0.4, router="random", hoist=True, small="nested")
    assert routefx.policies.policy_from_json(p.to_json()) == p
    assert Duo(small="nested").hoist is False and Duo.from_dict({"budget": 0.5}).hoist is False  # plans saved before the field


@pytest.mark.parametrize("hoist", [False, True], ids=["local", "hoisted"])
def test_routers_of_a_bf16_model_compute_in_fp32(hoist):
    """A bf16 FFN's router reads its input cast to fp32, with fp32 weights, bias and costs (scores rounded to bf16
    tie often, and backends round intermediates differently); its routes equal that fp32 argmax by hand."""
    model = ZOO["plain_resized"].build().to(torch.bfloat16)
    cm = routefx.compile(model, Duo(budget=0.5, router="local", hoist=hoist, small="nested"),
                         calibration=_batches(2, 100))
    gm = cm.graph_module
    args, kwargs = example_inputs(ZOO["plain_resized"], batch=3, seq=11, seed=7)
    interp = torch.fx.Interpreter(gm, garbage_collect_values=False)
    with torch.no_grad():
        interp.run(*graph_kwargs(gm, args, kwargs).values())
    env = interp.env
    routers = _routers(gm)
    assert len(routers) == 4
    ops = list(routers)
    mixed = 0
    for i, (op, read) in enumerate(routers.items()):
        assert read.target is aten.to.dtype and read.args[1] is torch.float32
        assert read.args[0] is (ops[i - 1] if hoist and i else op).args[0]
        x = env[read.args[0]]
        assert x.dtype is torch.bfloat16
        lin = op.args[1].args[0].args[0]
        w, b = (getattr(gm, n.target) for n in lin.args[1:3])
        assert w.dtype is b.dtype is torch.float32
        sub = op.args[1].args[0]
        priced = env[sub.args[1]]
        assert priced.dtype is torch.float32
        expect = (x.float() @ w.T + b - priced).argmax(-1, keepdim=True)
        assert torch.equal(env[op.args[1]], expect)
        mixed += len(torch.unique(expect)) >= 2
    assert mixed >= 1, "no layer mixes routes: the check would not test routing"
