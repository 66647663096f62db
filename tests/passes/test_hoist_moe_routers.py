"""MoEBudget(hoist=True): pre-gating. Each MoE block but the first takes its experts and gates from logits
computed on the previous MoE block's router input with the plan's fitted weights, and the choice runs before
that block. Reference: the exact compiled model (Dense, equal to Hugging Face, tested elsewhere) evaluated with
those router logits substituted by an interpreter; the router nodes found there from the model's own router
parameters, not by the pass's search."""
import copy
import functools
import os
import tempfile

import pytest
import torch
import torch.nn.functional as F
from torch import fx
from torch.fx import _pytree as fx_pytree

import routefx
from routefx.compiler.pipeline import build_pipeline
from routefx.errors import PolicyError
from routefx.ir import graph_utils as gu
from routefx.passes.hoist_moe_routers import HoistMoERouters
from routefx.policies import Dense, MoEBudget
from tests.compare import assert_close_nonpad, graph_kwargs, main_output
from tests.tolerances import EXACT_REWRITE, ONNX_VS_EAGER
from tests.zoo import ZOO, example_inputs

aten = torch.ops.aten
FAMILIES = ["mixtral", "granitemoe", "deepseekv3"]  # plain; type_as(gates, x); first block dense + fp32 router


def _cal(entry, n=3):
    return [{"input_ids": a[0], **k} for a, k in
            (example_inputs(entry, batch=3, seq=12, left_pad=2, seed=40 + i) for i in range(n))]


@functools.lru_cache(maxsize=None)
def _compiled(name: str, budget: float = 1.0):
    entry = ZOO[name]
    return routefx.compile(entry.build(), MoEBudget(budget=budget, hoist=True), calibration=_cal(entry),
                           backend="eager")


def _router_nodes(gm: fx.GraphModule, keys) -> dict:
    """{block key: the linear node whose weight is that block's router parameter ([E, d], directly under the
    block's module path, possibly cast)} in a graph that has not been hoisted."""
    out = {}
    for n in gm.graph.nodes:
        if n.target is not aten.linear.default:
            continue
        w = n.args[1]
        while w.op == "call_function" and w.target is aten.to.dtype:
            w = w.args[0]
        if w.op != "get_attr":
            continue
        for key in keys:
            rest = w.target.removeprefix(key + ".")
            if rest != w.target and rest.count(".") == 1 and "expert" not in rest:
                assert key not in out, f"two router candidates in {key}"
                out[key] = n
    return out


class _Pregated(fx.Interpreter):
    """Runs a graph with the logits of the given router nodes replaced by linear(input of `reads`, W, b)."""

    def __init__(self, gm, swap):
        super().__init__(gm, garbage_collect_values=False)   # keeps the earlier router inputs
        self.swap = swap    # {router node: (router node whose input it reads, W, b)}

    def run_node(self, n):
        if n in self.swap:
            reads, w, b = self.swap[n]
            x = self.env[reads.args[0]]
            return F.linear(x, w.to(x.dtype), b.to(x.dtype))
        return super().run_node(n)


def _reference(name, cm, args, kwargs):
    dense = routefx.compile(ZOO[name].build(), Dense(), example_inputs=args, example_kwargs=kwargs, backend="eager")
    gm = dense.graph_module
    record = cm.plan.calibration["moe_hoist"]
    routers = _router_nodes(gm, {k for key in record for k in (key, record[key]["reads"])})
    swap = {routers[k]: (routers[r["reads"]], cm.plan.layers[k].weight, cm.plan.layers[k].bias)
            for k, r in record.items()}
    flat = fx_pytree.tree_flatten_spec(([], graph_kwargs(gm, args, kwargs)), gm._in_spec)
    with torch.no_grad():
        return main_output(_Pregated(gm, swap).run(*flat)), main_output(dense(*args, **kwargs))


@pytest.mark.parametrize("name", FAMILIES)
def test_pregated_model_equals_the_substituted_router_reference(name):
    cm = _compiled(name)
    (rep,) = [p for p in cm.report.passes if p.name == "hoist_moe_routers"]
    n_moe = sum(1 for b in cm.ir.blocks if b.ffn is not None and b.ffn.kind == "moe")
    assert rep.rewrites == n_moe - 1 and rep.misses == []
    args, kwargs = example_inputs(ZOO[name], batch=2, seq=11, left_pad=3, seed=7)
    ref, exact = _reference(name, cm, args, kwargs)
    out = main_output(cm(*args, **kwargs))
    assert_close_nonpad(out, ref, kwargs["attention_mask"], EXACT_REWRITE)
    assert (out - exact).abs().max() > 1e-3      # the pre-gated routers chose differently somewhere


@pytest.mark.parametrize("name", FAMILIES)
def test_each_choice_runs_before_the_previous_moe_block(name):
    cm = _compiled(name)
    gm = cm.graph_module
    order = {n: i for i, n in enumerate(gm.graph.nodes)}
    ops = [n for n in gm.graph.nodes if gu.is_routed(n) and n.args[2] is not None]
    assert len(ops) >= 2
    for prev, op in zip(ops, ops[1:]):
        deps = gu.ancestors([op.args[1], op.args[2]]) | {op.args[1], op.args[2]}
        assert prev not in deps and op.args[0] not in deps
        assert max(order[op.args[1]], order[op.args[2]]) < order[prev]
    stats = cm.plan.calibration["moe_hoist"]
    assert all(0 <= s["val_topk_agreement"] <= 1 and s["val_r2"] <= 1 for s in stats.values())


def test_budget_is_met_and_onnx_takes_the_same_routes():
    cm = _compiled("mixtral", 0.6)
    assert abs(cm.plan.budget.realised - 0.6) <= 0.02
    entry = ZOO["mixtral"]
    args, kwargs = example_inputs(entry, batch=2, seq=9, left_pad=2, seed=3)
    onnx = routefx.compile(entry.build(), cm.plan, backend="onnx")
    assert_close_nonpad(main_output(onnx(*args, **kwargs)), main_output(cm(*args, **kwargs)),
                        kwargs["attention_mask"], ONNX_VS_EAGER)


def test_saved_plan_reproduces_the_pregated_model():
    cm = _compiled("granitemoe")
    args, kwargs = example_inputs(ZOO["granitemoe"], batch=2, seq=8, left_pad=1, seed=5)
    with tempfile.TemporaryDirectory() as d:
        cm.plan.save(os.path.join(d, "plan"))
        again = routefx.compile(ZOO["granitemoe"].build(), routefx.compiler.plan.Plan.load(os.path.join(d, "plan")))
    assert torch.equal(main_output(again(*args, **kwargs)), main_output(cm(*args, **kwargs)))


def test_hoist_is_off_by_default_and_checked():
    assert MoEBudget().hoist is False and MoEBudget.from_dict({"budget": 0.5}).hoist is False
    assert not any(isinstance(p, HoistMoERouters) for p in build_pipeline(MoEBudget()).passes)
    with pytest.raises(PolicyError, match="hoist must be True or False"):
        MoEBudget(hoist="yes")
    p = MoEBudget(budget=0.7, hoist=True)
    assert routefx.policies.policy_from_json(p.to_json()) == p


def test_a_model_with_one_moe_block_is_refused():
    cfg = copy.deepcopy(ZOO["mixtral"].build().config)   # the zoo's builds share one config object
    cfg.num_hidden_layers = 1
    import transformers as hf
    torch.manual_seed(0)
    model = hf.MixtralForCausalLM(cfg).eval()
    with pytest.raises(PolicyError, match="at least two MoE blocks .* found 1"):
        routefx.compile(model, MoEBudget(budget=1.0, hoist=True), calibration=_cal(ZOO["mixtral"], 1))


def test_pregated_generation_equals_greedy_without_cache():
    """The prefill and decode graphs get the same pre-gating (one plan): greedy generation on onnx equals the
    compiled model called on the growing sequence without a cache."""
    entry = ZOO["mixtral"]
    cm = routefx.compile(entry.build(), _compiled("mixtral", 0.6).plan, backend="onnx")
    (ids,), kw = example_inputs(entry, batch=2, seq=6, left_pad=2, seed=3)
    out = cm.generate(ids, attention_mask=kw["attention_mask"], max_new_tokens=5)
    eager, mask = _compiled("mixtral", 0.6), kw["attention_mask"]
    for _ in range(5):
        nxt = main_output(eager(ids, attention_mask=mask))[:, -1].argmax(-1, keepdim=True)
        ids, mask = torch.cat([ids, nxt], 1), torch.cat([mask, torch.ones_like(nxt)], 1)
    assert torch.equal(out if isinstance(out, torch.Tensor) else out.sequences, ids)
