"""MoEfy end to end: all experts reproduce the dense model; top-k equals a per-token reference built from the
Hugging Face modules (hooks, not routefx's FFN code); eager and ONNX agree; the budget forms meet their budget;
bad arguments are refused with typed errors."""
import pytest
import torch

import routefx
from routefx.calibrate.moefy import spread_top_k
from routefx.compiler.plan import Plan
from routefx.errors import PolicyError
from routefx.ir.graph_utils import is_routed
from routefx.policies import MoEfy
from tests.compare import assert_close_nonpad
from tests.reference_ffn import ffn_inputs, neuron_subset
from tests.tolerances import EXACT_REWRITE, ONNX_VS_EAGER
from tests.zoo import ZOO, example_inputs


def _cal(entry):
    return [{"input_ids": a[0], **k} for a, k in
            (example_inputs(entry, batch=3, seq=12, left_pad=2, seed=40 + i) for i in range(2))]


def _held(entry):
    return example_inputs(entry, batch=2, seq=10, left_pad=3, seed=9)


@pytest.fixture(scope="module")
def llama_moe():
    """Llama MoEfied under a static budget of 0.3: 7 expert slots of 8 spread over its 3 layers."""
    entry = ZOO["llama"]
    model = entry.build()
    cal = _cal(entry)
    return model, cal, routefx.compile(model, MoEfy(experts=8, budget=0.3, steps=100), calibration=cal)


@pytest.mark.parametrize("name", ["llama", "gpt2"])          # gated without biases; plain MLP with biases
def test_all_experts_reproduce_the_dense_model(name):
    entry = ZOO[name]
    model = entry.build()
    cm = routefx.compile(model, MoEfy(experts=8, top_k=8, steps=0), calibration=_cal(entry))  # router unused
    args, kwargs = _held(entry)
    with torch.no_grad():
        ref = model(*args, **kwargs)
    assert_close_nonpad(cm(*args, **kwargs), ref, kwargs["attention_mask"], EXACT_REWRITE)
    ops = [n for n in cm.graph_module.graph.nodes if is_routed(n)]
    assert len(ops) == 3 and all(n.args[1].meta["val"].shape[-1] == 8 for n in ops)


def _mlp_reference(mlp, lp, top_k, E):
    """The user's Llama MLP as MoE: per token, the router's top-k experts (neuron sets perm[e·W:(e+1)·W] of the
    original FFN, each run through the module with the other neurons zeroed), summed."""
    W = lp.F // E

    def forward(x):
        top = (x @ lp.weight.T + lp.bias).topk(top_k, -1).indices           # [B, S, K]
        out = torch.zeros_like(x)
        for e in range(E):
            with neuron_subset(mlp, "down_proj", lp.perm[e * W:(e + 1) * W]):
                y = type(mlp).forward(mlp, x)
            out += (top == e).any(-1, keepdim=True) * y
        return out
    return forward


def test_top_k_equals_a_per_token_reference(llama_moe):
    model, _, cm = llama_moe
    entry = ZOO["llama"]
    args, kwargs = _held(entry)
    out = cm(*args, **kwargs)
    ref_model = entry.build()
    top_k = cm.plan.calibration["moefy"]["top_k"]
    for i, layer in enumerate(ref_model.model.layers):
        key = f"model.layers.{i}.mlp"
        layer.mlp.forward = _mlp_reference(layer.mlp, cm.plan.layers[key], top_k[key], 8)
    with torch.no_grad():
        ref = ref_model(*args, **kwargs)
        dense = model(*args, **kwargs)
    assert_close_nonpad(out, ref, kwargs["attention_mask"], EXACT_REWRITE)
    assert (out.logits - dense.logits).abs().max() > 1e-3                   # 7 of 24 experts: not the dense model


def test_experts_partition_the_ffn_and_the_router_beats_chance(llama_moe):
    model, cal, cm = llama_moe
    paths = [f"model.layers.{i}.mlp" for i in range(3)]
    xs = ffn_inputs(model, paths, cal)
    ops = {n.meta["routefx_path"]: n for n in cm.graph_module.graph.nodes if is_routed(n)}
    for p in paths:
        lp, mlp = cm.plan.layers[p], model.get_submodule(p)
        assert sorted(lp.perm.tolist()) == list(range(104)) and lp.k == 13
        assert ops[p].args[9] == [v for e in range(8) for v in (13 * e, 13 * e + 13)]
        with torch.no_grad():
            h = mlp.act_fn(mlp.gate_proj(xs[p])) * mlp.up_proj(xs[p])          # [N, F]
            contrib = h.abs() * mlp.down_proj.weight.norm(dim=0)
            mass = torch.stack([contrib[:, lp.perm[13 * e:13 * e + 13]].sum(-1) for e in range(8)], -1)  # [N, E]
            pred = (xs[p] @ lp.weight.T + lp.bias).argmax(-1)
        accuracy = float((pred == mass.argmax(-1)).double().mean())
        assert accuracy > 2 / 8, f"{p}: router top-1 accuracy {accuracy:.3f} on calibration labels (chance 0.125)"


def test_a_static_budget_is_spread_over_layers_and_met_as_near_as_whole_experts_allow(llama_moe):
    _, _, cm = llama_moe
    top_k = cm.plan.calibration["moefy"]["top_k"]
    ks = {n.meta["routefx_path"]: n.args[1].meta["val"].shape[-1] for n in cm.graph_module.graph.nodes
          if is_routed(n)}
    assert ks == top_k and sum(ks.values()) == round(0.3 * 8 * 3)          # 7 expert slots over 3 layers of 8
    assert cm.plan.budget.realised == pytest.approx(7 / 24)


def test_the_spread_of_expert_slots_maximises_the_mass_the_routers_experts_hold():
    # captured[k - 1]: share of activation mass in a layer's first k experts (concave in k); brute force over
    # every allocation of 7 slots (1..4 per layer) is the reference
    captured = {"a": [0.4, 0.6, 0.7, 1.0], "b": [0.7, 0.8, 0.9, 1.0], "c": [0.3, 0.55, 0.8, 1.0]}
    best = max(((i, j, 7 - i - j) for i in range(1, 5) for j in range(1, 5) if 1 <= 7 - i - j <= 4),
               key=lambda ks: sum(captured[n][k - 1] for n, k in zip("abc", ks)))
    assert tuple(spread_top_k(captured, 4, 7 / 12).values()) == best


def test_a_per_token_rule_meets_the_budget_and_runs_on_onnx(tmp_path):
    # on ONNX: the router, softmax, top-k, the rule's sort/cumsum/scatter and routed_ffn with K = E routes, no
    # gates and an empty skip range (the static top-k graph is a subset: router, TopK, K routes, no gates)
    entry = ZOO["gpt2"]
    model, cal = entry.build(), _cal(entry)
    cm = routefx.compile(model, MoEfy(experts=8, budget=0.5, rule="top_p", steps=100), calibration=cal)
    assert abs(cm.plan.budget.realised - 0.5) <= 0.02
    assert abs(cm.route_stats(cal).budget - cm.plan.budget.realised) < 1e-9
    args, kwargs = _held(entry)
    cm.plan.save(str(tmp_path))                                  # the plan's files carry experts, routers and λ
    onnx = routefx.compile(model, Plan.load(str(tmp_path)), backend="onnx")
    assert_close_nonpad(onnx(*args, **kwargs), cm(*args, **kwargs), kwargs["attention_mask"], ONNX_VS_EAGER)


def test_refusals():
    with pytest.raises(PolicyError, match=r"MoEfy: top_k must be an int in \[1, experts=8\], got 9"):
        MoEfy(experts=8, top_k=9)
    with pytest.raises(PolicyError, match=r"MoEfy takes top_k or budget, not both"):
        MoEfy(top_k=2, budget=0.5)
    with pytest.raises(PolicyError, match=r"rule='top_p' chooses experts per token under a budget"):
        MoEfy(top_k=2, rule="top_p")
    with pytest.raises(PolicyError, match=r"below 1/experts = 0.125"):
        MoEfy(budget=0.1, rule="top_p")
    with pytest.raises(PolicyError, match=r"unknown rule 'top_q'; supported: top_p, threshold"):
        MoEfy(budget=0.5, rule="top_q")
    with pytest.raises(PolicyError, match=r"layers must be a non-empty list of block indices >= 0 .*, got \[-1\]"):
        MoEfy(layers=[-1])
    llama, mixtral = ZOO["llama"], ZOO["mixtral"]
    with pytest.raises(PolicyError, match=r"experts=5 does not divide the FFN width F=104 of block 0 "
                                          r"\(model.layers.0.mlp\).*divisors of 104: 2, 4, 8, 13"):
        routefx.compile(llama.build(), MoEfy(experts=5), calibration=_cal(llama))
    with pytest.raises(PolicyError, match=r"no dense FFN to split into experts \(found FFN kinds: \['moe'\]\)"):
        routefx.compile(mixtral.build(), MoEfy(experts=4), calibration=_cal(mixtral))
    assert MoEfy.from_json(MoEfy(experts=4, budget=0.5, rule="threshold").to_json()) == MoEfy(4, None, 0.5,
                                                                                              "threshold")
    assert MoEfy.from_json(MoEfy().to_json()) == MoEfy(top_k=2)
