"""Gemma 4's decoder layers: besides attention and the FFN each layer adds a third branch to the stream (a
per-layer input, gated by the stream and projected back), then rescales the stream by its `layer_scalar`; the
layers that share an earlier layer's keys and values (`num_kv_shared_layers`) read the stream through a slice.
Recognised as one block per layer (the per-layer-input branch inside it, the rescaling part of its output), its
FFN read (Duo routes it), PruneLayers equal to the model with that layer replaced by the identity, and a layer
whose keys and values later layers read refused with the reason. Gemma 4's MoE layers (a dense MLP and top-k
experts side by side, each with its own norms; the experts read another norm of the stream than the router) raise
onto routed_ffn and take MoEBudget."""
import contextlib

import pytest
import torch
import transformers as hf

import routefx
from routefx.generate import LayerSubset
from routefx.errors import UnsupportedModelError
from routefx.policies import Dense, PruneLayers
from tests.compare import (assert_close_nonpad, assert_compiles_to_model, assert_duo_routes_the_mlps,
                           assert_moe_budget_adapts, padded_ids, skipped_in_decode)
from tests.tolerances import EXACT_REWRITE
from tests.zoo import hf_model, redraw_

V = 112
LAYERS = 4


def _gemma4(shared: int = 0, **moe) -> torch.nn.Module:
    """Four layers (sliding and full attention alternating), per-layer inputs of width 16, `shared` layers at the
    end reading earlier layers' keys and values; every `layer_scalar` drawn in [0.5, 1.5] (HF initialises them to
    1, which would hide where the rescaling is applied)."""
    cfg = hf.Gemma4TextConfig(**moe, vocab_size=V, hidden_size=64, intermediate_size=128, num_hidden_layers=LAYERS,
                              num_attention_heads=4, num_key_value_heads=2, head_dim=16, global_head_dim=16,
                              hidden_size_per_layer_input=16, vocab_size_per_layer_input=V, sliding_window=6,
                              layer_types=["sliding_attention", "full_attention"] * (LAYERS // 2),
                              num_kv_shared_layers=shared, max_position_embeddings=64, pad_token_id=0)
    model = hf_model(hf.Gemma4ForCausalLM, cfg)
    g = torch.Generator().manual_seed(5)
    with torch.no_grad():
        for layer in model.model.layers:
            layer.layer_scalar.copy_(0.5 + torch.rand(1, generator=g))
    return model


def _inputs(seed=3, batch=2, seq=11, pad=3):
    return padded_ids(V, seed, batch, seq, pad, low=3)


@contextlib.contextmanager
def _identity_layer(model, j: int):
    """Layer j of `model` returns its input: the layer deleted in place (the others keep their index, which picks
    their per-layer input)."""
    layer = model.model.layers[j]
    layer.forward = lambda hidden_states, *args, **kwargs: hidden_states
    try:
        yield model
    finally:
        del layer.forward


@pytest.fixture(scope="module")
def model():
    return _gemma4()


def test_one_block_per_layer(model):
    ids, mask = _inputs()
    cm = assert_compiles_to_model(model, ids, mask)["onnx"]
    assert [b.path for b in cm.ir.blocks] == [f"model.layers.{i}" for i in range(LAYERS)]
    for b in cm.ir.blocks:
        assert b.form == "sandwich" and len(b.attention) == 1
        assert (b.ffn.kind, b.ffn.activation, b.ffn.intermediate_size) == ("gated", "gelu_tanh", 128)


@pytest.mark.parametrize("j", [1, LAYERS - 1])
def test_prune_layers_is_the_layer_replaced_by_identity(model, j):
    """The block includes its per-layer-input branch and the rescaling (the last layer's too): pruning it equals
    the model without that layer, exactly."""
    ids, mask = _inputs(seed=4)
    cm = routefx.compile(model, PruneLayers(layers=[j]), example_inputs=(ids,), example_kwargs={"attention_mask": mask})
    assert [b.path for b in cm.ir.blocks] == [f"model.layers.{i}" for i in range(LAYERS) if i != j]
    # nothing of layer j is left, its rescaling included (which the final norm would hide in the logits)
    graph = cm.graph_module.graph
    assert not [n.name for n in graph.nodes if n.op in ("get_attr", "placeholder") and f"layers_{j}_" in n.name]
    with torch.no_grad(), _identity_layer(model, j):
        want = model(ids, attention_mask=mask, use_cache=False).logits
    assert_close_nonpad(cm(ids, attention_mask=mask).logits, want, mask, EXACT_REWRITE)
    with torch.no_grad():
        full = model(ids, attention_mask=mask).logits
    assert (want - full)[mask.bool()].abs().max() > 1e-3     # the layer mattered


def test_duo_routes_each_layers_mlp(model):
    """Duo's routes equal the model's own MLPs routed per token; the per-layer-input branches stay dense."""
    cal = [dict(zip(("input_ids", "attention_mask"), _inputs(seed=s, batch=4, seq=16, pad=0))) for s in range(3)]
    assert_duo_routes_the_mlps(model, cal, *_inputs(seed=9), [f"model.layers.{i}.mlp" for i in range(LAYERS)])


@pytest.mark.parametrize("backend", ["eager", "onnx"])
def test_decode_skips_layers_per_row(model, backend):
    """LayerSubset on Gemma 4 (per-layer inputs computed before the first layer, read by every layer; the final
    norm's weight cast): row 0 skips layer 1, row 1 layers 0 and 3, in every decode step, = HF generate with those
    layers returning their input there."""
    ids, mask = _inputs()
    cm = routefx.compile(model, Dense(), backend=backend)
    out = cm.generate(ids, mask, max_new_tokens=6, eos_token_id=[], decode_policy=LayerSubset(skip=((1,), (0, 3))))
    rows = {0: torch.tensor([False, True]), 1: torch.tensor([True, False]), 3: torch.tensor([False, True])}
    with torch.no_grad(), skipped_in_decode(model, rows):
        want = model.generate(ids, attention_mask=mask, max_new_tokens=6, do_sample=False, pad_token_id=0)
    assert torch.equal(out, want)
    with torch.no_grad():
        dense = model.generate(ids, attention_mask=mask, max_new_tokens=6, do_sample=False, pad_token_id=0)
    assert not torch.equal(want, dense)                 # the skips changed the tokens


def test_kv_sharing_layers():
    """Layers 2 and 3 read the keys and values of layers 0 and 1: all four are blocks (their stream comes through
    a slice), the model compiles and generates as HF does, a sharing layer prunes like any other, and pruning a
    layer whose keys and values are read later is refused with the reason."""
    shared = _gemma4(shared=2)
    ids, mask = _inputs()
    cm = assert_compiles_to_model(shared, ids, mask)["onnx"]
    assert [b.path for b in cm.ir.blocks] == [f"model.layers.{i}" for i in range(LAYERS)]
    with torch.no_grad():
        want = shared.generate(ids, attention_mask=mask, max_new_tokens=6, do_sample=False, pad_token_id=0)
    assert torch.equal(cm.generate(ids, attention_mask=mask, max_new_tokens=6), want)

    pruned = routefx.compile(shared, PruneLayers(layers=[3]), example_inputs=(ids,),
                             example_kwargs={"attention_mask": mask})
    with torch.no_grad(), _identity_layer(shared, 3):
        want = shared(ids, attention_mask=mask, use_cache=False).logits
    assert_close_nonpad(pruned(ids, attention_mask=mask).logits, want, mask, EXACT_REWRITE)

    with pytest.raises(UnsupportedModelError, match=r"PruneLayers: block 1 \(model.layers.1\) computes .*, "
                                                    r"read by .* in model.layers.3"):
        routefx.compile(shared, PruneLayers(layers=[1]), example_inputs=(ids,), example_kwargs={"attention_mask": mask})
    both = routefx.compile(shared, PruneLayers(layers=[1, 3]), example_inputs=(ids,),   # with its only reader: fine
                           example_kwargs={"attention_mask": mask})
    with torch.no_grad(), _identity_layer(shared, 1), _identity_layer(shared, 3):
        want = shared(ids, attention_mask=mask, use_cache=False).logits
    assert_close_nonpad(both(ids, attention_mask=mask).logits, want, mask, EXACT_REWRITE)


def test_keep_passes_over_a_layer_whose_keys_and_values_are_read_later(monkeypatch):
    """Block Influence ranks layer 1 (whose keys and values layer 3 reads) least influential: PruneLayers(keep)
    passes over it to the next block instead of failing, and the result equals the model without that block."""
    import routefx.calibrate.stage as stage
    shared = _gemma4(shared=2)
    ids, mask = _inputs()
    monkeypatch.setattr(stage, "block_influence", lambda gm, ir, batches: [0.9, 0.0, 0.5, 0.6])
    cm = routefx.compile(shared, PruneLayers(keep=0.75), example_inputs=(ids,), example_kwargs={"attention_mask": mask},
                         calibration=[{"input_ids": ids, "attention_mask": mask}])
    assert cm.plan.pruned == [2]
    with torch.no_grad(), _identity_layer(shared, 2):
        want = shared(ids, attention_mask=mask, use_cache=False).logits
    assert_close_nonpad(cm(ids, attention_mask=mask).logits, want, mask, EXACT_REWRITE)


def test_moe_layers():
    """Each layer's experts become one routed_ffn over 4 ranges (their input: the experts' own norm of the stream,
    not the router's); the dense MLP beside them stays as it is. = HF on eager and onnx; MoEBudget(1) = HF,
    MoEBudget(0.6) computes fewer experts."""
    model = _gemma4(enable_moe_block=True, num_experts=4, top_k_experts=2, moe_intermediate_size=32)
    # routers, experts and norms away from HF's init: the router's and the experts' norms differ
    redraw_(model, lambda name, p: any(k in name for k in ("router", "experts", "layernorm")), 0.3, seed=3)
    ids, mask = _inputs()
    cm = assert_compiles_to_model(model, ids, mask)["onnx"]
    assert cm.report.pass_report("raise_moe").rewrites == LAYERS
    for b in cm.ir.blocks:
        f = b.ffn
        assert (f.kind, f.num_experts, f.top_k, f.shared_expert_size) == ("moe", 4, 2, 128)
        assert f.routed == [[e * 32, (e + 1) * 32] for e in range(4)]
    cal = [{"input_ids": _inputs(seed=s, batch=2, seq=16, pad=0)[0]} for s in range(3)]
    half, _ = assert_moe_budget_adapts(model, cal, ids, mask, LAYERS)
    assert half.route_stats([{"input_ids": ids, "attention_mask": mask}]).budget < 0.9
