"""RaiseMoE: the expert dispatch of each MoE block becomes one routed_ffn whose ranges are the experts; the router
is kept as captured; what the pass cannot express is left as captured with the reason."""
import pytest
import torch

from routefx.ir import capture, graph_utils as gu
from routefx.ir.ffn import resolve_weight, param_ref
from routefx.ir.ops import routed_ffn
from routefx.passes.manager import PassManager
from routefx.passes.raise_moe import RaiseMoE
from tests.tolerances import EXACT_REWRITE
from tests.zoo import ZOO, example_inputs

aten = torch.ops.aten


def _captured(name):
    entry = ZOO[name]
    model = entry.build()
    args, kwargs = example_inputs(entry)
    return model, capture(model, args, kwargs), args, kwargs


def _run(gm, args, kwargs):
    with torch.no_grad():
        return gm(*args, **kwargs, **gm.meta["routefx"].constant_kwargs)


def _count(gm, pred) -> int:
    return sum(1 for n in gm.graph.nodes if n.op == "call_function" and pred(n))


@pytest.mark.parametrize("name", ["mixtral", "qwen2moe"])
def test_each_range_is_one_expert_of_the_hugging_face_module(name):
    """Expert e of the routed op (routes all e, no gates) equals the model's own experts module run with every
    token sent to e with weight 1: the concatenated weights, the gate/up halves and the activation are right."""
    model, gm, _, _ = _captured(name)
    topk_before = _count(gm, lambda n: n.target in gu.TOPK)
    _, reports = PassManager([RaiseMoE()]).run(gm)
    assert reports[0].rewrites == sum(k == "moe" for k in ZOO[name].expect.kinds)
    assert _count(gm, gu.is_grouped_mm) == 0
    assert _count(gm, lambda n: n.target in gu.TOPK) == topk_before     # the router is kept as captured
    op = next(n for n in gm.graph.nodes if gu.is_routed(n))
    dyn = gu.dynamic_nodes(gm.graph)
    w = [None if a is None else resolve_weight(gm, param_ref(a, dyn)) for a in op.args[3:9]]
    ranges, act = op.args[9], op.args[10]
    experts = model.model.layers[0].mlp.experts
    E, d = ZOO[name].expect.num_experts, ZOO[name].expect.hidden
    x = torch.randn(11, d, generator=torch.Generator().manual_seed(0))
    for e in range(E):
        with torch.no_grad():
            ref = experts(x, torch.full((11, 1), e), torch.ones(11, 1))
            out = routed_ffn(x, torch.full((11, 1), e), None, *w, ranges, act)
        assert (out - ref).abs().max().item() <= EXACT_REWRITE, f"expert {e}"


def test_routes_and_gates_are_the_routers_topk_and_renormalised_weights():
    """Mixtral: routes are top-k's indices, gates its values divided by their sum (the captured renormalisation)."""
    _, gm, args, kwargs = _captured("mixtral")
    before = _run(gm, args, kwargs)
    PassManager([RaiseMoE()]).run(gm)
    op = next(n for n in gm.graph.nodes if gu.is_routed(n))
    routes, gates = gu.root_views(op.args[1]), op.args[2]
    assert gu.is_getitem(routes) and routes.args[0].target in gu.TOPK and routes.args[1] == 1
    assert gu.root_views(gates).target in gu.targets(aten.div, aten.div_)
    assert (_run(gm, args, kwargs).logits - before.logits).abs().max().item() <= EXACT_REWRITE


def test_dense_models_are_untouched():
    _, gm, _, _ = _captured("llama")
    _, reports = PassManager([RaiseMoE()]).run(gm)
    assert reports[0].rewrites == 0 and reports[0].misses == [] and _count(gm, gu.is_routed) == 0


def test_dispatch_read_elsewhere_is_left_as_captured_with_the_reason():
    """Must not fire: a value inside the dispatch (the experts' group offsets) also feeds the model output, so
    replacing the dispatch would drop it; block 0 stays captured with the reason, the others are rewritten."""
    _, gm, args, kwargs = _captured("mixtral")
    g = gm.graph
    up = next(n for n in g.nodes if gu.is_grouped_mm(n))
    out = next(n for n in g.nodes if n.op == "output")
    logits = out.args[0][0] if isinstance(out.args[0], (tuple, list)) else out.args[0]
    with g.inserting_before(out):
        extra = g.call_function(aten.mul.Tensor, (g.call_function(aten.sum.default, (up.args[2],)), 0))
        new = g.call_function(aten.add.Tensor, (logits, extra))
    logits.replace_all_uses_with(new)
    new.update_arg(0, logits)
    gm.recompile()
    before = _run(gm, args, kwargs)
    _, reports = PassManager([RaiseMoE()]).run(gm)
    (miss,) = reports[0].misses
    assert miss["where"].startswith("block 0") and "an intermediate value of the expert dispatch" in miss["reason"]
    assert reports[0].rewrites == ZOO["mixtral"].expect.blocks - 1
    assert _count(gm, gu.is_grouped_mm) == 2
    after = _run(gm, args, kwargs)
    assert (after.logits - before.logits).abs().max().item() <= EXACT_REWRITE


@pytest.mark.parametrize("name", ["mixtral", "qwen2moe"])
def test_raised_blocks_still_read_as_moe(name):
    """After the rewrite, recognition reads each raised block as the MoE it was captured as (kind, experts, top-k,
    expert width, shared expert), so inspect and reports say MoE; Duo's dense-FFN list stays without them."""
    from routefx.ir import recognize
    _, gm, _, _ = _captured(name)
    before = recognize(gm)
    PassManager([RaiseMoE()]).run(gm)
    after = recognize(gm)
    fields = ("kind", "num_experts", "top_k", "intermediate_size", "shared_expert_size", "activation")
    moe = [b.index for b in before.blocks if b.ffn.kind == "moe"]
    assert moe
    for i in moe:
        f0, f1 = before.blocks[i].ffn, after.blocks[i].ffn
        assert {k: getattr(f1, k) for k in fields} == {k: getattr(f0, k) for k in fields}, f"block {i}"
        assert f1.routed is not None and len(f1.routed) == f0.num_experts
    assert [b.index for b in after.dense_ffn_blocks] == [b.index for b in before.dense_ffn_blocks]
    assert f"{before.blocks[moe[0]].ffn.num_experts} top-{before.blocks[moe[0]].ffn.top_k}" in str(after)


def test_as_many_experts_as_the_hidden_width():
    """Must fire when the router's [T, E] scores have the block input's shape (E = d, Mellum's tiny config): the
    router product is not the experts' input. The raised model equals the captured one."""
    import transformers as hf
    cfg = hf.Qwen3MoeConfig(vocab_size=97, hidden_size=32, intermediate_size=64, moe_intermediate_size=8,
                            num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, head_dim=8,
                            num_experts=32, num_experts_per_tok=2, norm_topk_prob=True, use_cache=False)
    torch.manual_seed(0)
    model = hf.Qwen3MoeForCausalLM(cfg).eval()
    ids = torch.randint(3, 97, (2, 9), generator=torch.Generator().manual_seed(1))
    mask = torch.ones_like(ids)
    mask[0, :2] = 0
    gm = capture(model, (ids,), {"attention_mask": mask})
    before = _run(gm, (ids,), {"attention_mask": mask})
    _, reports = PassManager([RaiseMoE()]).run(gm)
    assert reports[0].rewrites == 2 and reports[0].misses == []
    after = _run(gm, (ids,), {"attention_mask": mask})
    keep = mask.bool()
    assert (after.logits - before.logits)[keep].abs().max().item() <= EXACT_REWRITE
