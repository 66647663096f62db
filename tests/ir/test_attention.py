"""Attention read from the graph by structure: causal / sliding window / bidirectional, ALiBi slopes, logit
soft-capping, for SDPA and for eager attention (matmul -> soft-cap -> + mask/bias -> softmax -> matmul). Expected
values come from the models' configs or constructor arguments; what cannot be read carries a reason."""
import dataclasses
import re

import pytest
import torch
import transformers as hf
from torch import nn

import routefx
from routefx.ir import recognize
from tests.zoo import ZOO, _gemma2, _llama, example_inputs


def _attention(ir):
    return [a for b in ir.blocks for a in b.attention]


def _eager_hf(cls, cfg):
    """An HF model with eager attention (some releases give Gemma-2 an SDPA path, which drops the soft-cap)."""
    cfg._attn_implementation = "eager"
    torch.manual_seed(0)
    return cls(cfg).eval()


def test_gemma2_alternating_sliding_window_and_softcap():
    model = _eager_hf(hf.Gemma2ForCausalLM, _gemma2())
    cfg = model.config
    got = _attention(routefx.inspect(model, *example_inputs(ZOO["gemma2"], left_pad=2)))
    assert len(got) == cfg.num_hidden_layers
    sliding = [t == "sliding_attention" for t in cfg.layer_types]
    assert any(sliding) and not all(sliding)                           # the config alternates
    for a, slide in zip(got, sliding):
        assert (a.op, a.causal, a.bias, a.reason) == ("eager", True, None, None)
        assert (a.pattern, a.window) == (("sliding", cfg.sliding_window) if slide else ("causal", None))
        assert a.softcap == pytest.approx(cfg.attn_logit_softcapping)


def test_bloom_alibi_slopes(zoo_capture):
    model, gm = zoo_capture("bloom")
    H = model.config.n_head                                            # a power of two here
    slopes = [2.0 ** (-8.0 * (h + 1) / H) for h in range(H)]           # ALiBi (Press et al.), by formula
    for a in _attention(recognize(gm)):
        assert (a.op, a.pattern, a.causal, a.window, a.softcap, a.bias) == ("eager", "causal", True, None, None,
                                                                            "alibi")
        assert list(a.slopes) == pytest.approx(slopes, rel=1e-6)


def test_llama_eager_attention_is_plain_causal():
    model = _eager_hf(hf.LlamaForCausalLM, _llama())
    args, kwargs = example_inputs(ZOO["llama"], left_pad=2)
    for a in _attention(routefx.inspect(model, args, kwargs)):
        assert (a.op, a.pattern, a.causal, a.window, a.bias, a.slopes, a.softcap, a.reason) == \
            ("eager", "causal", True, None, None, None, None, None)


# ---- a plain eager-attention LM whose attention is set by its constructor ----------------------------------------

@dataclasses.dataclass(frozen=True)
class Spec:
    mask: str = "causal"            # "causal" | "none" | "multiplicative"
    window: int | None = None
    slopes: tuple[float, ...] | None = None
    softcap: float | None = None
    bad_tanh: bool = False          # tanh(x)·c: not the c·tanh(x/c) form
    quadratic_bias: bool = False    # a bias -0.1·(j − i)²: not ALiBi
    row_bias: bool = False          # a bias 0.7·i, constant along each query row: the softmax never sees it
    learned_slopes: bool = False    # the slopes an nn.Parameter (a learned bias), not a buffer


class _EagerAttn(nn.Module):
    def __init__(self, d, h, spec: Spec):
        super().__init__()
        self.h, self.spec = h, spec
        self.a = nn.Linear(d, 3 * d, bias=False)
        self.b = nn.Linear(d, d, bias=False)
        if spec.slopes is not None and spec.learned_slopes:
            self.slopes = nn.Parameter(torch.tensor(spec.slopes))
        elif spec.slopes is not None:
            self.register_buffer("slopes", torch.tensor(spec.slopes))

    def forward(self, x):
        B, S, D = x.shape
        sp = self.spec
        q, k, v = self.a(x).view(B, S, 3, self.h, D // self.h).permute(2, 0, 3, 1, 4)   # [B, h, S, D/h] each
        s = q @ k.transpose(-1, -2) * (D // self.h) ** -0.5                              # [B, h, S, S]
        if sp.softcap:
            s = torch.tanh(s) * sp.softcap if sp.bad_tanh else torch.tanh(s / sp.softcap) * sp.softcap
        pos = torch.arange(S, device=x.device)
        rel = pos[None, :] - pos[:, None]                                                # [S, S]: j - i
        if sp.slopes is not None:
            s = s + self.slopes[:, None, None] * rel
        if sp.quadratic_bias:
            s = s - 0.1 * rel.float() ** 2
        if sp.row_bias:
            s = s + 0.7 * pos[:, None]
        if sp.mask == "multiplicative":
            s = s * (rel <= 0)
        elif sp.mask == "causal":
            allowed = rel <= 0
            if sp.window:
                allowed = allowed & (rel > -sp.window)
            s = s.masked_fill(~allowed, float("-inf"))
        o = torch.softmax(s, dim=-1) @ v
        return self.b(o.transpose(1, 2).reshape(B, S, D))


class _Block(nn.Module):
    def __init__(self, d, spec):
        super().__init__()
        self.n1, self.n2 = nn.LayerNorm(d), nn.LayerNorm(d)
        self.att = _EagerAttn(d, 4, spec)
        self.up, self.down = nn.Linear(d, 3 * d), nn.Linear(3 * d, d)

    def forward(self, x):
        x = x + self.att(self.n1(x))
        return x + self.down(torch.relu(self.up(self.n2(x))))


class _EagerLM(nn.Module):
    def __init__(self, spec: Spec, vocab=53, d=32, layers=2):
        super().__init__()
        torch.manual_seed(0)
        self.e = nn.Embedding(vocab, d)
        self.z = nn.ModuleList([_Block(d, spec) for _ in range(layers)])
        self.o = nn.Linear(d, vocab)

    def forward(self, input_ids):
        x = self.e(input_ids)
        for blk in self.z:
            x = blk(x)
        return self.o(x)


def _read(spec: Spec, device="cpu"):
    model = _EagerLM(spec).eval().to(device)
    ids = torch.randint(0, 53, (2, 9), generator=torch.Generator().manual_seed(0)).to(device)
    got = _attention(routefx.inspect(model, (ids,)))
    assert len(got) == 2 and all(a.op == "eager" for a in got)
    same = {"path": None, "reason": None}                              # node names differ between layers
    assert got[0].to_dict() | same == got[1].to_dict() | same
    return got[0]


@pytest.mark.parametrize("spec, want", [
    (Spec(), dict(pattern="causal", causal=True, window=None, bias=None, softcap=None)),
    (Spec(mask="none"), dict(pattern="bidirectional", causal=False, window=None, bias=None, softcap=None)),
    (Spec(window=5), dict(pattern="sliding", causal=True, window=5, bias=None, softcap=None)),
    (Spec(softcap=30.0), dict(pattern="causal", causal=True, window=None, bias=None, softcap=30.0)),
    (Spec(slopes=(0.5, 0.125, 0.03125, 0.0078125)),
     dict(pattern="causal", causal=True, window=None, bias="alibi", slopes=(0.5, 0.125, 0.03125, 0.0078125))),
    (Spec(window=3, slopes=(0.3,) * 4, softcap=20.0),
     dict(pattern="sliding", causal=True, window=3, bias="alibi", slopes=(0.3,), softcap=20.0)),
    (Spec(row_bias=True), dict(pattern="causal", causal=True, window=None, bias=None, slopes=None)),
    (Spec(slopes=(0.5, 0.25, 0.125, 0.0625), learned_slopes=True),
     dict(pattern="causal", causal=True, window=None, bias="alibi", slopes=(0.5, 0.25, 0.125, 0.0625))),
], ids=["causal", "bidirectional", "sliding5", "softcap", "alibi", "all", "row-constant", "alibi-parameter"])
def test_eager_attention_properties_match_the_module(spec, want):
    a = _read(spec)
    for field, value in want.items():
        got = getattr(a, field)
        assert got == (pytest.approx(value, rel=1e-6) if isinstance(value, (float, tuple)) else value), field
    assert a.reason is None


@pytest.mark.parametrize("spec, pattern, bias, reason", [
    (Spec(mask="multiplicative"), "custom", None, "multiplied by a tensor"),
    (Spec(softcap=5.0, bad_tanh=True), "custom", None, r"soft-cap form c·tanh\(x/c\)"),
    (Spec(quadratic_bias=True), "causal", "additive", "not linear in the query-key distance"),
], ids=["multiplicative-mask", "tanh-without-scale", "quadratic-bias"])
def test_what_cannot_be_read_says_why(spec, pattern, bias, reason):
    a = _read(spec)
    assert (a.pattern, a.bias, a.slopes) == (pattern, bias, None)
    assert a.reason is not None and re.search(reason, a.reason), a.reason
    if pattern == "custom":
        assert not a.causal and a.window is None                      # nothing guessed


def test_a_bias_read_from_a_meta_buffer_says_so():
    a = _read(Spec(slopes=(0.5, 0.25, 0.125, 0.0625)), device="meta")
    assert (a.pattern, a.bias) == ("custom", None)
    assert "meta" in a.reason and "slopes" in a.reason
    # without values to read, nothing else was needed: the same model without the buffer is read on meta
    assert _read(Spec(window=4, softcap=10.0), device="meta").window == 4
