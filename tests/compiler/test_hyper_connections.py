"""Blocks on a hyper-connection residual: the stream is N parallel copies [B, S, N, d]; each branch reads a
weighted sum of them (weights from a product over all N·d values) and is added back to every copy with its own
weight. Hunyuan-V4 casts the stream after each add (the casts must not merge successive adds into one sum);
DeepSeek-V4 (manifold hyper-connections) adds the branch to a mix of the streams, comb·X, so that no term of the
sum is the stream itself: X is. Recognised as one block per layer, the mixing products kept out of the FFNs, the
dense FFN and the MoE experts (clamped SwiGLU) read and compiled; Duo routes the dense FFN, PruneLayers removes a
layer as deleting it from the model does."""
import copy

import pytest
import torch
import transformers as hf

import routefx
from routefx.policies import Dense, MoEBudget, PruneLayers
from tests.compare import assert_close_nonpad, assert_compiles_to_model, assert_duo_routes_the_mlps, padded_ids
from tests.tolerances import EXACT_REWRITE, HALF_VS_HF
from tests.zoo import redraw_

V = 112


def _hy_v4() -> torch.nn.Module:
    """Three layers (dense FFN, then two MoE layers), four streams; weights drawn away from HF's init (some of it
    constant), experts' clamp at 0.5 so that it engages."""
    cfg = hf.HYV4Config(vocab_size=V, hidden_size=64, intermediate_size=128, moe_intermediate_size=32,
                        num_hidden_layers=3, num_attention_heads=4, num_key_value_heads=4, head_dim=8,
                        n_routed_experts=4, n_shared_experts=1, num_experts_per_tok=2, q_lora_rank=16,
                        kv_lora_rank=16, qk_nope_head_dim=8, qk_rope_head_dim=8, v_head_dim=16,
                        mlp_layer_types=["dense", "sparse", "sparse"], hc_mult=4, swiglu_limit=0.5,
                        max_position_embeddings=64, pad_token_id=0)
    cfg._attn_implementation = "eager"
    torch.manual_seed(0)
    return _redrawn(hf.HYV4ForCausalLM(cfg).eval())


def _redrawn(model):
    """Experts and routers at a scale where the clamps engage; HF's constant initial matrices drawn at random."""
    redraw_(model, lambda name, p: ".mlp." in name, 0.3)
    return redraw_(model, lambda name, p: p.dim() >= 2 and bool((p == p.flatten()[0]).all()), 0.02, seed=2)


def _inputs(seed=3, batch=2, seq=11, pad=3):
    return padded_ids(V, seed, batch, seq, pad, low=3)


@pytest.fixture(scope="module")
def model():
    return _hy_v4()


def test_blocks_and_ffns_on_parallel_streams(model):
    ids, mask = _inputs()
    cm = assert_compiles_to_model(model, ids, mask)["onnx"]
    assert [b.path for b in cm.ir.blocks] == [f"model.layers.{i}" for i in range(3)]
    f0, f1, f2 = (b.ffn for b in cm.ir.blocks)
    assert (f0.kind, f0.activation, f0.intermediate_size) == ("gated", "silu", 128)
    for f in (f1, f2):
        assert (f.kind, f.num_experts, f.top_k, f.shared_expert_size) == ("moe", 4, 2, 32)
        assert f.activation == "silu;gate_max=0.5;up_limit=0.5" and f.routed is not None
    assert cm.report.pass_report("raise_moe").rewrites == 2


def test_duo_routes_the_dense_ffn_on_parallel_streams(model):
    """Duo's routes on the dense layer equal the model's own MLP routed per token with the plan's router and
    neuron order (a skipped token's FFN adds 0 to every stream)."""
    cal = [dict(zip(("input_ids", "attention_mask"), _inputs(seed=s, batch=4, seq=16, pad=0))) for s in range(3)]
    assert_duo_routes_the_mlps(model, cal, *_inputs(seed=9), ["model.layers.0.mlp"])


def test_moe_budget_on_parallel_streams(model):
    """MoEBudget adapts the two MoE blocks: at budget 1 it is the model; at 0.6 it computes fewer experts."""
    cal = [{"input_ids": _inputs(seed=s, batch=2, seq=16, pad=0)[0]} for s in range(3)]
    ids, mask = _inputs()
    full = routefx.compile(model, MoEBudget(1.0), calibration=cal)
    with torch.no_grad():
        ref = model(ids, attention_mask=mask).logits
    assert_close_nonpad(full(input_ids=ids, attention_mask=mask).logits, ref, mask, EXACT_REWRITE)
    half = routefx.compile(model, MoEBudget(0.6), calibration=cal)
    assert half.report.pass_report("adapt_experts").rewrites == 2
    assert half.route_stats([{"input_ids": ids, "attention_mask": mask}]).budget < 0.9


def test_parallel_streams_in_bfloat16(model):
    """In bf16, Hunyuan-V4 adds each branch to the streams in float32 (`streams.float() + post * out.float()`, cast
    back after) and scores its routers in float32: the cast stream is still the stream (no block was found before)
    and the routers are read through their casts. Every block and FFN as in fp32; Dense equals the bf16 model;
    PruneLayers removes the first layer as deleting it does."""
    m16 = copy.deepcopy(model).to(torch.bfloat16)
    ids, mask = _inputs()
    cm = routefx.compile(m16, Dense(), example_inputs=(ids,), example_kwargs={"attention_mask": mask})
    with torch.no_grad():
        ref = m16(ids, attention_mask=mask).logits
    assert_close_nonpad(cm(ids, attention_mask=mask).logits.float(), ref.float(), mask, HALF_VS_HF)
    assert [b.path for b in cm.ir.blocks] == [f"model.layers.{i}" for i in range(3)]
    assert [b.ffn.kind for b in cm.ir.blocks] == ["gated", "moe", "moe"]
    assert cm.report.pass_report("raise_moe").rewrites == 2
    pruned = routefx.compile(m16, PruneLayers(layers=[0]), example_inputs=(ids,),
                             example_kwargs={"attention_mask": mask})
    twin = copy.deepcopy(m16)
    twin.model.layers = torch.nn.ModuleList(list(twin.model.layers)[1:])
    twin.config.num_hidden_layers = 2
    twin.config.mlp_layer_types = twin.config.mlp_layer_types[1:]
    with torch.no_grad():
        want = twin(ids, attention_mask=mask, use_cache=False).logits
    assert_close_nonpad(pruned(ids, attention_mask=mask).logits.float(), want.float(), mask, HALF_VS_HF)


def _deepseek_v4() -> torch.nn.Module:
    """Three layers: a hash-routed MoE layer (experts chosen by token id) and two top-k MoE layers."""
    cfg = hf.DeepseekV4Config(vocab_size=V, hidden_size=64, moe_intermediate_size=32, num_hidden_layers=3,
                              num_attention_heads=4, num_key_value_heads=1, head_dim=16, qk_rope_head_dim=8,
                              q_lora_rank=16, num_local_experts=4, num_experts_per_tok=2,
                              mlp_layer_types=["hash_moe", "moe", "moe"], hc_mult=4, swiglu_limit=0.5,
                              max_position_embeddings=64, pad_token_id=0)
    cfg._attn_implementation = "eager"
    torch.manual_seed(0)
    return _redrawn(hf.DeepseekV4ForCausalLM(cfg).eval())


def test_manifold_hyper_connections():
    model = _deepseek_v4()
    ids, mask = _inputs()
    cm = assert_compiles_to_model(model, ids, mask)["onnx"]
    assert [b.path for b in cm.ir.blocks] == [f"model.layers.{i}" for i in range(3)]
    for f in (b.ffn for b in cm.ir.blocks):    # the first by hash routing (the ids pick the experts)
        assert (f.kind, f.num_experts, f.top_k) == ("moe", 4, 2) and f.routed is not None
        assert f.activation == "silu;gate_max=0.5;up_limit=0.5"
    assert cm.report.pass_report("raise_moe").rewrites == 3
    # PruneLayers: the same as the model with layer 1 deleted
    pruned = routefx.compile(model, PruneLayers(layers=[1]), example_inputs=(ids,),
                             example_kwargs={"attention_mask": mask})
    twin = copy.deepcopy(model)
    twin.model.layers = torch.nn.ModuleList([twin.model.layers[0], twin.model.layers[2]])
    twin.config.num_hidden_layers = 2
    with torch.no_grad():
        want = twin(ids, attention_mask=mask, use_cache=False).logits
    assert_close_nonpad(pruned(ids, attention_mask=mask).logits, want, mask, EXACT_REWRITE)
    with torch.no_grad():
        ref = model(ids, attention_mask=mask).logits
    assert (want - ref)[mask.bool()].abs().max() > 1e-3    # the layer mattered
