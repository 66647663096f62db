"""complex_to_real (routefx/backends/complex_to_real.py): complex-valued subgraphs computed on (re, im) pairs, so
that the onnx backend runs models that apply rotary embeddings with complex numbers (DeepSeek-V2, Llama 4).

The references: torch's own complex arithmetic (the captured graph run as it is) for the rewrite, and the Hugging
Face models' forward and `generate` for the ONNX backend."""
import pytest
import torch
from torch import nn
from torch.export import Dim

import routefx
from routefx.backends.complex_to_real import complex_to_real, has_complex
from routefx.policies import Dense, Duo
from tests.compare import assert_close_nonpad, max_abs_nonpad
from tests.tolerances import EXACT_REWRITE, MUST_DIFFER, ONNX_VS_EAGER


class _ComplexOps(nn.Module):
    """Every rule of the rewrite once, on odd sizes: x [B, S, 6] real."""

    def __init__(self):
        super().__init__()
        self.register_buffer("table", torch.polar(torch.rand(5, 3) + 0.5, torch.randn(5, 3)))  # complex weight

    def forward(self, x):
        b, s, _ = x.shape
        z = torch.view_as_complex(x.reshape(b, s, 3, 2))                       # [B, S, 3] complex
        theta = torch.arange(s, dtype=torch.float32)[:, None] * torch.tensor([1.0, 0.3, 0.07])
        f = torch.polar(torch.ones_like(theta), theta).to(torch.complex64)     # [S, 3]
        f = f[None, :, None, :].expand(b, s, 1, 3)[:, :, 0]                    # unsqueeze, expand, select
        y = z * f * 2.0 + z.conj() - torch.complex(x[..., :3], x[..., 3:]) / (f + 0.5)
        y = y - 1.5 * x[..., :3] + y * x[..., 3:]                              # with real tensors and scalars
        y = torch.cat([y, -y.transpose(0, 1).permute(1, 0, 2)], dim=-1)        # [B, S, 6]
        y = y.unsqueeze(2).flatten(2, 3)[..., 1:5] + self.table[:4, :1].reshape(1, 1, 4)
        parts = torch.stack([y.real, y.imag, y.abs(), y.angle()], -1).flatten(2)
        w = torch.view_as_real(y.sum(-1, keepdim=True) * z.mean(-1, keepdim=True)).flatten(2)
        return torch.cat([parts, w, torch.view_as_real(y).reshape(b, s, -1)], -1)


def _export(module, x):
    dims = ({0: Dim("b", min=1, max=64), 1: Dim("s", min=2, max=64)},)
    return torch.export.export(module, (x,), dynamic_shapes=dims, strict=False).module()


def test_the_rewrite_computes_what_torch_complex_arithmetic_computes():
    torch.manual_seed(0)
    gm = _export(_ComplexOps().eval(), torch.randn(2, 7, 6))
    new, rewrites = complex_to_real(gm)
    assert has_complex(gm) and not has_complex(new)
    assert rewrites > 20                         # every complex node of the graph, one by one
    assert not any(isinstance(t, torch.Tensor) and t.is_complex() for t in (*new.parameters(), *new.buffers()))
    for shape in ((2, 7, 6), (3, 5, 6)):         # other batch and sequence sizes
        x = torch.randn(shape)
        assert (new(x) - gm(x)).abs().max().item() <= EXACT_REWRITE
    assert has_complex(gm)                       # the graph it was given is left unchanged


def test_a_graph_without_complex_values_is_returned_as_it_is():
    gm = _export(nn.Sequential(nn.Linear(6, 4), nn.SiLU()).eval(), torch.randn(2, 7, 6))
    assert complex_to_real(gm) == (gm, 0)


class _ComplexExp(nn.Module):
    def forward(self, x):
        z = torch.view_as_complex(x.reshape(*x.shape[:-1], -1, 2))
        return torch.view_as_real(torch.exp(z)).flatten(-2)


class _ComplexOut(nn.Module):
    def forward(self, x):
        return torch.view_as_complex(x.reshape(*x.shape[:-1], -1, 2))


@pytest.mark.parametrize("module,match", [
    (_ComplexExp(), r"node exp \(exp\.default, in the model's top level\) takes or makes complex values: the "
                    r"complex-to-real rewrite before ONNX lowering supports view_as_complex, .*backend 'eager'"),
    (_ComplexOut(), r"node view_as_complex .* is a complex output of the graph"),
])
def test_complex_ops_without_a_rule_are_refused_by_name(module, match):
    gm = _export(module, torch.randn(2, 7, 6))
    with pytest.raises(routefx.BackendError, match=match):
        complex_to_real(gm)


# ---- Hugging Face families with complex rotary embeddings, on the onnx backend ----------------------------------

_TINY = dict(vocab_size=112, hidden_size=64, intermediate_size=128, num_hidden_layers=1, num_attention_heads=4,
             max_position_embeddings=256, pad_token_id=0, bos_token_id=1, eos_token_id=2, tie_word_embeddings=False)


def _deepseek_v2():
    from transformers import DeepseekV2Config, DeepseekV2ForCausalLM
    cfg = DeepseekV2Config(**_TINY, num_key_value_heads=4, head_dim=8, qk_rope_head_dim=8, qk_nope_head_dim=8,
                           v_head_dim=16, q_lora_rank=16, kv_lora_rank=16, n_routed_experts=4, num_experts_per_tok=2,
                           n_shared_experts=1, moe_intermediate_size=32, n_group=1, topk_group=1,
                           first_k_dense_replace=1)
    return _build(DeepseekV2ForCausalLM, cfg)


def _llama4_text():
    from transformers import Llama4ForCausalLM, Llama4TextConfig
    cfg = Llama4TextConfig(**_TINY, num_key_value_heads=2, head_dim=16, intermediate_size_mlp=128,
                           num_local_experts=4, num_experts_per_tok=1)
    return _build(Llama4ForCausalLM, cfg)


def _build(cls, cfg):
    torch.manual_seed(0)
    model = cls(cfg).eval().float()
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():   # routers initialised to a constant tie every expert: random values instead
        for p in model.parameters():
            if p.dim() >= 2 and bool((p == p.flatten()[0]).all()):
                p.copy_(0.02 * torch.randn(p.shape, generator=g))
    return model


def _inputs(seed, batch=2, seq=9, pad=3):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, 112, (batch, seq), generator=g)
    mask = torch.ones_like(ids)
    mask[0, :pad] = 0
    return ids, mask


def _hf(model, ids, mask):
    with torch.no_grad():
        return model(input_ids=ids, attention_mask=mask, use_cache=False)


def test_deepseek_v2_dense_and_duo_on_onnx():
    model = _deepseek_v2()
    ids, mask = _inputs(1)
    cm = routefx.compile(model, Dense(), example_inputs=(ids,), example_kwargs={"attention_mask": mask},
                         backend="onnx")
    assert any("complex_to_real" in note for note in cm.report.notes), cm.report.notes
    ids, mask = _inputs(2, seq=11)
    assert_close_nonpad(cm(ids, attention_mask=mask), _hf(model, ids, mask), mask, ONNX_VS_EAGER)

    cal = [dict(zip(("input_ids", "attention_mask"), _inputs(40 + i, batch=3))) for i in range(2)]
    duo = routefx.compile(model, Duo(budget=0.5, small="nested"), calibration=cal)
    assert duo.plan.layers                       # some FFN is routed
    duo_onnx = routefx.compile(model, duo.plan, backend="onnx")
    ids, mask = _inputs(3)
    ref = duo(ids, attention_mask=mask)
    assert_close_nonpad(duo_onnx(ids, attention_mask=mask), ref, mask, ONNX_VS_EAGER)
    assert max_abs_nonpad(ref, _hf(model, ids, mask), mask) > MUST_DIFFER   # routing changed the output


def test_llama4_text_dense_and_greedy_generate_on_onnx():
    model = _llama4_text()
    ids, mask = _inputs(1)
    cm = routefx.compile(model, Dense(), backend="onnx")
    assert_close_nonpad(cm(ids, attention_mask=mask), _hf(model, ids, mask), mask, ONNX_VS_EAGER)
    ids, mask = _inputs(5, seq=7)
    out = cm.generate(ids, mask, max_new_tokens=6, do_sample=False)
    with torch.no_grad():
        ref = model.generate(ids, attention_mask=mask, max_new_tokens=6, do_sample=False)
    assert torch.equal(out, ref), f"routefx\n{out}\nHugging Face\n{ref}"
