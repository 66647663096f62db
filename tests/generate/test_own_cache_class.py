"""A model that keeps part of its layers' state in a cache class of its own (MiniMax: its lightning-attention
layers' states in `MiniMaxCache.linear_cache`, a per-layer list beside the attention layers' keys and values)
generates with a cache: routefx reads the tensors of the class's per-layer lists as state, as it reads
transformers' conv and recurrent states. MiniMax's decode step takes its mask length from its first layer's cache,
a linear layer with no keys, so its attention mask has one key column ([B, 1, 1, 1]) that torch broadcasts over
the keys; the ONNX export writes that broadcast out (ONNX Runtime's Attention wants the keys' length)."""
import pytest
import torch
import torch.nn.functional as F

import routefx
from routefx.backends.onnx_masks import expand_attention_masks
from routefx.generate.graphs import generation_graphs
from routefx.generate.loop import generate_with_stats
from routefx.policies import Dense


def _minimax():
    from transformers import MiniMaxConfig, MiniMaxForCausalLM
    torch.manual_seed(0)
    cfg = MiniMaxConfig(vocab_size=97, hidden_size=32, intermediate_size=48, num_hidden_layers=3,
                        num_attention_heads=4, num_key_value_heads=2, head_dim=8, num_local_experts=2,
                        num_experts_per_tok=1, max_position_embeddings=64, block_size=4,
                        layer_types=["linear_attention", "full_attention", "linear_attention"])
    cfg._attn_implementation = "sdpa"
    return MiniMaxForCausalLM(cfg).eval()


@pytest.mark.parametrize("backend", ["eager", "onnx"])
def test_a_model_with_its_own_cache_class_generates_with_a_cache(backend):
    model = _minimax()
    ids = torch.randint(3, 97, (2, 9), generator=torch.Generator().manual_seed(3))
    mask = torch.ones_like(ids)
    mask[0, :3] = 0
    cm = routefx.compile(model, Dense(), backend=backend)
    out, stats = generate_with_stats(cm, ids, mask, max_new_tokens=6)
    assert stats.mode == "cached"
    layout = generation_graphs(cm).layout
    assert layout.cache_class is not None and layout.cache_class.__name__ == "MiniMaxCache"
    assert sorted({(s.layer, s.kind) for s in layout.states}) == [(0, "linear_cache"), (2, "linear_cache")]
    with torch.no_grad():
        want = model.generate(ids, attention_mask=mask, max_new_tokens=6, do_sample=False)
    assert torch.equal(out, want)
    if backend == "onnx":   # its states are state like a scan's: a generation artifact refuses them, saying so
        import tempfile
        cm(ids, attention_mask=mask)
        with pytest.raises(routefx.UnsupportedModelError, match=r"layers \[0, 2\] keep recurrent state"):
            routefx.export(cm, tempfile.mkdtemp() + "/a", generate=True)


class _KeyBroadcastMask(torch.nn.Module):
    def forward(self, q, k, v, mask):
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask)


def test_a_mask_broadcast_over_the_keys_is_expanded_and_computes_the_same():
    q, k, v = (torch.randn(2, 4, s, 8) for s in (1, 5, 5))
    mask = torch.tensor([True, False]).view(2, 1, 1, 1)
    seq = torch.export.Dim("seq", min=2)
    ep = torch.export.export(_KeyBroadcastMask(), (q, k, v, mask),
                             dynamic_shapes=({}, {2: seq}, {2: seq}, {}))
    gm, count = expand_attention_masks(ep.module())
    assert count == 1
    for keys in (5, 11):
        args = (q, torch.randn(2, 4, keys, 8), torch.randn(2, 4, keys, 8), mask)
        torch.testing.assert_close(gm(*args), _KeyBroadcastMask()(*args), rtol=0, atol=0)
    _, none = expand_attention_masks(torch.export.export(
        _KeyBroadcastMask(), (q, k, v, mask.expand(2, 1, 1, 5))).module())
    assert none == 0
