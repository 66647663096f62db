"""Decoding over a fixed-shape, shifting KV-cache window (`routefx.generate.window`): the same tokens as Hugging
Face `generate` (Dense) and as the growing cache (routed), batch 2 with left padding; CUDA-graph decode steps on
a GPU."""
import pytest
import torch

import routefx
from routefx.errors import BackendError, InputError, UnsupportedModelError
from routefx.generate import DepthDecay, generate_with_stats
from routefx.generate import window
from routefx.generate.window import WindowStepper, window_length
from routefx.policies import Dense, Duo, PruneLayers
from tests.generate.test_greedy_hf import _hf_greedy, _prompt
from tests.zoo import ZOO


# llama: RoPE + GQA; gpt2: learned absolute positions; gemma2: alternating sliding-window layers (window 4, shorter
# than the sequence) and soft-capping; mixtral: MoE
@pytest.mark.parametrize("name,backend", [("llama", "eager"), ("gpt2", "eager"), ("gemma2", "eager"),
                                          ("mixtral", "eager"), ("llama", "onnx")])
def test_static_window_equals_hf_generate(name, backend):
    entry = ZOO[name]
    model = entry.build()
    ids, mask = _prompt(entry)
    cm = routefx.compile(model, Dense(), backend=backend)
    out, stats = generate_with_stats(cm, ids, mask, max_new_tokens=9, static_cache=True)
    assert stats.mode == "static"
    ref = _hf_greedy(model, ids, mask, 9)
    assert torch.equal(out, ref), f"routefx\n{out}\nHugging Face\n{ref}"


def test_static_window_equals_growing_cache_with_routes():
    """Duo (per-token routers in the decode graph): the window's tokens are the growing cache's; each row stops
    at its own EOS in both."""
    entry = ZOO["llama"]
    model = entry.build()
    g = torch.Generator().manual_seed(0)
    cal = [torch.randint(3, entry.vocab, (2, 12), generator=g) for _ in range(2)]
    cm = routefx.compile(model, Duo(budget=0.5, router="random"), calibration=cal)
    ids, mask = _prompt(entry, seed=11)
    grow = cm.generate(ids, mask, max_new_tokens=12, eos_token_id=[])
    eos = int(grow[1, ids.shape[1] + 4])
    for eos_id in ([], eos):
        a = cm.generate(ids, mask, max_new_tokens=12, eos_token_id=eos_id, static_cache=False)
        b = cm.generate(ids, mask, max_new_tokens=12, eos_token_id=eos_id, static_cache=True)
        assert torch.equal(a, b), f"growing\n{a}\nwindow\n{b}"


def test_static_window_with_pruned_layers_and_sampling_equals_growing_cache():
    """A pruned layer has no cache entry in the window either; sampling draws the same tokens from the same
    random stream."""
    entry = ZOO["llama"]
    cm = routefx.compile(entry.build(), PruneLayers(layers=[1]))
    ids, mask = _prompt(entry, seed=5)
    for kw in ({}, {"do_sample": True, "top_k": 20, "temperature": 0.8}):
        a, b = (cm.generate(ids, mask, max_new_tokens=8, static_cache=static,
                            generator=torch.Generator().manual_seed(3), **kw) for static in (False, True))
        assert torch.equal(a, b), f"{kw}: growing\n{a}\nwindow\n{b}"


def test_window_length_and_its_bound(monkeypatch):
    assert window_length(7, 1) == 64 and window_length(64, 2) == 64 and window_length(60, 10) == 128
    monkeypatch.setattr(window, "WINDOW_MULTIPLE", 1)
    assert window_length(7, 1) == 7 and window_length(7, 2) == 7 and window_length(7, 10) == 15
    entry = ZOO["llama"]
    cm = routefx.compile(entry.build(), Dense())
    ids, mask = _prompt(entry)
    step = WindowStepper(cm, mask, 3, cuda_graph=False)   # window 8: two decode steps fit
    logits = step.prefill(ids)
    for _ in range(2):
        logits = step.decode(logits.argmax(-1)[:, None])
    with pytest.raises(BackendError, match=r"window of 8 past positions is full after 2 steps"):
        step.decode(logits.argmax(-1)[:, None])


def test_static_window_refusals():
    entry = ZOO["llama"]
    cm = routefx.compile(entry.build(), Dense())
    ids, mask = _prompt(entry)
    with pytest.raises(InputError, match=r"static_cache=True cannot be combined with a decode_policy"):
        cm.generate(ids, mask, max_new_tokens=3, static_cache=True, decode_policy=DepthDecay(alpha=0.9))
    with pytest.raises(BackendError, match=r"CUDA-graph decode step needs the inputs on a CUDA device, found cpu"):
        WindowStepper(cm, mask, 3, cuda_graph=True)
    bloom = routefx.compile(ZOO["bloom"].build(), Dense())   # no position_ids: a growing cache only
    with pytest.raises(UnsupportedModelError, match=r"static_cache=True .* needs a model that takes position_ids; "
                                                    r"BloomForCausalLM's forward computes its positions"):
        bloom.generate(ids, mask, max_new_tokens=3, static_cache=True)
    assert generate_with_stats(bloom, ids, mask, max_new_tokens=3)[1].mode == "cached"


def test_default_window_refused_by_a_model_decodes_with_the_growing_cache(monkeypatch):
    """Where the window is only the default (CUDA + triton) and refuses the model (recurrent state, positions
    counted from the cache's length), generate decodes with the growing cache, not uncached."""
    from routefx.generate import loop
    from tests.generate.test_recurrent_state import _model
    from tests.generate.test_recurrent_state import _prompt as _state_prompt
    monkeypatch.setattr(loop, "_static", lambda cm, ids, static_cache, *a: static_cache is not False)
    for model in (_model("mamba"), ZOO["bloom"].build()):
        cm = routefx.compile(model, Dense())
        ids, mask = _state_prompt()
        out, stats = generate_with_stats(cm, ids, mask, max_new_tokens=4)
        assert stats.mode == "cached", (type(model).__name__, stats.mode)
        assert torch.equal(out, _hf_greedy(model, ids, mask, 4))


def test_default_window_falls_back_to_the_growing_cache_with_a_warning(monkeypatch):
    """Where the default picks the window (CUDA + triton) and the step cannot be captured, generate warns and
    decodes with the growing cache; asked for explicitly, the error stands."""
    from routefx.generate import loop
    entry = ZOO["llama"]
    cm = routefx.compile(entry.build(), Dense())
    ids, mask = _prompt(entry)
    ref = cm.generate(ids, mask, max_new_tokens=6)

    def no_capture(self, ids):
        raise BackendError("the decode step could not be captured as a CUDA graph: (simulated)")
    monkeypatch.setattr(WindowStepper, "prefill", no_capture)
    monkeypatch.setattr(loop, "_static", lambda cm, ids, static_cache, *a: static_cache is not False)
    with pytest.warns(RuntimeWarning, match=r"could not be captured.*\(simulated\); decoding with a growing cache"):
        out, stats = generate_with_stats(cm, ids, mask, max_new_tokens=6)
    assert torch.equal(out, ref) and stats.mode == "cached (CUDA-graph capture failed)"
    with pytest.raises(BackendError, match=r"\(simulated\)"):
        cm.generate(ids, mask, max_new_tokens=6, static_cache=True)


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("policy", ["dense", "duo"])
def test_cuda_graph_decode_on_triton(policy):
    """backend "triton" on CUDA decodes by replaying one captured CUDA graph per step (the default there):
    Dense equals Hugging Face generate on the GPU, Duo equals its own growing-cache decode (no graphs); fp32, so
    that the kernels' accumulation order cannot flip a greedy choice."""
    entry = ZOO["llama"]
    model = entry.build().cuda()
    ids, mask = (t.cuda() for t in _prompt(entry))
    if policy == "dense":
        cm = routefx.compile(model, Dense(), backend="triton")
    else:
        g = torch.Generator().manual_seed(0)
        cal = [torch.randint(3, entry.vocab, (2, 12), generator=g).cuda() for _ in range(2)]
        cm = routefx.compile(model, Duo(budget=0.5, router="random"), calibration=cal, backend="triton")
    out, stats = generate_with_stats(cm, ids, mask, max_new_tokens=10)
    assert stats.mode == "static-cuda-graph"
    again, _ = generate_with_stats(cm, ids, mask, max_new_tokens=10)   # the captured graph, replayed again
    ref = _hf_greedy(model, ids, mask, 10) if policy == "dense" else \
        cm.generate(ids, mask, max_new_tokens=10, static_cache=False)
    assert torch.equal(out, ref), f"routefx\n{out}\nreference\n{ref}"
    assert torch.equal(again, ref)
    assert len(cm.__dict__["_decode_graphs"]) == 1
