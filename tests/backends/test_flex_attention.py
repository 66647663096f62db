"""Masked SDPA as block-sparse FlexAttention (`routefx/backends/triton/attention.py`).

The block tensors are checked against torch's own `create_block_mask` (which evaluates the mask function tile by
tile): eager `flex_attention` on CPU ignores them (it evaluates the mask function everywhere), so only that
comparison shows a wrong tile. The attention itself is checked against SDPA with the boolean mask, and the
lowered model against the eager backend; on CUDA (Inductor's FlexAttention kernel, which does skip tiles) against
the same graph lowered with SDPA.
"""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch.nn.attention.flex_attention import create_block_mask

import routefx
from routefx.backends.triton import attention as fa
from routefx.backends.triton import backend as tb
from tests.compare import assert_close_nonpad, graph_kwargs, max_abs_nonpad
from tests.tolerances import TRITON_BF16_VS_EAGER, TRITON_VS_EAGER

pytestmark = pytest.mark.filterwarnings("ignore:flex_attention called without torch.compile")
needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


def _mask(kind: str, b: int, h: int, sq: int, skv: int, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    q = torch.arange(sq)[:, None] + (skv - sq)  # queries are the last sq positions
    kv = torch.arange(skv)[None, :]
    pad = torch.ones(b, skv, dtype=torch.bool)
    pad[-1, :37] = False                      # the last row is left-padded
    causal = kv <= q
    if kind == "causal_pad":
        return causal[None, None] & pad[:, None, None, :]
    if kind == "sliding_pad":
        return (causal & (kv > q - 100))[None, None] & pad[:, None, None, :]
    if kind == "bidirectional_pad":
        return pad[:, None, None, :].expand(b, 1, sq, skv)
    if kind == "per_head_random":
        return torch.rand(b, h, sq, skv, generator=g) < 0.3
    if kind == "shared_causal":              # one mask for the whole batch, 2-D
        return causal
    raise ValueError(kind)


KINDS = ["causal_pad", "sliding_pad", "bidirectional_pad", "per_head_random", "shared_causal"]


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("sq,skv", [(300, 300), (256, 400), (511, 511)])
def test_block_tensors_equal_torch_create_block_mask(kind, sq, skv):
    b, h = 2, 4
    mask = _mask(kind, b, h, sq, skv)
    q, k = torch.empty(b, h, sq, 8), torch.empty(b, h, skv, 8)
    m, kv_num, kv_idx, full_num, full_idx = fa.mask_blocks(mask, q, k)
    m4 = mask.reshape((1,) * (4 - mask.dim()) + tuple(mask.shape))
    per_b, per_h = m4.shape[0] > 1, m4.shape[1] > 1
    ref = create_block_mask(lambda bi, hi, qi, ki: m4[bi if per_b else 0, hi if per_h else 0, qi, ki],
                            m4.shape[0], m4.shape[1], sq, skv, device="cpu")
    assert torch.equal(kv_num, ref.kv_num_blocks) and torch.equal(full_num, ref.full_kv_num_blocks)
    for num, idx, rnum, ridx in ((kv_num, kv_idx, ref.kv_num_blocks, ref.kv_indices),
                                 (full_num, full_idx, ref.full_kv_num_blocks, ref.full_kv_indices)):
        for pos in torch.cartesian_prod(*(torch.arange(s) for s in num.shape)).tolist():
            n = int(num[tuple(pos)])
            assert sorted(idx[tuple(pos)][:n].tolist()) == sorted(ridx[tuple(pos)][:n].tolist()), (pos, n)
    assert torch.equal(m, m4)


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("gqa", [False, True])
def test_flex_sdpa_equals_sdpa_with_the_mask(kind, gqa):
    b, h, sq, skv, d = 2, 4, 300, 300, 32
    g = torch.Generator().manual_seed(1)
    q = torch.randn(b, h, sq, d, generator=g)
    k, v = (torch.randn(b, h // 2 if gqa else h, skv, d, generator=g) for _ in range(2))
    mask = _mask(kind, b, h, sq, skv)
    ref = F.scaled_dot_product_attention(q, k, v, mask, scale=0.3, enable_gqa=gqa)
    out = fa.flex_sdpa(q, k, v, mask, fa.mask_blocks(mask, q, k), scale=0.3, enable_gqa=gqa)
    rows = mask.reshape((1,) * (4 - mask.dim()) + tuple(mask.shape)).expand(b, h, sq, skv).any(-1)
    assert (out - ref)[rows].abs().max() < 1e-5   # rows with no allowed key: pad queries, SDPA gives NaN/0
    # short lengths keep SDPA (the block tensors are None)
    qs, ks, vs = q[:, :, :100], k[:, :, :100], v[:, :, :100]
    ms = mask[..., :100, :100]
    assert fa.mask_blocks(ms, qs, ks) is None
    assert torch.equal(fa.flex_sdpa(qs, ks, vs, ms, None, scale=0.3, enable_gqa=gqa),
                       F.scaled_dot_product_attention(qs, ks, vs, ms, scale=0.3, enable_gqa=gqa))


def _llama(layers=2):
    from transformers import LlamaConfig, LlamaForCausalLM
    torch.manual_seed(0)
    cfg = LlamaConfig(hidden_size=128, intermediate_size=256, num_hidden_layers=layers, num_attention_heads=4,
                      num_key_value_heads=2, vocab_size=101, max_position_embeddings=1024)
    return LlamaForCausalLM(cfg).eval()


def _inputs(seq, device="cpu"):
    g = torch.Generator().manual_seed(3)
    ids = torch.randint(1, 101, (2, seq), generator=g)
    mask = torch.ones(2, seq, dtype=torch.long)
    mask[0, :37] = 0
    return {"input_ids": ids.to(device), "attention_mask": mask.to(device)}


@pytest.mark.skipif(tb.unavailable_reason(torch.device("cpu")) is not None,
                    reason="the triton backend on CPU needs TRITON_INTERPRET=1 (set where CUDA is absent)")
def test_lowered_llama_with_flex_attention_equals_eager_backend():
    model = _llama()
    cm = routefx.compile(model, routefx.policies.Dense(), backend="triton",
                         backend_options={"flex_attention": True})
    for seq in (300, 13):  # 13: the rewritten graph keeps SDPA for short lengths
        kw = _inputs(seq)
        out = cm(**kw).logits
        gkw = graph_kwargs(cm.graph_module, (), kw)
        with torch.no_grad():
            ref = cm.graph_module(**gkw).logits
        assert_close_nonpad(out, ref, kw["attention_mask"], TRITON_VS_EAGER)
    assert cm.runner.stats.flex_attentions == 2
    plain = routefx.compile(model, routefx.policies.Dense(), backend="triton")  # off by default
    plain(**_inputs(300))
    assert plain.runner.stats.flex_attentions == 0


@pytest.mark.skipif(tb.unavailable_reason(torch.device("cpu")) is not None,
                    reason="the triton backend on CPU needs TRITON_INTERPRET=1 (set where CUDA is absent)")
def test_inductor_compiles_the_flex_graph_on_cpu():
    """The lowered graph with FlexAttention compiled by Inductor (its CPU FlexAttention template, which reads the
    block tensors and the materialised mask as a compiled kernel does) equals the eager backend, left padding
    included, with no fallback to SDPA."""
    model = _llama()
    cm = routefx.compile(model, routefx.policies.Dense(), backend="triton",
                         backend_options={"flex_attention": True, "inductor": True})
    kw = _inputs(300)
    out = cm(**kw).logits
    gkw = graph_kwargs(cm.graph_module, (), kw)
    with torch.no_grad():
        ref = cm.graph_module(**gkw).logits
    assert_close_nonpad(out, ref, kw["attention_mask"], TRITON_VS_EAGER)
    assert cm.runner.mode == "inductor-interpreter" and cm.runner.stats.flex_attentions == 2
    assert cm.runner.flex_fallback is None, cm.runner.flex_fallback


@pytest.mark.skipif(tb.unavailable_reason(torch.device("cpu")) is not None,
                    reason="the triton backend on CPU needs TRITON_INTERPRET=1 (set where CUDA is absent)")
def test_a_flex_graph_that_fails_falls_back_to_sdpa_with_a_warning():
    """FlexAttention's compile support differs between torch releases: a failure of the flex graph (here a
    stand-in compile error) re-lowers with SDPA, warns, and says so in the runner."""
    model = _llama()
    kw = _inputs(300)
    cm = routefx.compile(model, routefx.policies.Dense(), backend="triton", example_inputs=(), example_kwargs=kw)
    gkw = graph_kwargs(cm.graph_module, (), kw)
    run = tb.prepare(cm.graph_module, gkw, flex_attention=True)
    assert run.stats.flex_attentions == 2

    def broken(*a, **k):
        raise RuntimeError("stand-in for an Inductor lowering error")
    run.compiled = broken
    run._without_flex = lambda: (lambda lowered, stats: (lowered, stats, lowered))(*tb.lower(cm.graph_module))
    with pytest.warns(RuntimeWarning, match="failed .RuntimeError: stand-in.*running attention as SDPA"):
        out = run(**gkw).logits
    assert run.stats.flex_attentions == 0 and "stand-in" in run.flex_fallback and "flex_fallback" in repr(run)
    with torch.no_grad():
        ref = cm.graph_module(**gkw).logits
    assert_close_nonpad(out, ref, kw["attention_mask"], TRITON_VS_EAGER)


@pytest.mark.cuda
@needs_cuda
@pytest.mark.parametrize("policy", [routefx.policies.Dense(),
                                    routefx.policies.Duo(budget=0.5, router="random", small="nested")],
                         ids=["dense", "duo"])
def test_llama_cuda_flex_attention_equals_sdpa(policy):
    """On CUDA in bf16 with flex_attention=True the triton backend runs masked attention as FlexAttention: the
    same graph lowered with SDPA (flex_attention=False) gives the same logits (bf16 tolerance) at every non-pad
    position, at a length of several tiles with left padding, and at a short length (SDPA kept)."""
    model = _llama(layers=3).to(device="cuda", dtype=torch.bfloat16)
    cal = [_inputs(300, "cuda")]
    cm = routefx.compile(model, policy, calibration=cal, backend="triton",
                         backend_options={"flex_attention": True})
    sdpa = None
    for seq in (700, 40):
        kw = _inputs(seq, "cuda")
        out = cm(**kw).logits
        gkw = graph_kwargs(cm.graph_module, (), kw)
        sdpa = sdpa or tb.prepare(cm.graph_module, gkw, flex_attention=False)
        ref = sdpa(**gkw).logits
        err = max_abs_nonpad(out, ref, kw["attention_mask"])
        assert err <= TRITON_BF16_VS_EAGER * max(1.0, float(ref.abs().max())), (seq, err)
    assert cm.runner.flex_fallback is None, cm.runner.flex_fallback
    assert cm.runner.stats.flex_attentions == 3 and sdpa.stats.flex_attentions == 0
