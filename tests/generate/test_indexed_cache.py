"""Sparse attention's indexer keys are cache tensors of the generation graphs.

DeepSeek-V3.2's DSA (and GLM-5, HY-V4, Dots3, AXK2) selects the top `index_topk` keys per query with a small
indexer whose keys transformers keeps beside the layer's K/V (`DynamicIndexedLayer.update_indexer`: [B, P, d],
growing along the position dim). They are one more input and output per layer of the decode graph
(`past_index_{layer}`), seeded through the cache's own `update_indexer`. Before, the probe's plain DynamicCache had
no indexer and these models generated uncached (whole-sequence calls per token).
"""
import pytest
import torch

import routefx
from routefx.generate import DepthDecay
from routefx.generate.graphs import generation_graphs
from routefx.generate.loop import generate_with_stats
from routefx.generate.speculative import speculative_generate
from routefx.policies import Dense, PruneLayers
from tests.compare import skipped_in_decode

NEW = 6


def _dsa(index_topk: int = 4):
    from transformers import DeepseekV32Config, DeepseekV32ForCausalLM
    cfg = DeepseekV32Config(vocab_size=96, hidden_size=32, intermediate_size=64, moe_intermediate_size=24,
                            num_hidden_layers=3, num_attention_heads=4, num_key_value_heads=4, n_routed_experts=4,
                            n_shared_experts=1, num_experts_per_tok=2, n_group=1, topk_group=1,
                            first_k_dense_replace=1, q_lora_rank=16, kv_lora_rank=16, qk_rope_head_dim=8,
                            qk_nope_head_dim=8, v_head_dim=8, index_topk=index_topk, index_n_heads=16,
                            index_head_dim=16, max_position_embeddings=128, pad_token_id=0, bos_token_id=1,
                            eos_token_id=2)
    torch.manual_seed(0)
    return DeepseekV32ForCausalLM(cfg).eval()


def _prompt(seq=9, pad=2):
    g = torch.Generator().manual_seed(3)
    ids = torch.randint(3, 96, (2, seq), generator=g)
    mask = torch.ones_like(ids)
    mask[0, :pad] = 0
    return ids, mask


def _hf(model, ids, mask, n=NEW):
    with torch.no_grad():
        return model.generate(ids, attention_mask=mask, max_new_tokens=n, do_sample=False, eos_token_id=None)


# 4 of up to 15 keys per query: the sparse selection. A key scores exactly 0 where ReLU zeroes it on every indexer
# head (a tie, which torch's top-k and ONNX Runtime's, or one over shifted positions, break differently): with 16
# heads that is rare enough for these inputs (with 2 heads the fixed-shape window's tokens differed)
@pytest.mark.parametrize("backend", ["eager", "onnx"])
def test_cached_generation_equals_hugging_face(backend, tmp_path):
    model = _dsa()
    cm = routefx.compile(model, Dense(), backend=backend)
    ids, mask = _prompt()
    out, stats = generate_with_stats(cm, ids, mask, max_new_tokens=NEW, eos_token_id=[])
    assert stats.mode.startswith("cached"), stats.mode
    assert torch.equal(out, _hf(model, ids, mask)), f"routefx\n{out}\nHugging Face\n{_hf(model, ids, mask)}"
    # the fixed-shape window (what a CUDA graph replays) shifts the indexer keys with the K/V
    assert torch.equal(cm.generate(ids, mask, max_new_tokens=NEW, eos_token_id=[], static_cache=True), out)
    if backend == "onnx":   # the artifact's generation graphs pass them on as they pass the K/V
        cm(ids, attention_mask=mask)
        sess = routefx.load(routefx.export(cm, str(tmp_path / "dsa"), generate=True))
        assert torch.equal(sess.generate(ids, mask, max_new_tokens=NEW, eos_token_id=[]), out)
    g = generation_graphs(cm)
    assert g.layout.indexed == (0, 1, 2) and g.layout.index_dims == (16, 16, 16)
    past = [n.target for n in g.decode.gm.graph.nodes if n.op == "placeholder" and n.target.startswith("past_")]
    assert past == [f"past_{kind}_{i}" for i in range(3) for kind in ("key", "value", "index")]


def test_a_pruned_layer_keeps_no_indexer_keys():
    model = _dsa()
    cm = routefx.compile(model, PruneLayers(layers=[1]), backend="eager")
    ids, mask = _prompt()
    out, stats = generate_with_stats(cm, ids, mask, max_new_tokens=NEW, eos_token_id=[])
    assert stats.mode.startswith("cached"), stats.mode
    g = generation_graphs(cm)
    assert g.past_names == ["past_key_0", "past_value_0", "past_index_0", "past_key_2", "past_value_2",
                            "past_index_2"]
    # the same tokens as greedy over whole-sequence calls of the pruned model
    seq = ids
    m = mask
    for _ in range(NEW):
        nxt = cm(input_ids=seq, attention_mask=m).logits[:, -1].argmax(-1, keepdim=True)
        seq, m = torch.cat([seq, nxt], 1), torch.cat([m, m.new_ones(2, 1)], 1)
    assert torch.equal(out, seq)


def test_speculative_decoding_cuts_indexer_keys_back_with_the_kv():
    model = _dsa()
    full = routefx.compile(model, Dense(), backend="eager")
    draft = routefx.compile(model, PruneLayers(layers=[1]), backend="eager")
    ids, mask = _prompt()
    out, stats = speculative_generate(full, draft, ids, mask, max_new_tokens=8, n=3, eos_token_id=[])
    assert torch.equal(out, full.generate(ids, mask, max_new_tokens=8, eos_token_id=[]))
    assert stats.rounds >= 2 and stats.accepted < stats.drafted   # drafts were rejected: the cache was cut back


@pytest.mark.parametrize("backend", ["eager", "onnx"])
def test_decode_policies_skip_layers_and_keep_their_indexer_keys(backend):
    """A decode policy cuts the decode graph into per-layer pieces; a skipped layer's K/V piece computes its
    indexer keys too, so later tokens' key selection sees every position. LayerSubset (row 0 skips layer 1, row 1
    layers 0 and 2) = HF generate with those layers returning their input in decode steps; ActivationSkip at
    threshold 0 (the prompt through the pieces, empty indexer keys, every layer run) = greedy."""
    from routefx.generate import ActivationSkip, LayerSubset
    model = _dsa()
    cm = routefx.compile(model, Dense(), backend=backend)
    ids, mask = _prompt()
    out = cm.generate(ids, mask, max_new_tokens=NEW, eos_token_id=[], decode_policy=LayerSubset(skip=((1,), (0, 2))))
    rows = {0: torch.tensor([False, True]), 1: torch.tensor([True, False]), 2: torch.tensor([False, True])}
    with skipped_in_decode(model, rows):
        want = _hf(model, ids, mask)
    assert torch.equal(out, want), f"routefx\n{out}\nHugging Face\n{want}"
    assert not torch.equal(want, _hf(model, ids, mask))             # the skips changed the tokens
    every = cm.generate(ids, mask, max_new_tokens=NEW, eos_token_id=[], decode_policy=ActivationSkip(threshold=0.0))
    assert torch.equal(every, _hf(model, ids, mask))
    assert cm.generate(ids, mask, max_new_tokens=2, eos_token_id=[], decode_policy=DepthDecay(alpha=0.5)).shape == \
        (2, ids.shape[1] + 2)
