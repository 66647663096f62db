"""A model whose code takes one new token per cached step (ProphetNet's decoder asserts it) generates with a
cache: its decode graph is captured on one token, as a recurrent model's is, and speculative decoding (which
verifies several drafted tokens in one step) is refused with the reason. Its step also checks
`(x == y).all()` at run time (`aten._is_all_true`, lowered for ONNX)."""
import pytest
import torch

import routefx
from routefx.generate.graphs import generation_graphs
from routefx.generate.loop import generate_with_stats
from routefx.generate.speculative import speculative_generate
from routefx.policies import Dense


def _prophetnet():
    from transformers import ProphetNetConfig, ProphetNetForCausalLM
    torch.manual_seed(0)
    cfg = ProphetNetConfig(vocab_size=97, hidden_size=32, decoder_ffn_dim=64, num_decoder_layers=1,
                           num_decoder_attention_heads=4, encoder_ffn_dim=64, num_encoder_layers=2,
                           num_encoder_attention_heads=4, max_position_embeddings=64, ngram=2, num_buckets=16,
                           relative_max_distance=32, is_decoder=True, add_cross_attention=False,
                           is_encoder_decoder=False, pad_token_id=0, bos_token_id=1, eos_token_id=2)
    return ProphetNetForCausalLM(cfg).eval()


def test_a_model_that_takes_one_token_per_cached_step_generates_with_a_cache():
    model = _prophetnet()
    ids = torch.randint(3, 97, (2, 9), generator=torch.Generator().manual_seed(3))
    mask = torch.ones_like(ids)
    mask[0, :3] = 0
    cm = routefx.compile(model, Dense(), backend="onnx")
    out, stats = generate_with_stats(cm, ids, mask, max_new_tokens=6)
    assert stats.mode == "cached"
    assert generation_graphs(cm).one_token
    with torch.no_grad():
        want = model.generate(ids, attention_mask=mask, max_new_tokens=6, do_sample=False)
    assert torch.equal(out, want)
    with pytest.raises(routefx.UnsupportedModelError, match="takes one new token per cached step"):
        speculative_generate(cm, cm, ids, mask, max_new_tokens=4, n=2)
