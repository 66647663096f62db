"""Models that keep a KV cache in module state and write it in place during forward (Meta's reference Llama:
`cache_k[:b, p:p + s] = xk`, then attention over `cache_k[:b, :p + s]`): capture turns the writes into functional
ops whose result the attention reads, so the blocks are recognised and every policy applies; the compiled model
equals the model and leaves the model's buffers unchanged (said in the report)."""
import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import routefx
from routefx.ir import capture
from routefx.policies import Dense, Duo, PruneLayers
from tests.tolerances import EXACT_REWRITE, ONNX_VS_EAGER

D, H, KV, HD, V, MAX_B, MAX_S = 32, 4, 2, 8, 64, 4, 32


def _rotary(x, cos, sin):                   # real-valued rotary on interleaved pairs (Meta's, without complex)
    x1, x2 = x.float().reshape(*x.shape[:-1], -1, 2).unbind(-1)
    return torch.stack((x1 * cos - x2 * sin, x1 * sin + x2 * cos), -1).flatten(3).type_as(x)


class Attention(nn.Module):
    def __init__(self, cache: str):
        super().__init__()
        self.wq, self.wk = nn.Linear(D, H * HD, bias=False), nn.Linear(D, KV * HD, bias=False)
        self.wv, self.wo = nn.Linear(D, KV * HD, bias=False), nn.Linear(H * HD, D, bias=False)
        self.cache = cache
        self.register_buffer("cache_k", torch.zeros(MAX_B, MAX_S, KV, HD), persistent=False)
        self.register_buffer("cache_v", torch.zeros(MAX_B, MAX_S, KV, HD), persistent=False)

    def forward(self, x, start_pos, cos, sin, mask):
        b, s, _ = x.shape
        q = _rotary(self.wq(x).view(b, s, H, HD), cos, sin)
        k = _rotary(self.wk(x).view(b, s, KV, HD), cos, sin)
        v = self.wv(x).view(b, s, KV, HD)
        if self.cache == "slices":             # Meta's reference code
            self.cache_k = self.cache_k.to(q)
            self.cache_v = self.cache_v.to(q)
            self.cache_k[:b, start_pos:start_pos + s] = k
            self.cache_v[:b, start_pos:start_pos + s] = v
            k, v = self.cache_k[:b, :start_pos + s], self.cache_v[:b, :start_pos + s]
        elif self.cache == "index":            # gpt-fast style: positions as an index tensor
            pos = torch.arange(start_pos, start_pos + s)
            self.cache_k[:b, pos] = k
            self.cache_v[:b, pos] = v
            k, v = self.cache_k[:b, :start_pos + s], self.cache_v[:b, :start_pos + s]
        k, v = (t.repeat_interleave(H // KV, dim=2).transpose(1, 2) for t in (k, v))
        scores = q.transpose(1, 2) @ k.transpose(2, 3) / math.sqrt(HD) + mask
        out = F.softmax(scores.float(), dim=-1).type_as(q) @ v
        return self.wo(out.transpose(1, 2).reshape(b, s, -1))


class Block(nn.Module):
    def __init__(self, cache):
        super().__init__()
        self.attention, self.attention_norm, self.ffn_norm = Attention(cache), nn.RMSNorm(D), nn.RMSNorm(D)
        self.w1, self.w2, self.w3 = nn.Linear(D, 40, bias=False), nn.Linear(40, D, bias=False), nn.Linear(D, 40,
                                                                                                            bias=False)

    def forward(self, x, start_pos, cos, sin, mask):
        h = x + self.attention(self.attention_norm(x), start_pos, cos, sin, mask)
        f = self.ffn_norm(h)
        return h + self.w2(F.silu(self.w1(f)) * self.w3(f))


class MetaStyle(nn.Module):
    def __init__(self, cache: str, layers: int = 3):
        super().__init__()
        torch.manual_seed(0)
        self.tok_embeddings = nn.Embedding(V, D)
        self.layers = nn.ModuleList(Block(cache) for _ in range(layers))
        self.norm, self.output = nn.RMSNorm(D), nn.Linear(D, V, bias=False)
        freqs = torch.outer(torch.arange(MAX_S).float(), 1.0 / 10000 ** (torch.arange(0, HD, 2).float() / HD))
        self.register_buffer("cos", freqs.cos(), persistent=False)
        self.register_buffer("sin", freqs.sin(), persistent=False)

    def forward(self, tokens, start_pos: int = 0):
        s = tokens.shape[1]
        h = self.tok_embeddings(tokens)
        cos = self.cos[start_pos:start_pos + s][None, :, None, :]
        sin = self.sin[start_pos:start_pos + s][None, :, None, :]
        mask = torch.triu(torch.full((s, s), float("-inf")), diagonal=1)
        mask = torch.hstack([torch.zeros(s, start_pos), mask]).type_as(h)
        for layer in self.layers:
            h = layer(h, start_pos, cos, sin, mask)
        return self.output(self.norm(h)).float()


def _twin(cache):
    """The same weights without the cache (the reference the cached model must equal)."""
    model, plain = MetaStyle(cache).eval(), MetaStyle("none").eval()
    plain.load_state_dict(model.state_dict())
    return model, plain


@pytest.mark.parametrize("cache", ["slices", "index"])
def test_capture_reads_the_written_cache_as_data(cache):
    model, plain = _twin(cache)
    ids = torch.randint(0, V, (2, 9), generator=torch.Generator().manual_seed(1))
    gm = capture(model, (ids,), {})
    assert not [n for n in gm.graph.nodes if n.op == "call_function" and str(n.target).endswith("_.default")]
    assert sorted(gm.meta["routefx"].state_writes) == sorted(f"layers.{i}.attention.cache_{t}" for i in range(3)
                                                             for t in "kv")
    for backend, tol in (("eager", EXACT_REWRITE), ("onnx", ONNX_VS_EAGER)):
        cm = routefx.compile(model, Dense(), example_inputs=(ids,), backend=backend)
        other = torch.randint(0, V, (3, 13), generator=torch.Generator().manual_seed(2))
        for x in (ids, other):
            with torch.no_grad():
                torch.testing.assert_close(cm(x), plain(x), rtol=0, atol=tol)
        assert [b.attention[0].causal for b in cm.ir.blocks] == [True] * 3
    assert any("leaves the model's buffers unchanged" in n for n in cm.report.notes)
    assert all(not b.any() for n, b in model.named_buffers() if "cache" in n)


def test_policies_apply_to_a_model_with_a_cache_in_state():
    model, plain = _twin("slices")
    ids = torch.randint(0, V, (2, 9), generator=torch.Generator().manual_seed(1))
    pruned = routefx.compile(model, PruneLayers(layers=[1]), example_inputs=(ids,))
    ref = routefx.compile(plain, PruneLayers(layers=[1]), example_inputs=(ids,))
    with torch.no_grad():
        torch.testing.assert_close(pruned(ids), ref(ids), rtol=0, atol=EXACT_REWRITE)
    cal = [{"tokens": torch.randint(0, V, (2, 16), generator=torch.Generator().manual_seed(s))} for s in range(2)]
    duo = routefx.compile(model, Duo(budget=0.5, router="local"), calibration=cal, example_inputs=(ids,))
    assert duo.report.pass_report("insert_routers").rewrites == 3
    with torch.no_grad():
        assert torch.isfinite(duo(ids)).all()


def test_generate_on_a_forward_that_names_its_ids_otherwise():
    """forward(tokens, start_pos=0), no cache convention routefx captures: generation runs uncached, passing the
    ids by position; the tokens equal greedy decoding with the cache-free twin."""
    model, plain = _twin("slices")
    ids = torch.randint(0, V, (2, 9), generator=torch.Generator().manual_seed(4))
    cm = routefx.compile(model, Dense(), example_inputs=(ids,), backend="onnx")
    out = cm.generate(ids, max_new_tokens=5)
    seq = ids
    with torch.no_grad():
        for _ in range(5):
            seq = torch.cat([seq, plain(seq)[:, -1].argmax(-1, keepdim=True)], dim=1)
    assert torch.equal(out, seq)


def test_a_forward_that_reads_earlier_calls_state_keeps_writing_it():
    """Captured with start_pos=4, the attention reads cache positions [0, 4) that earlier calls wrote: the output
    depends on the buffers' contents, so the graph writes them back at its end as the model does, and repeated calls
    equal the model's own (its state evolving alike)."""
    model, twin = MetaStyle("slices").eval(), MetaStyle("slices").eval()
    ids = torch.randint(0, V, (2, 5), generator=torch.Generator().manual_seed(6))
    gm = capture(model, (ids,), {"start_pos": 4})
    assert gm.meta["routefx"].state_writes == []
    assert sum(n.target is torch.ops.aten.copy_.default for n in gm.graph.nodes) == 6
    cm = routefx.compile(model, Dense(), example_inputs=(ids,), example_kwargs={"start_pos": 4})
    assert not any("leaves the model's buffers unchanged" in n for n in cm.report.notes)
    g = torch.Generator().manual_seed(7)
    with torch.no_grad():
        for _ in range(3):
            x = torch.randint(0, V, (2, 5), generator=g)
            torch.testing.assert_close(cm(x, start_pos=4), twin(x, start_pos=4), rtol=0, atol=EXACT_REWRITE)


class _FreshWrites(nn.Module):
    """In-place writes onto tensors the forward creates: a half tensor added to in place (the functional add would
    promote to float32), a top-k renormalised in place after a read (Mixtral), a buffer filled through slices and
    a select (MLA's key), and a write whose tensor is read afterwards through a view made before it (stays)."""

    def forward(self, x, y):
        a = x.half() * 2
        a.add_(y)
        top = torch.topk(x, 2, -1).values
        top /= top.sum(-1, keepdim=True)
        k = x.new_empty(x.shape[0], x.shape[1], 6)
        k[..., :4] = x[..., :4]
        k[:, 0, 4:] = 1.0
        k[:, 1:, 4:] = y[:, 1:, :2]
        kept = x * 3
        flat = kept.view(-1)
        kept.mul_(2)
        return a.float() + 1, top * 3, k, flat + 1


def test_writes_onto_fresh_tensors_become_functional():
    """Capture makes every write onto a fresh tensor functional where nothing can tell (dtype kept, later readers
    read the new value) and keeps the one a view made before it would see; the graph equals the module at other
    sizes."""
    x, y = torch.randn(2, 5, 6), torch.randn(2, 5, 6)
    gm = capture(_FreshWrites(), (x, y))
    left = [n.target for n in gm.graph.nodes if n.op == "call_function"
            and isinstance(n.target, torch._ops.OpOverload) and n.target._schema.is_mutable]
    assert left == [torch.ops.aten.mul_.Tensor]
    for b, s in ((2, 5), (3, 7)):
        x, y = torch.randn(b, s, 6), torch.randn(b, s, 6)
        want, got = _FreshWrites()(x, y), gm(x, y)
        for w, g in zip(want, got):
            assert g.dtype == w.dtype
            torch.testing.assert_close(g, w, atol=0, rtol=0)
