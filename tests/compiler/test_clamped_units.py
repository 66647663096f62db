"""Clamped gated units, read by structure into parametrised activation names (routefx.ir.activations): GPT-OSS's
experts (interleaved gate/up columns, clamps, x·sigmoid(1.702x), up + 1, per-expert biases after grouped GEMMs),
and dense FFNs written like DeepSeek-V4 / GLM-5 (clamps around silu), MiniMax-M3 (GPT-OSS's unit on a fused,
chunked gate-up product) and Step-3.7 (the activation's output clamped). Each compiles onto routed_ffn and equals
the model on eager and onnx; Duo routes the dense ones, MoEBudget the experts."""
import os

import pytest
import torch
import torch.nn.functional as F
import transformers as hf
from torch import nn

import routefx
from routefx.ir import graph_utils as gu
from routefx.policies import Duo, MoEBudget
from tests.compare import assert_close_nonpad, assert_compiles_to_model, padded_ids
from tests.reference_ffn import plan_router, routed_reference
from tests.tolerances import EXACT_REWRITE, ONNX_VS_EAGER
from tests.zoo import redraw_

LIMIT = 0.5   # small enough that the clamps engage on these weights (checked below)
V, D, FF = 97, 32, 48


def _inputs(seed=3, batch=2, seq=11, pad=3):
    return padded_ids(V, seed, batch, seq, pad, low=1)


# --- dense FFNs -------------------------------------------------------------------------------------------------


class SplitClamped(nn.Module):
    """DeepSeek-V4 / GLM-5: silu(min(g, L)) * clamp(u, -L, L), separate gate and up products."""

    def __init__(self, limit):
        super().__init__()
        self.gate_proj, self.up_proj = nn.Linear(D, FF, bias=False), nn.Linear(D, FF, bias=False)
        self.down_proj, self.limit = nn.Linear(FF, D, bias=False), limit

    def forward(self, x):
        g = self.gate_proj(x).clamp(max=self.limit)
        u = self.up_proj(x).clamp(min=-self.limit, max=self.limit)
        return self.down_proj(F.silu(g) * u)


class FusedOss(nn.Module):
    """MiniMax-M3: GPT-OSS's unit on a fused gate-up product cut in halves (alpha 1.5, not quick_gelu's 1.702)."""

    def __init__(self, limit, alpha=1.5):
        super().__init__()
        self.gate_up_proj, self.down_proj = nn.Linear(D, 2 * FF, bias=False), nn.Linear(FF, D, bias=False)
        self.limit, self.alpha = limit, alpha

    def forward(self, x):
        gate, up = self.gate_up_proj(x).chunk(2, dim=-1)
        gate = gate.clamp(max=self.limit)
        up = up.clamp(min=-self.limit, max=self.limit)
        return self.down_proj((up + 1.0) * (gate * torch.sigmoid(gate * self.alpha)))


class ActClamped(nn.Module):
    """Step-3.7: min(gelu(g), L) * clamp(u, -L, L), written up-first."""

    def __init__(self, limit):
        super().__init__()
        self.up_proj, self.gate_proj = nn.Linear(D, FF, bias=False), nn.Linear(D, FF, bias=False)
        self.down_proj, self.limit = nn.Linear(FF, D, bias=False), limit

    def forward(self, x):
        return self.down_proj(self.up_proj(x).clamp(-self.limit, self.limit)
                              * F.gelu(self.gate_proj(x)).clamp(max=self.limit))


UNITS = {   # module -> the activation name routefx reads
    SplitClamped: f"silu;gate_max={LIMIT!r};up_limit={LIMIT!r}",
    FusedOss: f"swish;alpha=1.5;gate_max={LIMIT!r};up_limit={LIMIT!r};up_add=1.0",
    ActClamped: f"gelu;act_max={LIMIT!r};up_limit={LIMIT!r}",
}


def _llama(limit=LIMIT) -> nn.Module:
    """A three-layer Llama whose MLPs are the three clamped units (weights drawn so projections are O(1))."""
    cfg = hf.LlamaConfig(vocab_size=V, hidden_size=D, intermediate_size=FF, num_hidden_layers=3,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64, pad_token_id=0)
    cfg._attn_implementation = "sdpa"
    torch.manual_seed(0)
    model = hf.LlamaForCausalLM(cfg).eval()
    g = torch.Generator().manual_seed(1)
    for layer, cls in zip(model.model.layers, UNITS):
        layer.mlp = cls(limit)
        with torch.no_grad():
            for p in layer.mlp.parameters():
                p.copy_(torch.randn(p.shape, generator=g) / p.shape[-1] ** 0.5)
    return model.eval()


def test_dense_clamped_units_compile_to_routed_ffn():
    model, (ids, mask) = _llama(), _inputs()
    with torch.no_grad():
        unclamped = _llama(limit=1e6)
        unclamped.load_state_dict(model.state_dict())
        assert (unclamped(ids, attention_mask=mask).logits - model(ids, attention_mask=mask).logits
                ).abs().max() > 1e-2   # the clamps engage
    ids2, mask2 = _inputs(seed=5, batch=3, seq=7, pad=2)
    for backend, cm in assert_compiles_to_model(model, ids, mask).items():
        with torch.no_grad():
            assert_close_nonpad(cm(ids2, attention_mask=mask2).logits, model(ids2, attention_mask=mask2).logits,
                                mask2, EXACT_REWRITE if backend == "eager" else ONNX_VS_EAGER)
    assert [b.ffn.activation for b in cm.ir.blocks] == list(UNITS.values())
    assert all(b.ffn.kind == "gated" and b.ffn.intermediate_size == FF for b in cm.ir.blocks)
    ops = [n for n in cm.graph_module.graph.nodes if gu.is_routed(n)]
    assert [op.args[10] for op in ops] == list(UNITS.values())


def test_duo_routes_clamped_units():
    """Duo on the clamped FFNs: the compiled model equals the model's own MLP modules routed per token with the
    plan's routers and neuron order (tests/reference_ffn.py), on eager and onnx."""
    model = _llama()
    cal = [dict(zip(("input_ids", "attention_mask"), _inputs(seed=s, batch=4, seq=16, pad=0))) for s in range(3)]
    ids, mask = _inputs(seed=9)
    cm = routefx.compile(model, Duo(budget=0.5, router="random", small="nested"), calibration=cal)
    assert len(cm.plan.layers) == 3
    ffns = {key: (plan_router(lp, cm.plan.lam), lp.perm[:lp.k]) for key, lp in cm.plan.layers.items()}
    with torch.no_grad(), routed_reference(model, ffns, down="down_proj"):
        ref = model(ids, attention_mask=mask, use_cache=False).logits
    assert_close_nonpad(cm(input_ids=ids, attention_mask=mask).logits, ref, mask, EXACT_REWRITE)
    mix = cm.route_stats([{"input_ids": ids, "attention_mask": mask}]).layers
    assert all(sum(f > 0 for f in layer["mix"]) >= 2 for layer in mix)   # the routes are mixed
    onnx = routefx.compile(model, Duo(budget=0.5, router="random", small="nested"), calibration=cal,
                           backend="onnx")
    assert_close_nonpad(onnx(input_ids=ids, attention_mask=mask).logits, ref, mask, ONNX_VS_EAGER)


# --- GPT-OSS experts --------------------------------------------------------------------------------------------


def _gpt_oss() -> nn.Module:
    cfg = hf.GptOssConfig(vocab_size=V, hidden_size=D, intermediate_size=24, num_hidden_layers=2,
                          num_attention_heads=4, num_key_value_heads=2, head_dim=8, num_local_experts=4,
                          num_experts_per_tok=2, layer_types=["sliding_attention", "full_attention"],
                          sliding_window=8, max_position_embeddings=64, swiglu_limit=LIMIT, pad_token_id=0,
                          rope_parameters={"rope_type": "default", "rope_theta": 10000.0})
    cfg._attn_implementation = "eager"
    torch.manual_seed(0)
    model = hf.GptOssForCausalLM(cfg).eval()   # experts and router away from HF's small init, biases included
    redraw_(model, lambda name, p: ".mlp." in name and p.dim() > 1, 0.3)
    return redraw_(model, lambda name, p: ".mlp." in name and p.dim() == 1, 0.5, seed=2)


def test_gpt_oss_experts_compile_to_routed_ffn():
    model = _gpt_oss()
    ids, mask = _inputs()
    ids2, mask2 = _inputs(seed=4, batch=3, seq=14, pad=5)
    for backend, cm in assert_compiles_to_model(model, ids, mask).items():
        with torch.no_grad():
            assert_close_nonpad(cm(ids2, attention_mask=mask2).logits, model(ids2, attention_mask=mask2).logits,
                                mask2, EXACT_REWRITE if backend == "eager" else ONNX_VS_EAGER)
    rep = cm.report.pass_report("raise_moe")
    assert rep.rewrites == 2 and rep.misses == []
    want = f"quick_gelu;gate_max={LIMIT!r};up_limit={LIMIT!r};up_add=1.0"   # x·sigmoid(1.702x): quick_gelu
    for b in cm.ir.blocks:
        assert b.ffn.kind == "moe" and b.ffn.num_experts == 4 and b.ffn.top_k == 2 and b.ffn.has_bias
        assert b.ffn.activation == want and b.ffn.routed == [[e * 24, (e + 1) * 24] for e in range(4)]
    gm = cm.graph_module
    assert not any(gu.is_grouped_mm(n) for n in gm.graph.nodes)
    ops = [n for n in gm.graph.nodes if gu.is_routed(n)]
    assert len(ops) == 2 and all(op.args[6] is not None and op.args[7] is not None for op in ops)  # b_up, b_gate


def test_moe_budget_on_gpt_oss():
    model = _gpt_oss()
    cal = [{"input_ids": _inputs(seed=s, batch=2, seq=16, pad=0)[0]} for s in range(3)]
    ids, mask = _inputs()
    full = routefx.compile(model, MoEBudget(1.0), calibration=cal)
    with torch.no_grad():
        assert_close_nonpad(full(input_ids=ids, attention_mask=mask).logits,
                            model(ids, attention_mask=mask).logits, mask, EXACT_REWRITE)
    half = routefx.compile(model, MoEBudget(0.6), calibration=cal)
    assert half.report.pass_report("adapt_experts").rewrites == 2
    with torch.no_grad():
        out = half(input_ids=ids, attention_mask=mask).logits
    assert torch.isfinite(out).all() and not torch.allclose(out, model(ids, attention_mask=mask).logits)


def test_clamped_units_on_the_triton_interpreter():
    if os.environ.get("TRITON_INTERPRET", "0") in ("", "0"):
        pytest.skip("TRITON_INTERPRET is off (CUDA present): the CPU interpreter tests run where CUDA is hidden")
    from routefx.backends.triton import ffn  # noqa: F401  (registers the op)
    ids, mask = _inputs()
    for model in (_llama(), _gpt_oss()):
        assert_compiles_to_model(model, ids, mask, backends=("triton",))
