"""MoE blocks with weight products beside the experts that are not a shared expert: AXK2's norm before the MoE
runs its own small MLP, Qwen4-Exp mixes its parallel residual streams through a low-rank product pair and weighs
the write-back by another product; Inkling's router also scores its shared expert (E + 1 outputs, the choice
among the first E) and its shared expert is a batched product over stacked weights, gated inside. Each is read as
MoE with its real expert count, its dispatch raised to routed_ffn (equal to the model), and MoEBudget adapts it
(budget 1 is the model, a lower budget computes fewer experts)."""
import pytest
import torch
import transformers as hf

import routefx
from tests.compare import assert_close_nonpad, assert_compiles_to_model, assert_moe_budget_adapts, padded_ids
from tests.tolerances import ONNX_VS_EAGER
from tests.zoo import redraw_

V = 112
_COMMON = dict(vocab_size=V, hidden_size=64, num_hidden_layers=3, num_attention_heads=4, max_position_embeddings=64,
               moe_intermediate_size=32, num_experts_per_tok=2, pad_token_id=0, use_cache=False)


def _axk2():
    return hf.AXK2Config(**_COMMON, intermediate_size=128, num_key_value_heads=4, n_routed_experts=4, kv_lora_rank=16,
                         q_lora_rank=16, qk_rope_head_dim=8, v_head_dim=16, qk_nope_head_dim=8, n_group=1,
                         topk_group=1, mlp_layer_types=["dense", "sparse", "sparse"], head_dim=8),\
        hf.AXK2ForCausalLM, 2


def _inkling():
    return hf.InklingTextConfig(**_COMMON, num_key_value_heads=2, head_dim=16, intermediate_size=128,
                                mlp_layer_types=["sparse"] * 3, n_routed_experts=4, n_shared_experts=1),\
        hf.InklingForCausalLM, 3


# Qwen4-Exp (low-rank stream mixing before the MoE, a write-back weight product beside it) is read the same way;
# its tiny model takes minutes to capture (linear-attention layers), so it is checked by bench/family_sweep.py.
_FAMILIES = {"axk2": _axk2, "inkling": _inkling}


def _build(name):
    cfg, cls, moe_layers = _FAMILIES[name]()
    cfg._attn_implementation = "eager"
    torch.manual_seed(0)
    model = cls(cfg).eval()
    redraw_(model, lambda n, p: ".mlp." in n and p.dim() >= 2, 0.3)   # routes that differ per token
    redraw_(model, lambda n, p: p.dim() >= 2 and bool((p == p.flatten()[0]).all()), 0.02, seed=2)
    return model, moe_layers


def _inputs(seed=3, batch=2, seq=11, pad=3):
    return padded_ids(V, seed, batch, seq, pad, low=3)


@pytest.mark.parametrize("name", sorted(_FAMILIES))
def test_read_as_moe_and_raised_to_routed_ffn(name):
    model, moe_layers = _build(name)
    ids, mask = _inputs()
    cm = assert_compiles_to_model(model, ids, mask)["eager"]
    moe = [b.ffn for b in cm.ir.blocks if b.ffn is not None and b.ffn.kind == "moe"]
    assert len(moe) == moe_layers
    for f in moe:
        assert (f.num_experts, f.top_k, f.intermediate_size) == (4, 2, 32) and f.routed is not None
    assert cm.report.pass_report("raise_moe").rewrites == moe_layers


@pytest.mark.parametrize("name", sorted(_FAMILIES))
def test_moe_budget(name):
    model, moe_layers = _build(name)
    cal = [{"input_ids": _inputs(seed=s, batch=2, seq=16, pad=0)[0]} for s in range(3)]
    ids, mask = _inputs(seed=9)
    half, out = assert_moe_budget_adapts(model, cal, ids, mask, moe_layers)
    assert abs(half.plan.budget.realised - 0.6) <= 0.02
    onnx = routefx.compile(model, half.plan, backend="onnx")
    assert_close_nonpad(onnx(input_ids=ids, attention_mask=mask).logits, out, mask, ONNX_VS_EAGER)
