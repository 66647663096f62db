"""Residuals rescaled by learned weights (Doge: `input_residual * residual + attention`, then
`post_attention_residual * residual + mlp`): the stream term of each sum is the stream times input-independent
factors. Recognised as one block per layer (the rescaling is the block's: PruneLayers removes it with the layer,
as deleting the layer does), the MLP read and routed by Duo. HF initialises the factors to 1, which would hide
where they are applied: here they are drawn at random."""
import copy

import pytest
import torch
import transformers as hf

import routefx
from routefx.policies import PruneLayers
from tests.compare import assert_close_nonpad, assert_compiles_to_model, assert_duo_routes_the_mlps, padded_ids
from tests.tolerances import EXACT_REWRITE, MUST_DIFFER
from tests.zoo import hf_model

V = 112


@pytest.fixture(scope="module")
def doge():
    cfg = hf.DogeConfig(vocab_size=V, hidden_size=64, intermediate_size=128, num_hidden_layers=3,
                        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64, pad_token_id=0)
    model = hf_model(hf.DogeForCausalLM, cfg)
    g = torch.Generator().manual_seed(4)
    with torch.no_grad():
        for layer in model.model.layers:
            for p in (layer.input_residual, layer.post_attention_residual):
                p.copy_(0.5 + torch.rand(p.shape, generator=g))
    return model


def _inputs(seed=3, batch=2, seq=11, pad=3):
    return padded_ids(V, seed, batch, seq, pad, low=3)


def test_one_block_per_layer(doge):
    ids, mask = _inputs()
    cm = assert_compiles_to_model(doge, ids, mask)["onnx"]
    assert [b.path for b in cm.ir.blocks] == [f"model.layers.{i}" for i in range(3)]
    assert all(len(b.attention) == 1 and b.ffn.kind == "gated" for b in cm.ir.blocks)


@pytest.mark.parametrize("j", [1, 2])
def test_prune_layers_removes_the_layers_rescaling(doge, j):
    ids, mask = _inputs(seed=4)
    cm = routefx.compile(doge, PruneLayers(layers=[j]), example_inputs=(ids,), example_kwargs={"attention_mask": mask})
    twin = copy.deepcopy(doge)
    twin.model.layers = torch.nn.ModuleList([m for i, m in enumerate(twin.model.layers) if i != j])
    twin.config.num_hidden_layers = 2
    with torch.no_grad():
        want = twin(ids, attention_mask=mask, use_cache=False).logits
        full = doge(ids, attention_mask=mask).logits
    assert_close_nonpad(cm(ids, attention_mask=mask).logits, want, mask, EXACT_REWRITE)
    assert (want - full)[mask.bool()].abs().max() > MUST_DIFFER


@pytest.mark.parametrize("backend", ["eager", "onnx"])
def test_duo_on_scaled_residuals(doge, backend):
    """Duo's routes equal the model's own MLPs routed per token with the plan's routers and neuron orders."""
    cal = [dict(zip(("input_ids", "attention_mask"), _inputs(seed=s, batch=4, seq=16, pad=0))) for s in range(3)]
    assert_duo_routes_the_mlps(doge, cal, *_inputs(seed=9), [f"model.layers.{i}.mlp" for i in range(3)], backend)
