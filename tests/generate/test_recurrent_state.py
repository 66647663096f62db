"""Generation with a cache for models whose layers keep recurrent state (transformers' linear-attention cache
layers: a causal convolution's last inputs, a state-space scan's state): Mamba (every layer), Bamba (a Mamba-2
layer and an attention layer), LFM3 (short-convolution layers and an attention layer). The state is an explicit
input and output of the decode graph like the K/V; greedy output equals Hugging Face `generate` (batch 2, left
padding), and prompts whose lengths take other branches of the model's code (shorter than the convolution's
kernel) get a graph captured for them."""
import pytest
import torch

import routefx
from routefx.generate.graphs import generation_graphs
from routefx.generate.loop import _Uncached, generate_with_stats
from routefx.generate.step import prompt_positions
from routefx.policies import Dense, Duo, PruneLayers

VOCAB = 101
IDS = dict(vocab_size=VOCAB, pad_token_id=0, bos_token_id=1, eos_token_id=2, tie_word_embeddings=False)


def _mamba():
    from transformers import MambaConfig, MambaForCausalLM
    return MambaForCausalLM(MambaConfig(hidden_size=32, state_size=8, num_hidden_layers=3, expand=2, conv_kernel=4,
                                        time_step_rank=4, use_mambapy=False, **IDS))


def _bamba():
    from transformers import BambaConfig, BambaForCausalLM
    return BambaForCausalLM(BambaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                        num_attention_heads=4, num_key_value_heads=2, attn_layer_indices=[1],
                                        mamba_n_heads=8, mamba_d_head=8, mamba_n_groups=1, mamba_d_state=16,
                                        mamba_d_conv=4, mamba_expand=2, mamba_chunk_size=16, **IDS))


def _lfm3():
    from transformers import Lfm3Config, Lfm3ForCausalLM
    return Lfm3ForCausalLM(Lfm3Config(hidden_size=32, intermediate_size=64, num_hidden_layers=3,
                                      num_attention_heads=4, num_key_value_heads=2, head_dim=8, conv_L_cache=3,
                                      layer_types=["conv", "full_attention", "conv"], **IDS))


def _olmo_hybrid():
    from transformers import OlmoHybridConfig, OlmoHybridForCausalLM
    return OlmoHybridForCausalLM(OlmoHybridConfig(
        hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
        layer_types=["linear_attention", "full_attention"], linear_num_key_heads=2, linear_num_value_heads=2,
        linear_key_head_dim=8, linear_value_head_dim=16, linear_conv_kernel_dim=4, **IDS))


BUILD = {"mamba": _mamba, "bamba": _bamba, "lfm3": _lfm3, "olmo_hybrid": _olmo_hybrid}


def _model(name):
    torch.manual_seed(0)
    return BUILD[name]().eval()


def _prompt(batch=2, seq=9, pad=3, seed=3):
    ids = torch.randint(3, VOCAB, (batch, seq), generator=torch.Generator().manual_seed(seed))
    mask = torch.ones_like(ids)
    mask[0, :pad] = 0
    return ids, mask


def _hf(model, ids, mask, n):
    with torch.no_grad():
        return model.generate(ids, attention_mask=mask, max_new_tokens=n, do_sample=False)


def _with_positions(ids, mask):
    return {"input_ids": ids, "attention_mask": mask, "position_ids": prompt_positions(mask)}


def _compiled_greedy(cm, ids, mask, n):
    """The reference for a rewritten model: greedy over whole-sequence calls of the compiled model (no cache)."""
    step, seq = _Uncached(cm, mask.clone()), ids
    logits = step.prefill(ids)
    for _ in range(n):
        nxt = logits.argmax(-1)
        seq = torch.cat([seq, nxt[:, None]], dim=1)
        logits = step.decode(nxt[:, None])
    return seq


@pytest.mark.parametrize("name,backend", [("mamba", "eager"), ("bamba", "onnx"), ("lfm3", "eager")])
def test_greedy_with_recurrent_state_equals_hf_generate(name, backend):
    model = _model(name)
    cm = routefx.compile(model, Dense(), backend=backend)
    ids, mask = _prompt()
    out, stats = generate_with_stats(cm, ids, mask, max_new_tokens=8)
    assert stats.mode == "cached"
    assert torch.equal(out, _hf(model, ids, mask, 8)), out
    g = generation_graphs(cm)
    assert g.layout.recurrent and any(n.startswith("past_conv_") for n in g.past_names)
    assert [n for n in g.past_names if n.startswith("past_key_")] == [f"past_key_{i}" for i in g.layout.kv]
    # the decode graph reads the prefill's blocks (LFM3's short convolution: a per-token branch in both)
    assert [b.path for b in g.decode.ir.blocks] == [b.path for b in g.prefill.ir.blocks]
    if backend != "eager":
        return
    # batch 1, a prompt shorter than the convolution's kernel, then a longer one: each as generate (graphs captured
    # again where export's guards exclude the sizes: Mamba-1's sequential scan fixes the length)
    for seq in (2, 13):
        one, _ = _prompt(batch=1, seq=seq, pad=0, seed=seq)
        assert torch.equal(cm.generate(one, max_new_tokens=5), _hf(model, one, torch.ones_like(one), 5))


def test_pruned_recurrent_layer_has_no_state_and_generates_as_the_pruned_model():
    """PruneLayers on Bamba's Mamba layer: its state is neither input nor output of the decode graph, and the
    cached output equals greedy decoding of the compiled (pruned) model over whole sequences."""
    model = _model("bamba")
    cm = routefx.compile(model, PruneLayers(layers=[0]))
    ids, mask = _prompt()
    want = _compiled_greedy(cm, ids, mask, 6)      # first: the plan is made, so generate captures the pruned model only
    out, stats = generate_with_stats(cm, ids, mask, max_new_tokens=6)
    assert stats.mode == "cached"
    g = generation_graphs(cm)
    assert g.kept == [1] and g.past_names == ["past_key_1", "past_value_1"]
    assert torch.equal(out, want)


def test_a_delta_rule_step_reads_as_its_layers_token_mixer():
    """OLMo-Hybrid's decode step: the delta rule's one-token update (the state multiplied elementwise, no product
    of two activations) is its layer's token mixer, not a block of its own, because it reads the state earlier
    tokens left; so the decode graph has the forward's blocks, one per layer with its FFN, and a Duo plan made on
    the forward applies to it. (End to end, Duo generation on OLMo-Hybrid and Qwen3-Next is in the family sweep's
    generate_routed: each whole-sequence capture of the chunked delta rule takes ~23 s of torch.export here.)"""
    from routefx.compiler.pipeline import recognize_for
    from routefx.generate.step import capture_decode, probe_cache
    model = _model("olmo_hybrid")
    layout = probe_cache(model)
    assert [u.layer for u in layout.states] and layout.kv == (1,)
    gm, _ = capture_decode(model, layout, list(range(layout.layers)))
    ir, _ = recognize_for(Duo(budget=0.5, small="nested"), gm)
    assert [b.path for b in ir.blocks] == ["model.layers.0", "model.layers.1"]
    assert all(b.ffn is not None and b.ffn.kind == "gated" for b in ir.blocks)     # SwiGLU, as in the forward


@pytest.mark.parametrize("name", ["bamba"])
def test_duo_routes_the_ffns_of_a_hybrid_and_keeps_its_state(name):
    """The decode graph reads the same blocks as the forward, so the Duo plan applies to it (Bamba: a Mamba-2
    layer and an attention layer)."""
    model = _model(name)
    # calibrated on the inputs the reference's whole-sequence calls take (positions from the mask, as `generate`),
    # so the reference runs the compiled graph instead of capturing the model once more
    cal = [_with_positions(*_prompt(batch=3, seq=12, seed=40 + i)) for i in range(2)]
    cm = routefx.compile(model, Duo(budget=0.5, small="nested"), calibration=cal)
    assert len(cm.plan.layers) == 2
    ids, mask = _prompt()
    out, stats = generate_with_stats(cm, ids, mask, max_new_tokens=4)
    assert stats.mode == "cached"
    assert [b.path for b in generation_graphs(cm).decode.ir.blocks] == [b.path for b in cm.ir.blocks]
    assert torch.equal(out, _compiled_greedy(cm, ids, mask, 4))


def test_modes_that_cut_back_or_shift_the_cache_are_refused_with_the_reason(tmp_path):
    from routefx.generate import DepthDecay
    from routefx.generate.speculative import speculative_generate
    model = _model("mamba")
    cm = routefx.compile(model, Dense())
    ids, mask = _prompt()
    why = r"keep recurrent state"
    with pytest.raises(routefx.UnsupportedModelError, match=r"decode_policy=DepthDecay .*" + why):
        cm.generate(ids, mask, max_new_tokens=3, decode_policy=DepthDecay(alpha=0.5))
    with pytest.raises(routefx.UnsupportedModelError, match=r"static_cache=True .*" + why):
        cm.generate(ids, mask, max_new_tokens=3, static_cache=True)
    with pytest.raises(routefx.UnsupportedModelError, match=r"speculative decoding .*" + why):
        speculative_generate(cm, cm, ids, mask, max_new_tokens=3)
    on_onnx = routefx.compile(model, Dense(), backend="onnx")
    on_onnx(ids, attention_mask=mask)
    with pytest.raises(routefx.UnsupportedModelError, match=r"export\(generate=True\) .*" + why):
        routefx.export(on_onnx, str(tmp_path / "artifact"), generate=True)


def test_a_layer_whose_state_the_cache_never_sees_is_refused_and_generates_uncached():
    """RecurrentGemma's config names its recurrent blocks linear-attention layers, but they keep their state in
    module attributes: the probe refuses (a decode graph would drop that state), and generate runs uncached,
    equal to Hugging Face `generate`."""
    from transformers import RecurrentGemmaConfig, RecurrentGemmaForCausalLM
    from routefx.generate.step import probe_cache
    torch.manual_seed(0)
    model = RecurrentGemmaForCausalLM(RecurrentGemmaConfig(
        num_hidden_layers=3, hidden_size=32, intermediate_size=64, num_attention_heads=4, num_key_value_heads=2,
        head_dim=8, lru_width=32, block_types=["recurrent", "recurrent", "attention"], **IDS)).eval()
    with pytest.raises(routefx.UnsupportedModelError, match=r"layers \[0, 1\] .*put no state in the cache"):
        probe_cache(model)
    ids, mask = _prompt()
    with pytest.warns(RuntimeWarning, match="put no state in the cache.*generating uncached"):
        out, stats = generate_with_stats(routefx.compile(model, Dense()), ids, mask, max_new_tokens=2)
    assert stats.mode == "uncached (no cache capture)"
    assert torch.equal(out, _hf(model, ids, mask, 2))


def test_a_token_past_the_input_embedding_is_refused_by_name():
    """A model whose LM head has more outputs than its embedding has rows can choose a token the next step cannot
    take: generate says so instead of failing in a gather."""
    from torch import nn
    model = _model("lfm3")
    head = nn.Linear(32, VOCAB + 20, bias=True)
    with torch.no_grad():
        head.bias[VOCAB + 7] = 1e4          # every row's argmax
    model.lm_head = head
    ids, mask = _prompt()
    with pytest.raises(routefx.InputError, match=rf"token id {VOCAB + 7} at step 1, past its input embedding's "
                                                 rf"{VOCAB} rows"):
        routefx.compile(model, Dense()).generate(ids, mask, max_new_tokens=3)
