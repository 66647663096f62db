"""generate honours the model's generation_config (and the same settings passed as arguments) as Hugging Face
`generate` does: greedy token-identical with logits processors on, sampling identical for the same seed, and what
routefx does not do refused by name."""
import pytest
import torch
import transformers

import routefx
from routefx.errors import InputError
from routefx.policies import Dense
from tests.zoo import ZOO

NEW = 10


def _prompt(vocab, seed=3):
    ids = torch.randint(3, vocab, (2, 7), generator=torch.Generator().manual_seed(seed))
    mask = torch.ones_like(ids)
    mask[0, :3] = 0                                   # row 0 left-padded
    return ids, mask


def _hf(model, ids, mask, **kw):
    with torch.no_grad():
        return model.generate(ids, attention_mask=mask, max_new_tokens=NEW, **kw)


@pytest.fixture(scope="module")
def llama():
    model = ZOO["llama"].build()
    ids, mask = _prompt(ZOO["llama"].vocab)
    free = _hf(model, ids, mask, do_sample=False, eos_token_id=[], pad_token_id=0)[:, 7:]     # [2, NEW] plain greedy
    return model, ids, mask, free, routefx.compile(model, Dense())    # the settings are read at each generate


def _cases(free):
    """generation_config settings, each chosen from the plain greedy tokens so that it changes them."""
    return {
        "bart_style": dict(forced_eos_token_id=int(free[0, 4]), no_repeat_ngram_size=2),
        "repetition": dict(repetition_penalty=1.6),
        "banned": dict(bad_words_ids=[[int(free[0, 0])], [int(free[1, 1]), int(free[1, 2])]],
                       suppress_tokens=[int(free[1, 3])], begin_suppress_tokens=[int(free[1, 0])]),
        "min_new_tokens": dict(eos_token_id=[int(free[0, 1]), int(free[1, 1])], min_new_tokens=5),
    }


def _with_config(model, settings):
    saved = {k: getattr(model.generation_config, k) for k in settings}
    for k, v in settings.items():
        setattr(model.generation_config, k, v)
    return saved


@pytest.mark.parametrize("case", ["bart_style", "repetition", "banned", "min_new_tokens"])
def test_greedy_with_generation_config_equals_hf(llama, case):
    model, ids, mask, free, cm = llama
    saved = _with_config(model, _cases(free)[case])
    try:
        ref = _hf(model, ids, mask, do_sample=False)
        out = cm.generate(ids, mask, max_new_tokens=NEW)
    finally:
        _with_config(model, saved)
    assert not torch.equal(ref[:, 7:7 + free.shape[1]], free), "the settings do not change HF's tokens"
    if case == "min_new_tokens":               # an end token at step 1 without it
        assert ref[0, 8] != free[0, 1] and ref[1, 8] != free[1, 1]
    assert torch.equal(out, ref), f"routefx\n{out}\nHugging Face\n{ref}"


def test_all_processors_together_on_onnx(llama):
    model, ids, mask, free, _ = llama
    cm = routefx.compile(model, Dense(), backend="onnx")
    settings = {k: v for c in _cases(free).values() for k, v in c.items()}
    saved = _with_config(model, settings)
    try:
        ref = _hf(model, ids, mask, do_sample=False)
        out = cm.generate(ids, mask, max_new_tokens=NEW)
    finally:
        _with_config(model, saved)
    assert torch.equal(out, ref), f"routefx\n{out}\nHugging Face\n{ref}"


def test_settings_passed_as_arguments_equal_hf(llama):
    model, ids, mask, free, cm = llama
    kw = dict(repetition_penalty=1.4, no_repeat_ngram_size=3, forced_eos_token_id=int(free[1, 2]))
    ref = _hf(model, ids, mask, do_sample=False, **kw)
    assert not torch.equal(ref[:, 7:], free)
    assert torch.equal(cm.generate(ids, mask, max_new_tokens=NEW, **kw), ref)


def test_sampling_equals_hf_for_the_same_seed(llama):
    """Temperature, top-k (transformers' default 50), top-p and the repetition penalty from generate's own
    processors, one multinomial draw from the global stream per step: the same tokens as HF for the same seed."""
    model, ids, mask, free, cm = llama
    kw = dict(do_sample=True, temperature=0.7, top_p=0.9, repetition_penalty=1.2, eos_token_id=[], pad_token_id=0)
    torch.manual_seed(11)
    ref = _hf(model, ids, mask, **kw)
    torch.manual_seed(11)
    out = cm.generate(ids, mask, max_new_tokens=NEW, **kw)
    assert torch.equal(out, ref), f"routefx\n{out}\nHugging Face\n{ref}"
    assert not torch.equal(out[:, 7:], free)


def test_a_bart_style_decoder_with_its_default_generation_config():
    """BlenderbotForCausalLM's own generation_config forces EOS at the last position and forbids repeating the
    prompt's 3-grams (encoder_no_repeat_ngram_size, applied to the prompt in a decoder-only model)."""
    cfg = transformers.BlenderbotConfig(vocab_size=64, d_model=16, encoder_layers=2, decoder_layers=2,
                                        encoder_attention_heads=2, decoder_attention_heads=2, encoder_ffn_dim=32,
                                        decoder_ffn_dim=32, max_position_embeddings=64, is_decoder=True)
    cfg.is_encoder_decoder = False                   # the decoder alone, as the causal-LM class is used
    torch.manual_seed(0)
    model = transformers.BlenderbotForCausalLM(cfg).eval()
    gc = model.generation_config
    assert gc.forced_eos_token_id is not None and gc.encoder_no_repeat_ngram_size
    ids, mask = _prompt(64, seed=4)
    out = routefx.compile(model, Dense()).generate(ids, mask, max_new_tokens=NEW)
    ref = _hf(model, ids, mask, do_sample=False)
    assert torch.equal(out, ref), f"routefx\n{out}\nHugging Face\n{ref}"
    assert (ref[:, 7:] == gc.forced_eos_token_id).any(1).all()     # an end token in every row, forced at the latest


@pytest.mark.parametrize("where,setting,match", [
    ("config", dict(num_beams=4), r"num_beams=4 \(beam search, from the model generation_config\)"),
    ("call", dict(num_return_sequences=2, do_sample=True), r"num_return_sequences=2 \(several sequences per prompt, from the call"),
    ("call", dict(stop_strings=["x"]), r"stop_strings=\['x'\] \(stopping at strings"),
    ("call", dict(token_type_ids=torch.zeros(2, 7, dtype=torch.long)), r"unknown generation argument.*token_type_ids"),
])
def test_what_routefx_does_not_do_is_refused_by_name(llama, where, setting, match):
    model, ids, mask, _, cm = llama
    saved = _with_config(model, setting) if where == "config" else {}
    try:
        with pytest.raises(InputError, match=match):
            cm.generate(ids, mask, max_new_tokens=3, **({} if where == "config" else setting))
        if where == "config":     # the neutral value passed to generate overrides the model's
            assert cm.generate(ids, mask, max_new_tokens=3, num_beams=1).shape == (2, 10)
    finally:
        _with_config(model, saved)


def test_speculative_decoding_refuses_a_config_with_processors(llama):
    """Self-speculative decoding accepts drafts equal to plain greedy tokens: with processors it would differ."""
    from routefx.generate import speculative_generate
    model, ids, mask, _, cm = llama
    saved = _with_config(model, dict(no_repeat_ngram_size=2))
    try:
        with pytest.raises(InputError, match=r"logits processors \['NoRepeatNGramLogitsProcessor'\]"):
            speculative_generate(cm, cm, ids, mask, max_new_tokens=3)
    finally:
        _with_config(model, saved)
    out, _ = speculative_generate(cm, cm, ids, mask, max_new_tokens=3, eos_token_id=[])
    assert out.shape == (2, 10)
