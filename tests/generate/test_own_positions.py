"""Models whose forward takes no position_ids and computes its positions from the cache's length (BART-style
decoders, Whisper, TrOCR, RoFormer, ...): generate with a cache, as their own `generate` does. A model whose
generate feeds each cached step the whole sequence (CPM-Ant's forward slices the cached prefix off itself) runs
uncached, equal to Hugging Face's generate without a cache, and says so; a fixed-shape window (static_cache),
which keeps the cache's length fixed, is refused for models that compute positions themselves."""
import warnings

import pytest
import torch

import routefx
from routefx.generate.graphs import generation_graphs
from routefx.generate.loop import generate_with_stats
from routefx.policies import Dense


def _bart():
    from transformers import BartConfig, BartForCausalLM
    torch.manual_seed(0)
    cfg = BartConfig(vocab_size=97, d_model=32, decoder_layers=2, decoder_attention_heads=4, decoder_ffn_dim=64,
                     encoder_layers=2, encoder_attention_heads=4, encoder_ffn_dim=64, max_position_embeddings=64,
                     pad_token_id=1, bos_token_id=0, eos_token_id=2, decoder_start_token_id=2,
                     forced_eos_token_id=None)
    return BartForCausalLM(cfg).eval()


def _prompt(seq=9, seed=3):
    ids = torch.randint(3, 97, (2, seq), generator=torch.Generator().manual_seed(seed))
    mask = torch.ones_like(ids)
    mask[0, :3] = 0
    return ids, mask


def _hf(model, ids, mask, n):
    with torch.no_grad():
        return model.generate(ids, attention_mask=mask, max_new_tokens=n, do_sample=False)


@pytest.mark.parametrize("backend", ["eager", "onnx"])
def test_a_decoder_that_counts_its_own_positions_generates_with_a_cache(backend):
    model = _bart()
    ids, mask = _prompt()
    cm = routefx.compile(model, Dense(), backend=backend)
    out, stats = generate_with_stats(cm, ids, mask, max_new_tokens=6)
    assert stats.mode == "cached"
    assert not generation_graphs(cm).layout.positions
    assert torch.equal(out, _hf(model, ids, mask, 6))
    if backend == "eager":
        with pytest.raises(routefx.UnsupportedModelError, match=r"static_cache=True .*computes its positions itself"):
            cm.generate(ids, mask, max_new_tokens=3, static_cache=True)
        return
    # the artifact's decode graph reads the past's length for its positions too: its generate equals cm's
    import tempfile
    cm(ids, attention_mask=mask)
    sess = routefx.load(routefx.export(cm, tempfile.mkdtemp() + "/a", generate=True))
    assert torch.equal(torch.as_tensor(sess.generate(ids.numpy(), mask.numpy(), max_new_tokens=6)), out)


def test_a_model_fed_the_whole_sequence_each_step_generates_uncached():
    from transformers import CpmAntConfig, CpmAntForCausalLM
    torch.manual_seed(0)
    model = CpmAntForCausalLM(CpmAntConfig(vocab_size=97, hidden_size=32, num_attention_heads=4, dim_head=8,
                                           dim_ff=64, num_hidden_layers=2, prompt_length=4,
                                           position_bias_max_distance=32)).eval()
    ids = torch.randint(3, 97, (2, 9), generator=torch.Generator().manual_seed(5))
    cm = routefx.compile(model, Dense())
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        out, stats = generate_with_stats(cm, ids, max_new_tokens=5)
    assert stats.mode.startswith("uncached")
    assert any("feeds each cached step the whole sequence" in str(w.message) for w in caught)
    # Hugging Face's reference without its cache: CPM-Ant's own cached path computes other numbers (its segment
    # embedding of the new token, its mask over the cached prefix); here its last two tokens of row 1 differ
    with torch.no_grad():
        want = model.generate(ids, max_new_tokens=5, do_sample=False, use_cache=False)
    assert torch.equal(out, want)
