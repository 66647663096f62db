"""The loop's contract apart from the graphs: streaming, sampling, uncached models, refusals."""
import pytest
import torch

import routefx
from routefx.errors import InputError
from routefx.generate import generate_with_stats
from routefx.generate.sampling import Sampler
from routefx.policies import Dense
from tests.zoo import ZOO


class _Recorder:
    def __init__(self):
        self.puts, self.ended = [], 0

    def put(self, t):
        self.puts.append(t.clone())

    def end(self):
        self.ended += 1


@pytest.fixture(scope="module")
def llama():
    entry = ZOO["llama"]
    return entry, routefx.compile(entry.build(), Dense())


def test_streamer_sees_the_prompt_then_each_token(llama):
    entry, cm = llama
    ids = torch.randint(3, entry.vocab, (1, 5), generator=torch.Generator().manual_seed(0))
    rec = _Recorder()
    out = cm.generate(ids, max_new_tokens=4, eos_token_id=[], streamer=rec)
    assert rec.ended == 1 and torch.equal(rec.puts[0], ids) and len(rec.puts) == 5
    assert torch.equal(torch.cat([rec.puts[0]] + [p[:, None] for p in rec.puts[1:]], dim=1), out)


def test_sampling_follows_the_tempered_top_k_distribution():
    logits = torch.tensor([[2.0, 1.0, 0.5, -1.0]])
    n, temperature = 20000, 0.7
    s = Sampler(True, temperature, 3, torch.Generator().manual_seed(0))
    draws = torch.stack([s(logits) for _ in range(n)]).flatten()
    freq = torch.bincount(draws, minlength=4).double() / n
    p = torch.softmax(torch.tensor([2.0, 1.0, 0.5]).double() / temperature, 0)   # independent: the formula
    sigma = (p * (1 - p) / n).sqrt()
    assert freq[3] == 0                                          # outside the top 3
    assert ((freq[:3] - p).abs() <= 6 * sigma).all(), (freq, p)
    top1 = Sampler(True, 1.0, 1, torch.Generator().manual_seed(1))
    assert all(torch.equal(top1(logits), logits.argmax(-1)) for _ in range(20))   # top-1 sampling is greedy


def test_sampling_is_reproducible_with_a_generator(llama):
    entry, cm = llama
    ids = torch.randint(3, entry.vocab, (2, 5), generator=torch.Generator().manual_seed(1))
    kw = dict(max_new_tokens=6, do_sample=True, temperature=1.3, eos_token_id=[])
    a = cm.generate(ids, **kw, generator=torch.Generator().manual_seed(5))
    b = cm.generate(ids, **kw, generator=torch.Generator().manual_seed(5))
    greedy = cm.generate(ids, max_new_tokens=6, eos_token_id=[])
    assert torch.equal(a, b) and not torch.equal(a, greedy)


def test_plain_model_generates_uncached():
    """No cache convention to capture: each step reruns the compiled model on the whole sequence."""
    entry = ZOO["plain"]
    model = entry.build()
    ids = torch.randint(1, entry.vocab, (2, 5), generator=torch.Generator().manual_seed(2))
    out, stats = generate_with_stats(routefx.compile(model, Dense()), ids, max_new_tokens=5)
    assert stats.mode == "uncached"
    seq = ids
    with torch.no_grad():
        for _ in range(5):                                       # the reference: the model itself, greedily
            seq = torch.cat([seq, model(seq)[:, -1].argmax(-1, keepdim=True)], dim=1)
    assert torch.equal(out, seq)
    with pytest.raises(InputError, match="takes no attention_mask"):
        routefx.compile(model, Dense()).generate(ids, torch.tensor([[0, 1, 1, 1, 1], [1] * 5]))


@pytest.mark.parametrize("kw,match", [
    (dict(attention_mask=torch.tensor([[1, 1, 0], [1, 1, 1]])), "left padding only"),
    (dict(temperature=0.0, do_sample=True), "temperature"),
    (dict(top_k=0, do_sample=True), "top_k"),
    (dict(max_new_tokens=-1), "max_new_tokens"),
    (dict(attention_mask=torch.ones(2, 4, dtype=torch.long)), "attention_mask has shape"),
])
def test_refusals(llama, kw, match):
    _, cm = llama
    ids = torch.tensor([[5, 6, 7], [8, 9, 10]])
    with pytest.raises(InputError, match=match):
        cm.generate(ids, **kw)


def test_a_model_that_needs_its_own_cache_class_generates_uncached_and_says_why():
    """Hybrid models (Mamba layers, compressed KV) call methods of their own cache class: generation warns that the
    model does not run with a cache routefx can capture and generates without one, equal to greedy decoding of the
    model on the whole sequence; a decode policy, which needs the cache, is refused with the reason."""
    from transformers import Cache
    from routefx.generate import DepthDecay
    from routefx.generate.loop import generate_with_stats
    model = ZOO["llama"].build()
    attn = model.model.layers[1].self_attn
    plain = attn.forward

    def forward(*args, **kwargs):
        cache = next((v for v in kwargs.values() if isinstance(v, Cache)), None)
        if cache is not None:
            cache.conv_states  # noqa: B018 -- what a hybrid model's cache has and DynamicCache has not
        return plain(*args, **kwargs)

    attn.forward = forward
    ids = torch.randint(3, 101, (2, 5), generator=torch.Generator().manual_seed(0))
    mask = torch.ones_like(ids)
    mask[0, :2] = 0
    cm = routefx.compile(model, Dense())
    why = r"LlamaForCausalLM does not run with transformers' DynamicCache .*AttributeError.*conv_states"
    with pytest.warns(RuntimeWarning, match=why + r".*generating uncached instead"):
        out, stats = generate_with_stats(cm, ids, mask, max_new_tokens=3)
    assert stats.mode == "uncached (no cache capture)"
    seq, m = ids, mask
    for _ in range(3):   # the reference: greedy on the whole sequence, positions from the mask as generate's
        with torch.no_grad():
            logits = model(seq, attention_mask=m, position_ids=(m.cumsum(-1) - 1).clamp(min=0),
                           use_cache=False).logits
        seq = torch.cat([seq, logits[:, -1].argmax(-1, keepdim=True)], dim=1)
        m = torch.cat([m, m.new_ones(2, 1)], dim=1)
    assert torch.equal(out, seq)
    with pytest.raises(routefx.UnsupportedModelError, match=why + r".*other layer state is not supported"):
        cm.generate(ids, mask, max_new_tokens=2, decode_policy=DepthDecay(alpha=0.9))


def test_a_model_whose_generate_feeds_other_ids_is_refused():
    """XLM's generate appends a mask token to the sequence and predicts at it: generating from the sequence itself
    would give other tokens, so generation refuses and says why (its step is not captured with a cache either)."""
    import transformers
    cfg = transformers.XLMConfig(vocab_size=64, emb_dim=32, n_layers=2, n_heads=2, causal=True, n_langs=1)
    torch.manual_seed(0)
    model = transformers.XLMWithLMHeadModel(cfg).eval()
    ids = torch.randint(5, 64, (2, 6), generator=torch.Generator().manual_seed(0))
    cm = routefx.compile(model, Dense())
    with pytest.warns(RuntimeWarning, match="generating uncached instead"), \
            pytest.raises(routefx.UnsupportedModelError, match=r"XLMWithLMHeadModel.prepare_inputs_for_generation "
                                                              r"feeds the model other token ids .*\[2, 6\] -> \[2, 7\]"):
        cm.generate(ids, max_new_tokens=2)


def test_uncached_generation_takes_positions_from_the_mask_as_generate_does():
    """A model without a KV cache whose forward takes position_ids (OpenAI GPT): `generate` gives a left-padded
    row positions counted from its first real token, not from the padding."""
    import transformers
    cfg = transformers.OpenAIGPTConfig(vocab_size=64, n_positions=64, n_embd=32, n_layer=2, n_head=2)
    torch.manual_seed(0)
    model = transformers.OpenAIGPTLMHeadModel(cfg).eval()
    ids = torch.randint(3, 64, (2, 9), generator=torch.Generator().manual_seed(3))
    mask = torch.ones_like(ids)
    mask[0, :4] = 0
    out, stats = generate_with_stats(routefx.compile(model, Dense()), ids, mask, max_new_tokens=6, do_sample=False)
    with torch.no_grad():
        ref = model.generate(ids, attention_mask=mask, max_new_tokens=6, do_sample=False)
    assert stats.mode == "uncached"
    assert torch.equal(out, ref), f"routefx\n{out}\nHugging Face\n{ref}"
