"""MoE blocks written by hand with one dense FFN module per expert, as research code writes them: a loop that gathers
each expert's tokens and adds its weighted output back (data-dependent sizes), or every expert on every token
weighted afterwards (or on its input). RaiseMoE reads them by structure (the router, E dense FFNs, the first
[tokens, d] value after all of them) and checks the reading on probe inputs before replacing the dispatch by one
routed_ffn; a dispatch that computes something else (a capacity limit) is left as captured, with the reason.
"""
import pytest
import torch
import torch.nn.functional as F
from torch import nn

import routefx
from routefx.ir import graph_utils as gu
from routefx.policies import Dense, MoEBudget
from tests.tolerances import EXACT_REWRITE, HALF_VS_HF, ONNX_VS_EAGER

D, FF, E, K, V = 32, 48, 4, 2, 50


class Expert(nn.Module):
    def __init__(self, bias: bool, width: int = FF):
        super().__init__()
        self.w1, self.w3 = nn.Linear(D, width, bias=bias), nn.Linear(D, width, bias=bias)
        self.w2 = nn.Linear(width, D, bias=False)

    def forward(self, x):
        return self.w2(F.silu(self.w1(x)) * self.w3(x))


class HandMoE(nn.Module):
    def __init__(self, form: str, bias: bool = False, shared: bool = False):
        super().__init__()
        self.gate = nn.Linear(D, E, bias=False)
        self.experts = nn.ModuleList(Expert(bias) for _ in range(E))
        self.shared = Expert(bias, width=40) if shared else None   # DeepSeek-style: every token, added after
        self.form = form

    def forward(self, x):
        B, S, _ = x.shape
        h = x.view(-1, D)
        w, idx = torch.topk(self.gate(h).softmax(-1), K, dim=-1)
        w = w / w.sum(-1, keepdim=True)
        if self.form in ("loop", "capacity"):
            out = torch.zeros_like(h)
            for e, expert in enumerate(self.experts):
                tok, slot = torch.where(idx == e)
                if self.form == "capacity":          # Switch-style: at most 16 tokens per expert, the rest dropped
                    tok, slot = tok[:16], slot[:16]
                out.index_add_(0, tok, w[tok, slot, None] * expert(h[tok]))
        else:
            dense_w = torch.zeros(h.shape[0], E, dtype=h.dtype).scatter(1, idx, w)     # zero off the top-k
            if self.form == "every_expert":
                outs = torch.stack([expert(h) for expert in self.experts], dim=1)       # [T, E, d]
                out = (outs * dense_w[..., None]).sum(1)
            else:   # "input_weighted": each expert on its weighted input
                out = sum(expert(h * dense_w[:, e:e + 1]) for e, expert in enumerate(self.experts))
        if self.shared is not None:
            out = out + self.shared(h)
        return out.view(B, S, D)


class LM(nn.Module):
    """Pre-norm blocks of attention and a `HandMoE` (or what `moe()` builds)."""

    def __init__(self, form: str = "loop", bias: bool = False, layers: int = 2, shared: bool = False, moe=None):
        super().__init__()
        torch.manual_seed(0)
        self.emb = nn.Embedding(V, D)
        self.blocks = nn.ModuleList(nn.ModuleDict(dict(
            n1=nn.LayerNorm(D), attn=nn.MultiheadAttention(D, 2, batch_first=True), n2=nn.LayerNorm(D),
            moe=moe() if moe else HandMoE(form, bias, shared))) for _ in range(layers))
        self.head = nn.Linear(D, V)

    def forward(self, input_ids):
        x = self.emb(input_ids)
        causal = torch.triu(torch.ones(x.shape[1], x.shape[1], dtype=torch.bool), 1)
        for b in self.blocks:
            a = b["n1"](x)
            x = x + b["attn"](a, a, a, attn_mask=causal, need_weights=False)[0]
            x = x + b["moe"](b["n2"](x))
        return self.head(x)


def _ids(seed=2, shape=(2, 9)):
    return torch.randint(0, V, shape, generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("form,bias,shared", [("loop", False, False), ("every_expert", False, False),
                                              ("input_weighted", False, False), ("loop", True, False),
                                              ("loop", False, True), ("every_expert", True, True)])
def test_hand_written_moe_is_raised(form, bias, shared):
    model = LM(form, bias, shared=shared).eval()
    ids = _ids()
    for backend, tol in (("eager", EXACT_REWRITE), ("onnx", ONNX_VS_EAGER)):
        cm = routefx.compile(model, Dense(), example_inputs=(ids,), backend=backend)
        for x in (ids, _ids(5, (3, 14))):            # the example and another shape
            with torch.no_grad():
                torch.testing.assert_close(cm(x), model(x), rtol=0, atol=tol)
    rep = cm.report.pass_report("raise_moe")
    assert rep.rewrites == 2 and rep.misses == []
    assert all(b.ffn.kind == "moe" and b.ffn.num_experts == E and b.ffn.top_k == K
               and b.ffn.routed == [[e * FF, (e + 1) * FF] for e in range(E)]
               and b.ffn.shared_expert_size == (40 if shared else None) for b in cm.ir.blocks)
    left = {str(n.target) for n in cm.graph_module.graph.nodes if n.op == "call_function"}
    assert not left & {"aten.index_add.default", "aten.nonzero.default", "aten._assert_scalar.default"}
    # no expert module's own weight is read any more: only routed_ffn's concatenated copies
    assert not [n.target for n in cm.graph_module.graph.nodes if n.op == "get_attr" and "experts_" in n.target
                and not n.target.startswith("routefx_")]
    if form == "every_expert":       # the captured model ran all E experts per token, the compiled one K
        f = cm.report.flops_per_token
        assert f["before"] - f["after"] == pytest.approx(2 * (E - K) * 2 * 3 * D * FF, rel=1e-9)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_a_capacity_limited_dispatch_is_left_as_captured(dtype):
    """Dropping tokens past an expert's capacity is not sum_k g_k FFN_k(x): the probe of one repeated token (every
    row choosing the same experts) shows it, so the block stays as captured and the model is unchanged. Also in
    bf16 / fp16, where the probe check compares within a few ulps of the experts' dtype (it once allowed 200 ulps
    of bf16, and took this dispatch for sum_k g_k FFN_k(x))."""
    model = LM("capacity").eval().to(dtype)
    ids = _ids()
    cm = routefx.compile(model, Dense(), example_inputs=(ids,), backend="eager")
    rep = cm.report.pass_report("raise_moe")
    assert rep.rewrites == 0 and all("neither" in m["reason"] for m in rep.misses) and len(rep.misses) == 2
    same = torch.full((1, 12), 7)
    with torch.no_grad():
        torch.testing.assert_close(cm(same).float(), model(same).float(), rtol=0,
                                   atol=EXACT_REWRITE if dtype == torch.float32 else HALF_VS_HF)


def test_moe_budget_adapts_hand_written_experts():
    """MoEBudget on the raised loop: budget 1 is the model itself; a lower budget computes fewer experts."""
    model = LM("loop").eval()
    cal = [_ids(s, (2, 16)) for s in range(3)]
    ids = _ids()
    full = routefx.compile(model, MoEBudget(1.0), calibration=cal, example_inputs=(ids,))
    with torch.no_grad():
        torch.testing.assert_close(full(ids), model(ids), rtol=0, atol=EXACT_REWRITE)
    half = routefx.compile(model, MoEBudget(0.6), calibration=cal, example_inputs=(ids,))
    assert half.report.pass_report("adapt_experts").rewrites == 2
    with torch.no_grad():
        assert torch.isfinite(half(ids)).all() and not torch.allclose(half(ids), model(ids))


def test_hand_written_moe_on_the_triton_interpreter():
    """Biased experts with a shared expert (loop) and input-weighted experts: their routed_ffn runs as the Triton
    op under the interpreter and equals the model."""
    import os
    if os.environ.get("TRITON_INTERPRET", "0") in ("", "0"):
        pytest.skip("TRITON_INTERPRET is off (CUDA present): the CPU interpreter tests run where CUDA is hidden")
    from routefx.backends.triton import ffn  # noqa: F401  (registers the op)
    for form, bias, shared in (("loop", True, True), ("input_weighted", False, False)):
        model = LM(form, bias, shared=shared).eval()
        ids = _ids()
        cm = routefx.compile(model, Dense(), example_inputs=(ids,), backend="triton")
        with torch.no_grad():
            torch.testing.assert_close(cm(ids), model(ids), rtol=0, atol=ONNX_VS_EAGER)
        assert cm.runner.stats.triton_ops == 2


class SwitchMoE(nn.Module):
    """Switch-Transformer style: biased GELU MLP experts (each its own down bias), softmax probabilities, top-k, the
    gate picked per expert through a mask (`(gate * (idx == e)).sum(-1)`), written rows by `out[rows] +=`."""

    def __init__(self, k: int):
        super().__init__()
        self.router = nn.Linear(D, E)
        self.experts = nn.ModuleList(nn.Sequential(nn.Linear(D, FF), nn.GELU(), nn.Linear(FF, D)) for _ in range(E))
        self.k = k

    def forward(self, x):
        h = x.reshape(-1, D)
        gate, idx = F.softmax(self.router(h), dim=-1).topk(self.k, dim=-1)
        out = torch.zeros_like(h)
        for e in range(E):
            chosen = idx == e
            rows = chosen.any(-1).nonzero().squeeze(-1)
            out[rows] += (gate * chosen).sum(-1)[rows, None] * self.experts[e](h[rows])
        return out.reshape(x.shape)


def _raised_with(moe) -> list:
    """An LM whose MoE blocks are `moe()`, compiled (Dense) on eager and onnx: each equal to the model at two
    shapes, both blocks raised; returns the IR blocks of the last compile."""
    model = LM("loop").eval()
    for b in model.blocks:
        b["moe"] = moe()
    model.eval()
    ids = _ids()
    for backend, tol in (("eager", EXACT_REWRITE), ("onnx", ONNX_VS_EAGER)):
        cm = routefx.compile(model, Dense(), example_inputs=(ids,), backend=backend)
        for x in (ids, _ids(5, (3, 14))):
            with torch.no_grad():
                torch.testing.assert_close(cm(x), model(x), rtol=0, atol=tol)
        rep = cm.report.pass_report("raise_moe")
        assert rep.rewrites == 2 and rep.misses == []
    return cm.ir.blocks


@pytest.mark.parametrize("k", [1, 2])
def test_switch_style_experts_with_their_own_biases(k):
    blocks = _raised_with(lambda: SwitchMoE(k))
    assert all(b.ffn.kind == "moe" and b.ffn.top_k == k and b.ffn.activation == "gelu" for b in blocks)


class StackedLoopMoE(nn.Module):
    """Experts as stacked parameters [E, F, d] / [E, d, F], a loop reading `w[e]` for each expert's tokens."""

    def __init__(self):
        super().__init__()
        self.gate = nn.Linear(D, E, bias=False)
        self.w1, self.w3 = nn.Parameter(torch.randn(E, FF, D) * 0.2), nn.Parameter(torch.randn(E, FF, D) * 0.2)
        self.w2 = nn.Parameter(torch.randn(E, D, FF) * 0.2)

    def forward(self, x):
        h = x.reshape(-1, D)
        w, idx = torch.topk(self.gate(h), K, dim=-1)
        w = w.softmax(-1)
        out = torch.zeros_like(h)
        for e in range(E):
            tok, slot = torch.where(idx == e)
            t = h[tok]
            y = F.linear(F.silu(F.linear(t, self.w1[e])) * F.linear(t, self.w3[e]), self.w2[e])
            out.index_add_(0, tok, w[tok, slot, None] * y)
        return out.reshape(x.shape)


def test_experts_as_stacked_parameters_in_a_loop():
    blocks = _raised_with(StackedLoopMoE)
    assert all(b.ffn.kind == "moe" and b.ffn.routed == [[e * FF, (e + 1) * FF] for e in range(E)] for b in blocks)



class SortedSplitMoE(nn.Module):
    """ScatterMoE / JetMoE style: the (token, choice) pairs sorted by expert, the gathered rows split by per-expert
    counts (`.tolist()`: data-dependent sizes), one product per expert piece, the activation over the concatenated
    rows, split again for the down products, weighted and added back per token. `layout`: "fused" (one stacked
    [E, 2F, d] gate-up weight, chunked), "separate" (gate and up Linear modules per expert), "mlp" (biased GELU
    experts as modules)."""

    def __init__(self, layout: str):
        super().__init__()
        self.gate, self.layout = nn.Linear(D, E, bias=False), layout
        if layout == "fused":
            self.w_in = nn.Parameter(torch.randn(E, 2 * FF, D) * 0.2)
            self.w_out = nn.Parameter(torch.randn(E, D, FF) * 0.2)
        else:
            bias = layout == "mlp"
            self.ups = nn.ModuleList(nn.Linear(D, FF, bias=bias) for _ in range(E))
            self.gates = nn.ModuleList(nn.Linear(D, FF, bias=False) for _ in range(E)) if not bias else None
            self.downs = nn.ModuleList(nn.Linear(FF, D, bias=bias) for _ in range(E))

    def forward(self, x):
        h = x.reshape(-1, D)
        logits, idx = self.gate(h).topk(K, dim=-1)
        w = logits.softmax(-1)
        counts = torch.zeros(h.shape[0], E, dtype=torch.long).scatter(1, idx, 1).sum(0).tolist()
        _, order = idx.flatten().sort(0)
        token = order.div(K, rounding_mode="trunc")
        pieces = h[token].split(counts, dim=0)
        if self.layout == "fused":
            a, b = torch.cat([F.linear(p, self.w_in[e]) for e, p in enumerate(pieces)]).chunk(2, dim=-1)
            hid = F.silu(a) * b
        elif self.layout == "separate":
            hid = F.silu(torch.cat([g(p) for g, p in zip(self.gates, pieces)])) \
                * torch.cat([u(p) for u, p in zip(self.ups, pieces)])
        else:
            hid = F.gelu(torch.cat([u(p) for u, p in zip(self.ups, pieces)]))
        hid = hid.split(counts, dim=0)
        downs = [F.linear(p, self.w_out[e]) for e, p in enumerate(hid)] if self.layout == "fused" \
            else [dn(p) for dn, p in zip(self.downs, hid)]
        y = torch.cat(downs) * w.flatten()[order][:, None]
        return torch.zeros_like(h).index_add(0, token, y).reshape(x.shape)


@pytest.mark.parametrize("layout", ["fused", "separate", "mlp"])
def test_experts_on_tokens_sorted_and_split_by_count(layout):
    blocks = _raised_with(lambda: SortedSplitMoE(layout))
    assert all(b.ffn.kind == "moe" and b.ffn.num_experts == E and b.ffn.top_k == K
               and b.ffn.activation == ("gelu" if layout == "mlp" else "silu")
               and b.ffn.routed == [[e * FF, (e + 1) * FF] for e in range(E)] for b in blocks)
