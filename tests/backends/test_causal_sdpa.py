"""Masked SDPA that takes the causal kernel when the mask is causal (`routefx/backends/causal_sdpa.py`): the two
ops against SDPA with the mask itself, and the inductor / triton backends with the option against the eager
backend, padded (the masked path) and unpadded (the causal path)."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

import routefx
from routefx.backends import causal_sdpa as cs
from routefx.backends.triton import backend as tb
from tests.backends.test_flex_attention import _inputs, _llama
from tests.compare import assert_close_nonpad, graph_kwargs, max_abs_nonpad
from tests.tolerances import INDUCTOR_VS_EAGER, TRITON_BF16_VS_EAGER, TRITON_VS_EAGER

needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


def _masks(b=2, s=40):
    tri = torch.ones(s, s, dtype=torch.bool).tril()
    pad = torch.ones(b, s, dtype=torch.bool)
    pad[1, :5] = False
    q = torch.arange(s)[:, None]
    kv = torch.arange(s)[None, :]
    return {
        "causal": (tri[None, None].expand(b, 1, s, s), True),
        "causal_2d": (tri, True),
        "padded": (tri[None, None] & pad[:, None, None, :], False),
        "sliding": (((kv <= q) & (kv > q - 8))[None, None].expand(b, 1, s, s), False),
        "bidirectional": (torch.ones(b, 1, s, s, dtype=torch.bool), False),
        "non_square": (torch.ones(s - 1, s, dtype=torch.bool).tril(1), False),
    }


@pytest.mark.parametrize("name", list(_masks()))
def test_the_ops_equal_sdpa_with_the_mask(name):
    mask, causal = _masks()[name]
    assert bool(cs.mask_is_causal(mask)) is causal
    g = torch.Generator().manual_seed(0)
    sq, skv = mask.shape[-2], mask.shape[-1]
    q = torch.randn(2, 4, sq, 16, generator=g)
    k, v = (torch.randn(2, 2, skv, 16, generator=g) for _ in range(2))
    ref = F.scaled_dot_product_attention(q, k, v, mask, scale=0.3, enable_gqa=True)
    out = cs.sdpa_causal_if(q, k, v, mask, cs.mask_is_causal(mask), 0.3, True)
    assert out.is_contiguous() and (out - ref).abs().max() < 1e-5
    # a wrong flag would show: the causal kernel on a padded mask differs
    if name == "padded":
        wrong = cs.sdpa_causal_if(q, k, v, mask, torch.tensor(True), 0.3, True)
        assert (wrong - ref).abs().max() > 1e-3


def test_inductor_backend_with_the_causal_check_equals_eager():
    model = _llama()
    cm = routefx.compile(model, routefx.policies.Dense(), backend="inductor",
                         backend_options={"causal_check": True})
    unpadded = {**_inputs(300), "attention_mask": torch.ones(2, 300, dtype=torch.long)}
    for kw in (_inputs(300), unpadded):     # padded; unpadded (one shape: inductor compiles once)
        out = cm(**kw).logits
        with torch.no_grad():
            ref = cm.graph_module(**graph_kwargs(cm.graph_module, (), kw)).logits
        assert_close_nonpad(out, ref, kw["attention_mask"], INDUCTOR_VS_EAGER)
    assert cm.runner.causal_checks == 2


@pytest.mark.skipif(tb.unavailable_reason(torch.device("cpu")) is not None,
                    reason="the triton backend on CPU needs TRITON_INTERPRET=1 (set where CUDA is absent)")
def test_triton_backend_with_the_causal_check_equals_eager():
    model = _llama()
    cm = routefx.compile(model, routefx.policies.Dense(), backend="triton", backend_options={"causal_check": True})
    for kw in (_inputs(300), {k: v[1:] for k, v in _inputs(200).items()}):
        out = cm(**kw).logits
        with torch.no_grad():
            ref = cm.graph_module(**graph_kwargs(cm.graph_module, (), kw)).logits
        assert_close_nonpad(out, ref, kw["attention_mask"], TRITON_VS_EAGER)
    assert cm.runner.stats.causal_checks == 2


@pytest.mark.cuda
@needs_cuda
def test_llama_cuda_causal_check_equals_masked_sdpa():
    model = _llama(layers=3).to(device="cuda", dtype=torch.bfloat16)
    cm = routefx.compile(model, routefx.policies.Dense(), backend="triton", backend_options={"causal_check": True})
    plain = None
    for kw in (_inputs(700, "cuda"), {k: v[1:] for k, v in _inputs(700, "cuda").items()}):
        out = cm(**kw).logits
        gkw = graph_kwargs(cm.graph_module, (), kw)
        plain = plain or tb.prepare(cm.graph_module, gkw)
        ref = plain(**gkw).logits
        err = max_abs_nonpad(out, ref, kw["attention_mask"])
        assert err <= TRITON_BF16_VS_EAGER * max(1.0, float(ref.abs().max())), err
    assert cm.runner.stats.causal_checks == 3
