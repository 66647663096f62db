"""Self-speculative decoding on the locally trained tiny Llama: output identical to the full model's greedy
decoding, whatever the draft and the draft length; a perfect draft is always accepted."""
import math

import pytest
import torch

import routefx
from routefx.errors import InputError
from routefx.generate.speculative import choose_n, speculative_generate
from routefx.policies import Dense, PruneLayers
from tests.tiny_lm import batches, trained_llama
from tests.zoo import ZOO


@pytest.fixture(scope="module")
def models():
    model = trained_llama()
    full = routefx.compile(model, Dense())
    draft = routefx.compile(model, PruneLayers(layers=[2]))
    b = batches(1, 2, 24, seed=7, split="heldout", pad=5)[0]
    return model, full, draft, b["input_ids"], b["attention_mask"]


@pytest.mark.parametrize("n", [1, 3, None])
def test_output_equals_full_greedy(models, n):
    _, full, draft, ids, mask = models
    ref = full.generate(ids, mask, max_new_tokens=20, eos_token_id=[])
    out, stats = speculative_generate(full, draft, ids, mask, max_new_tokens=20, n=n, eos_token_id=[])
    assert torch.equal(out, ref)
    assert 0 < stats.rounds < 20 and 0 <= stats.accepted <= stats.drafted
    # every round commits its accepted drafts and one token of the full model (the last round may be cut short)
    assert stats.accepted + stats.rounds >= 19


def test_a_perfect_draft_is_always_accepted(models):
    _, full, _, ids, mask = models
    out, stats = speculative_generate(full, full, ids, mask, max_new_tokens=17, n=3, eos_token_id=[])
    assert torch.equal(out, full.generate(ids, mask, max_new_tokens=17, eos_token_id=[]))
    assert stats.acceptance == 1.0 and stats.rounds == math.ceil((17 - 1) / (3 + 1))


def test_rows_stop_at_eos(models):
    _, full, draft, ids, mask = models
    free = full.generate(ids, mask, max_new_tokens=20, eos_token_id=[])
    eos = int(free[0, 24 + 6])
    ref = full.generate(ids, mask, max_new_tokens=20, eos_token_id=eos, pad_token_id=0)
    out, _ = speculative_generate(full, draft, ids, mask, max_new_tokens=20, n=4, eos_token_id=eos, pad_token_id=0)
    assert torch.equal(out, ref)


def test_choose_n():
    assert choose_n(0.0, 0.1, 1.0) == 1                 # nothing is accepted: draft as little as possible
    assert choose_n(0.95, 0.01, 1.0, n_max=8) == 8      # cheap, accurate draft: as long as allowed
    # against brute force over the formula, written out independently
    a, cd, cv = 0.7, 0.3, 1.0
    rates = {n: sum(a ** i for i in range(n + 1)) / (n * cd + cv) for n in range(1, 9)}
    assert choose_n(a, cd, cv) == max(rates, key=rates.get)


def test_refuses_a_draft_of_another_model(models):
    _, full, _, ids, mask = models
    other = routefx.compile(ZOO["llama"].build(), Dense())
    with pytest.raises(InputError, match="same model"):
        speculative_generate(full, other, ids, mask)


def test_onnx_graphs_alternate_in_sessions_that_stop_spinning(models):
    """On ONNX Runtime the draft's and the full model's sessions alternate on the same cores: their threads stop
    spin-waiting when a run returns, so that one session's idle threads do not compete with the next one's run,
    and the alternation gives greedy decoding's tokens."""
    from routefx.generate.graphs import generation_graphs
    model, _, _, ids, mask = models
    full = routefx.compile(model, Dense(), backend="onnx")
    draft = routefx.compile(model, PruneLayers(layers=[2]), backend="onnx")
    out, _ = speculative_generate(full, draft, ids, mask, max_new_tokens=12, n=2, eos_token_id=[])
    assert torch.equal(out, full.generate(ids, mask, max_new_tokens=12, eos_token_id=[]))
    for cm in (full, draft):
        g = generation_graphs(cm)
        for run in (g.prefill.run, g.decode.run):
            opts = run.session.get_session_options()
            assert opts.get_session_config_entry("session.force_spinning_stop") == "1"
