"""Generation graphs of a model whose code branches on a length run only where their capture holds.

Doge masks attention to the `keep_window_size` keys of highest dynamic weight once a sequence is longer than that
window (a top-k over the keys), and attends to every key before. A graph captured at one side of the window computes
that side's attention, so the prefill and decode graphs keep torch.export's guards (`P + S <= window` or `> window`)
and are captured again for sizes outside them. Without the checks, a prompt longer than the window ran the short
side's graph on ONNX Runtime (other tokens than Hugging Face, no error) and a short one the long side's (a TopK
wider than its input: an ONNX Runtime error).
"""
import pytest
import torch

import routefx
from routefx.errors import UnsupportedModelError
from routefx.generate import DepthDecay
from routefx.generate.graphs import generation_graphs
from routefx.policies import Dense

WINDOW = 6


def _doge(window=WINDOW):
    from transformers import DogeConfig, DogeForCausalLM
    cfg = DogeConfig(vocab_size=96, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                     num_key_value_heads=2, max_position_embeddings=128, keep_window_size=window,
                     pad_token_id=0, bos_token_id=1, eos_token_id=2, tie_word_embeddings=False)
    torch.manual_seed(0)
    model = DogeForCausalLM(cfg).eval()
    with torch.no_grad():   # the dynamic-mask weights start at zero: every key ties in the top-k (order undefined)
        for name, p in model.named_parameters():
            if name.endswith(".A"):
                p.normal_()
    return model


def _prompt(batch, seq, pad, seed):
    """Distinct tokens per row: Doge's mask weight of a key is a function of its token, so a repeated token ties
    with itself in the top-k, which torch and ONNX Runtime (lowest index first) break differently."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.stack([torch.randperm(93, generator=g)[:seq] + 3 for _ in range(batch)])
    mask = torch.ones_like(ids)
    mask[0, :pad] = 0
    return ids, mask


def _distinct(tokens, mask):
    return all(len(set(t[m.bool()].tolist())) == int(m.sum()) for t, m in zip(tokens, mask))


# (batch, prompt, left padding, new tokens): inside the window, decoded past it; longer than the window
CASES = {"eager": ((2, 3, 1, 8), (1, 12, 0, 4)), "onnx": ((2, 4, 1, 3), (1, 12, 0, 2))}


@pytest.mark.parametrize("backend", ["eager", "onnx"])
def test_generation_across_a_length_branch_equals_hugging_face(backend):
    model = _doge()
    cm = routefx.compile(model, Dense(), backend=backend)
    for batch, seq, pad, new in CASES[backend]:
        ids, mask = _prompt(batch, seq, pad, seed=seq)
        out = cm.generate(ids, mask, max_new_tokens=new, eos_token_id=[])
        with torch.no_grad():
            ref = model.generate(ids, attention_mask=mask, max_new_tokens=new, do_sample=False, eos_token_id=None)
        assert torch.equal(out, ref), f"routefx\n{out}\nHugging Face\n{ref}"
        if backend == "onnx":   # no tie in the top-k (see _prompt): the keys of the last step are distinct
            full = torch.cat([mask, mask.new_ones(batch, new - 1)], 1)
            assert _distinct(ref[:, :-1], full), "a repeated token: pick another seed"
    g = generation_graphs(cm)
    assert g._more.get("prefill") and g._more.get("decode"), "each side of the window needs its own capture"


def test_guards_keep_the_models_length_branch_and_not_exports_lower_bounds():
    g = generation_graphs(routefx.compile(_doge(), Dense(), backend="eager"))

    def feeds(batch, past, new):
        out = {"input_ids": torch.ones(batch, new, dtype=torch.long),
               "attention_mask": torch.ones(batch, past + new, dtype=torch.long),
               "position_ids": torch.zeros(batch, new, dtype=torch.long)}
        for name in g.past_names:
            out[name] = torch.zeros(batch, 2, past, 16)
        return out

    # the first decode capture (2 rows, 5 past, 3 new: 8 keys) is on the long side of the window
    assert g.decode.fits(feeds(2, 5, 3)) and g.decode.fits(feeds(1, 40, 1))
    assert "> 6" in g.decode.outside(feeds(1, 4, 1))
    # a one-token step after a one-token prompt: its mask (2 columns) is below export's lower bound from its
    # 0/1 specialisation (P >= 2, S >= 2: a mask of >= 4), which is not the model's
    wide = generation_graphs(routefx.compile(_doge(window=1000), Dense(), backend="eager"))
    assert wide.decode.fits(feeds(1, 1, 1)) and wide.prefill.fits({k: feeds(1, 0, 1)[k] for k in ("input_ids",
                                                                                                  "attention_mask",
                                                                                                  "position_ids")})


def test_a_decode_policy_refuses_sizes_outside_its_pieces():
    model = _doge()
    cm = routefx.compile(model, Dense(), backend="eager")
    ids, mask = _prompt(1, 3, 0, seed=4)   # 3 keys: the first decode capture (8 keys) is past the window
    with pytest.raises(UnsupportedModelError, match="branches on a length"):
        cm.generate(ids, mask, max_new_tokens=3, eos_token_id=[], decode_policy=DepthDecay(alpha=1.0))
    ids, mask = _prompt(1, 9, 0, seed=4)
    out = cm.generate(ids, mask, max_new_tokens=3, eos_token_id=[], decode_policy=DepthDecay(alpha=1.0))
    with torch.no_grad():
        ref = model.generate(ids, attention_mask=mask, max_new_tokens=3, do_sample=False, eos_token_id=None)
    assert torch.equal(out, ref)
