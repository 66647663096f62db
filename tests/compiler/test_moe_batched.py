"""MoE blocks whose experts run on every token as captured: two batched products over stacked [E, in, out] weights,
each expert's input weighted by a score that is zero off the token's top-k choice (Llama 4's text MoE). RaiseMoE
runs each token's chosen experts only (one routed_ffn row per (token, expert) pair); the model's function is kept
on every backend, and blocks where an unchosen expert would still contribute are left as captured, with the reason.
"""
import pytest
import torch
import transformers as hf
from torch import nn

import routefx
from routefx.ir import graph_utils as gu
from routefx.policies import Dense
from tests.compare import assert_compiles_to_model
from tests.tolerances import ONNX_VS_EAGER
from tests.zoo import redraw_

E = 4


def _llama4(top_k: int) -> nn.Module:
    """Four layers, MoE in layers 1 and 3 (dense MLPs between), shared experts, experts re-drawn away from 0."""
    cfg = hf.Llama4TextConfig(vocab_size=97, hidden_size=32, intermediate_size=24, intermediate_size_mlp=40,
                              num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=2, head_dim=8,
                              num_local_experts=E, num_experts_per_tok=top_k, interleave_moe_layer_step=2,
                              max_position_embeddings=128, pad_token_id=0)
    cfg._attn_implementation = "sdpa"
    torch.manual_seed(0)
    model = hf.Llama4ForCausalLM(cfg).eval()
    return redraw_(model, lambda name, p: "experts." in name or "router" in name, 0.3)


def _inputs():
    g = torch.Generator().manual_seed(3)
    ids = torch.randint(1, 97, (2, 11), generator=g)
    mask = torch.ones_like(ids)
    mask[0, :3] = 0
    return ids, mask


@pytest.mark.parametrize("top_k", [1, 2])
def test_batched_experts_run_the_chosen_experts_only(top_k):
    model = _llama4(top_k)
    ids, mask = _inputs()
    cm = assert_compiles_to_model(model, ids, mask)["onnx"]
    rep = cm.report.pass_report("raise_moe")
    assert rep.rewrites == 2 and rep.misses == []
    assert any("every expert on every token" in n for n in rep.notes)
    moe = [b for b in cm.ir.blocks if b.ffn.kind == "moe"]
    assert [b.index for b in moe] == [1, 3]
    assert all(b.ffn.num_experts == E and b.ffn.top_k == top_k and b.ffn.routed == [[e * 24, (e + 1) * 24]
                                                                                   for e in range(E)] for b in moe)
    assert all(b.ffn.shared_expert_size == 24 for b in moe)
    gm = cm.graph_module
    assert not any(n.target is torch.ops.aten.bmm.default for n in gm.graph.nodes)
    ops = [n for n in gm.graph.nodes if gu.is_routed(n) and len(n.args[9]) == 2 * E]
    assert len(ops) == 2
    for op in ops:   # one row per (token, chosen expert), one route each, the weight on the row, no output gate
        assert op.args[2] is None and gu.val(op.args[1]).shape[-1] == 1
    # FLOPs: the captured experts cost E expert FFNs per token, the compiled ones K
    f = cm.report.flops_per_token
    expert = 2 * 3 * 32 * 24                                   # one expert FFN per token: gate, up, down
    assert f["before"] - f["after"] == pytest.approx(2 * (E - top_k) * expert, rel=1e-9)


def test_batched_experts_on_the_triton_interpreter():
    import os
    if os.environ.get("TRITON_INTERPRET", "0") in ("", "0"):
        pytest.skip("TRITON_INTERPRET is off (CUDA present): the CPU interpreter tests run where CUDA is hidden")
    from routefx.backends.triton import ffn  # noqa: F401  (registers the op)
    assert_compiles_to_model(_llama4(2), *_inputs(), backends=("triton",))


class _BatchedMoE(nn.Module):
    """A stand-alone batched-experts block: `scores` decides whether unchosen experts get weight 0."""

    def __init__(self, d=16, f=12, experts=4, k=2, scores="scatter", act=nn.SiLU()):
        super().__init__()
        self.router = nn.Linear(d, experts, bias=False)
        self.gate_up = nn.Parameter(torch.randn(experts, d, 2 * f) * 0.3)
        self.down = nn.Parameter(torch.randn(experts, f, d) * 0.3)
        self.k, self.scores, self.act = k, scores, act

    def forward(self, x):
        h = x.reshape(-1, x.shape[-1])
        logits = self.router(h)
        val, idx = torch.topk(logits, self.k, dim=1)
        # "zero_fill": the unchosen experts' scores are 0, their weights sigmoid(0) = 1/2: nothing may be dropped
        fill = float("-inf") if self.scores == "scatter" else 0.0
        s = torch.sigmoid(torch.full_like(logits, fill).scatter(1, idx, val))
        rows = h.repeat(s.shape[1], 1) * s.transpose(0, 1).reshape(-1, 1)
        gate, up = torch.bmm(rows.view(s.shape[1], -1, h.shape[-1]), self.gate_up).chunk(2, dim=-1)
        y = torch.bmm(up * self.act(gate), self.down).view(-1, h.shape[-1])
        return y.view(s.shape[1], -1, h.shape[-1]).sum(0).view(x.shape)


class _Stack(nn.Module):
    def __init__(self, **kw):
        super().__init__()
        torch.manual_seed(0)
        self.emb = nn.Embedding(50, 16)
        self.attn = nn.MultiheadAttention(16, 2, batch_first=True)
        self.n1, self.n2 = nn.LayerNorm(16), nn.LayerNorm(16)
        self.moe = _BatchedMoE(**kw)
        self.head = nn.Linear(16, 50)

    def forward(self, input_ids):
        x = self.emb(input_ids)
        a = self.n1(x)
        S = x.shape[1]
        causal = torch.triu(torch.ones(S, S, dtype=torch.bool), 1)
        x = x + self.attn(a, a, a, attn_mask=causal, need_weights=False)[0]
        x = x + self.moe(self.n2(x))
        return self.head(x)


@pytest.mark.parametrize("case", ["scatter", "zero_fill"])
def test_a_written_batched_block(case):
    """The same structure written by hand is read by shape, not by name; where the unchosen experts' weights are
    not 0 every expert contributes, so the block stays as captured with the reason, and the compiled model still
    equals the model."""
    model = _Stack(scores=case).eval()
    ids = torch.randint(0, 50, (2, 9), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        ref = model(ids)
    cm = routefx.compile(model, Dense(), example_inputs=(ids,), backend="onnx")
    torch.testing.assert_close(cm(ids), ref, rtol=0, atol=ONNX_VS_EAGER)
    rep = cm.report.pass_report("raise_moe")
    if case == "scatter":
        assert rep.rewrites == 1 and rep.misses == []
    else:
        assert rep.rewrites == 0 and "every expert contributes" in rep.misses[0]["reason"]


def test_moe_budget_says_why_it_cannot_adapt_input_weighted_experts():
    model = _llama4(2)
    with pytest.raises(routefx.PolicyError, match=r"MoEBudget: the MoE blocks \[1, 3\] weight each chosen "
                                                  r"expert's input"):
        routefx.compile(model, routefx.policies.MoEBudget(0.75), calibration=[torch.randint(1, 97, (2, 8))])
