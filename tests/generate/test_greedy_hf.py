"""Dense greedy generation equals Hugging Face `generate` token for token (batch 2, left padding, KV cache)."""
import pytest
import torch

import routefx
from routefx.policies import Dense
from tests.zoo import DECODERS, ZOO

HF_DECODERS = [n for n in DECODERS if not n.startswith("plain")]
ONNX_FAMILIES = ["llama", "gpt2"]   # GQA + RoPE; MHA, learned positions, biases (suite time: two of them)


def _prompt(entry, batch=2, seq=7, pad=3, seed=3):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, entry.vocab, (batch, seq), generator=g)
    mask = torch.ones_like(ids)
    mask[0, :pad] = 0
    return ids, mask


def _hf_greedy(model, ids, mask, n, **kw):
    with torch.no_grad():
        return model.generate(ids, attention_mask=mask, max_new_tokens=n, do_sample=False, **kw)


@pytest.mark.parametrize("backend,name", [("eager", n) for n in HF_DECODERS] + [("onnx", n) for n in ONNX_FAMILIES])
def test_greedy_equals_hf_generate(backend, name):
    entry = ZOO[name]
    model = entry.build()
    ids, mask = _prompt(entry)
    cm = routefx.compile(model, Dense(), backend=backend)
    out = cm.generate(ids, mask, max_new_tokens=10)
    ref = _hf_greedy(model, ids, mask, 10)
    assert torch.equal(out, ref), f"routefx\n{out}\nHugging Face\n{ref}"
    # batch 1 and another prompt length reuse the same graphs
    ids1, _ = _prompt(entry, batch=1, seq=4, pad=0, seed=8)
    assert torch.equal(cm.generate(ids1, max_new_tokens=5), _hf_greedy(model, ids1, torch.ones_like(ids1), 5))


def test_each_row_stops_at_its_eos():
    """An EOS token produced by one row ends that row (pad afterwards) while the other row goes on; as `generate`."""
    entry = ZOO["llama"]
    model = entry.build()
    ids, mask = _prompt(entry)
    cm = routefx.compile(model, Dense())
    free = cm.generate(ids, mask, max_new_tokens=10, eos_token_id=[])
    eos = int(free[1, 7 + 3])                      # row 1's fourth new token
    first = [(row[7:] == eos).nonzero()[0, 0].item() if (row[7:] == eos).any() else None for row in free]
    out = cm.generate(ids, mask, max_new_tokens=10, eos_token_id=eos, pad_token_id=0)
    ref = _hf_greedy(model, ids, mask, 10, eos_token_id=eos, pad_token_id=0)
    assert torch.equal(out, ref)
    assert first[1] <= 3
    assert (out[1, 7 + first[1] + 1:] == 0).all() and out[1, 7 + first[1]] == eos
    if first[0] is None or first[0] > first[1]:    # row 0 went on past row 1's end
        assert torch.equal(out[0, :7 + first[1] + 2], free[0, :7 + first[1] + 2])
