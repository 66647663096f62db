"""MoE models in bf16 / fp16 whose router scores in float32: `F.linear(x.float(), w.float())` (DeepSeek-V3, ERNIE-4.5,
GLM-4-MoE and most MoE families of transformers 5). In fp32 those casts keep the dtype and vanish; in half
precision they are real ops on the router's weight and input. The router is kept as captured, so its weight is
read through the cast (only for the expert count), and the experts' input is the value before the router's cast.
Expert products computed through casts are not read (their routed_ffn would compute in another dtype): such a
block stays as captured, with the reason."""
import pytest
import torch
import torch.nn.functional as F
import transformers as hf
from torch import nn

import routefx
from routefx.policies import Dense, MoEBudget
from tests.compare import assert_close_nonpad, padded_ids
from tests.compiler.test_moe_modules import LM, D, V
from tests.tolerances import HALF_VS_HF
from tests.zoo import ZOO, example_inputs, redraw_


def _ernie():
    cfg = hf.Ernie4_5_MoeConfig(vocab_size=112, hidden_size=64, num_hidden_layers=3, num_attention_heads=4,
                                num_key_value_heads=2, intermediate_size=128, moe_intermediate_size=32,
                                moe_num_experts=4, moe_k=2, moe_layer_start_index=1, moe_num_shared_experts=1,
                                max_position_embeddings=64, pad_token_id=0, use_cache=False)
    cfg._attn_implementation = "eager"
    torch.manual_seed(0)
    model = hf.Ernie4_5_MoeForCausalLM(cfg).eval()
    redraw_(model, lambda n, p: ".mlp." in n and p.dim() >= 2, 0.3)      # routes that differ per token
    return model, padded_ids(112, seed=3, batch=2, seq=11, pad=3)


def _deepseek():
    e = ZOO["deepseekv3"]
    args, kw = example_inputs(e, batch=3, seq=9, left_pad=3, seed=5)
    return e.build(), (args[0], kw["attention_mask"])


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("family", ["deepseekv3", "ernie"])
def test_a_float32_router_in_a_half_precision_model_is_read(family, dtype):
    """Every MoE block read and its dispatch raised to routed_ffn, in bf16 and fp16 as in fp32; the output equals
    the model's in that dtype (a few ulps: the raised dispatch sums the experts in another order)."""
    model, (ids, mask) = {"deepseekv3": _deepseek, "ernie": _ernie}[family]()
    model = model.to(dtype)
    with torch.no_grad():
        ref = model(ids, attention_mask=mask).logits
    cm = routefx.compile(model, Dense(), example_inputs=(ids,), example_kwargs={"attention_mask": mask})
    kinds = [b.ffn.kind for b in cm.ir.blocks]
    assert kinds == ["gated", "moe", "moe"], kinds
    raised = cm.report.pass_report("raise_moe")
    assert raised.rewrites == 2 and raised.misses == []
    out = cm(ids, attention_mask=mask).logits
    assert out.dtype == dtype
    assert_close_nonpad(out.float(), ref.float(), mask, HALF_VS_HF)


def test_moe_budget_adapts_a_bfloat16_model():
    model, (ids, mask) = _ernie()
    model = model.to(torch.bfloat16)
    cal = [{"input_ids": i, "attention_mask": m} for i, m in (padded_ids(112, seed=s, batch=3, seq=11, pad=2)
                                                              for s in (7, 8))]
    with torch.no_grad():
        ref = model(ids, attention_mask=mask).logits.float()
    full = routefx.compile(model, MoEBudget(1.0), calibration=cal)
    assert_close_nonpad(full(input_ids=ids, attention_mask=mask).logits.float(), ref, mask, HALF_VS_HF)
    part = routefx.compile(model, MoEBudget(0.6), calibration=cal)
    assert part.report.pass_report("adapt_experts").rewrites == 2
    assert abs(part.plan.budget.realised - 0.6) <= 0.02


class _CastExperts(nn.Module):
    """Top-2 of 4 experts, every expert on every token weighted afterwards; `cast` computes the experts' products
    in float32 (weights and input cast), else only the router does."""

    def __init__(self, d=32, f=48, e=4, cast=False):
        super().__init__()
        self.gate = nn.Linear(d, e, bias=False)
        self.up = nn.ModuleList(nn.Linear(d, f, bias=False) for _ in range(e))
        self.down = nn.ModuleList(nn.Linear(f, d, bias=False) for _ in range(e))
        self.cast = cast

    def forward(self, x):
        h = x.reshape(-1, x.shape[-1])
        scores = F.linear(h.float(), self.gate.weight.float()).softmax(-1)
        w, idx = scores.topk(2, dim=-1)
        out = torch.zeros_like(h, dtype=torch.float32)
        for e, (up, down) in enumerate(zip(self.up, self.down)):
            g = (w * (idx == e)).sum(-1, keepdim=True)
            if self.cast:
                y = F.linear(F.relu(F.linear(h.float(), up.weight.float())), down.weight.float())
            else:
                y = down(F.relu(up(h))).float()
            out = out + g * y
        return out.to(x.dtype).reshape(x.shape)


@pytest.mark.parametrize("cast", [False, True])
def test_experts_computed_through_casts_are_left_as_captured(cast):
    """The router's casts are looked through, the experts' are not: experts whose products run in float32 stay as
    captured with the reason (a routed_ffn over the stored bf16 weights would compute something else)."""
    model = LM(moe=lambda: _CastExperts(D, cast=cast)).eval().to(torch.bfloat16)
    ids = torch.randint(0, V, (2, 9), generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        ref = model(ids).float()
    cm = routefx.compile(model, Dense(), example_inputs=(ids,))
    assert_close_nonpad(cm(ids).float(), ref, None, HALF_VS_HF)
    raised = cm.report.pass_report("raise_moe")
    kinds = [b.ffn.kind for b in cm.ir.blocks]
    if cast:
        assert raised.rewrites == 0 and kinds == ["unknown"] * 2, kinds
        assert "aten.to.dtype" in cm.ir.blocks[0].ffn.reason
    else:
        assert raised.rewrites == 2 and kinds == ["moe"] * 2, (kinds, raised.misses)
