"""Small models for tests: Hugging Face families from configs (random weights, sizes unlike the library
defaults) and plain `nn.Module` transformers whose module names say nothing.

Each entry of `ZOO` builds a fresh model and knows what `inspect` must find in it (`Expect`), written out
here from the config by hand, so tests compare recognition against independent facts.
"""
from __future__ import annotations

import copy
import dataclasses
from typing import Callable

import torch
import transformers as hf
from torch import nn
import torch.nn.functional as F


@dataclasses.dataclass(frozen=True)
class Expect:
    blocks: int
    form: str
    kinds: tuple[str, ...]          # FFN kind per block
    activation: str
    hidden: int
    inter: tuple[int, ...]          # FFN width per block (per expert for MoE)
    has_bias: bool
    decoder: bool = True            # causal LM taking input_ids
    num_experts: int | None = None
    top_k: int | None = None
    shared_expert: int | None = None  # shared expert width for MoE blocks
    patterns: tuple[str, ...] | None = None  # attention pattern per block, where the test checks it


@dataclasses.dataclass(frozen=True)
class Entry:
    name: str
    build: Callable[[], nn.Module]
    expect: Expect
    vocab: int
    core: bool = True               # False: a family only the recognition/compile family tests run (suite time)


def redraw_(model: nn.Module, pick: Callable[[str, torch.Tensor], bool], scale: float, seed: int = 1) -> nn.Module:
    """Parameters for which `pick(name, p)` holds re-drawn from N(0, scale²) (in place, seeded): MoE experts and
    routers away from Hugging Face's small or constant init, so that routes differ and clamps engage."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if pick(name, p):
                p.copy_(torch.randn(p.shape, generator=g) * scale)
    return model


def _hf(cls, cfg):
    def build():  # each model on its own copy of the config: what a test sets on one model stays there
        torch.manual_seed(0)
        own = copy.deepcopy(cfg)
        own._attn_implementation = "sdpa"
        try:
            return cls(own).eval()
        except ValueError:  # families without an SDPA path in this transformers release (BLOOM's ALiBi, ...)
            own._attn_implementation = "eager"
            return cls(own).eval()
    return build


def hf_model(cls, cfg):
    """`cls(cfg)` built as the zoo builds its models: SDPA attention where the family has it, seed 0, eval mode."""
    return _hf(cls, cfg)()


_COMMON = dict(vocab_size=101, num_hidden_layers=3, num_attention_heads=4, max_position_embeddings=256,
               bos_token_id=1, eos_token_id=2)


def _llama():
    return hf.LlamaConfig(hidden_size=48, intermediate_size=104, num_key_value_heads=2, **_COMMON)


def _qwen2():
    return hf.Qwen2Config(hidden_size=40, intermediate_size=88, num_key_value_heads=2, **_COMMON)


def _mistral():
    return hf.MistralConfig(hidden_size=56, intermediate_size=120, num_key_value_heads=2, sliding_window=None,
                            **_COMMON)


def _gemma():
    return hf.GemmaConfig(hidden_size=48, intermediate_size=96, num_key_value_heads=1, head_dim=16, **_COMMON)


def _phi3():
    return hf.Phi3Config(hidden_size=48, intermediate_size=80, num_key_value_heads=4, pad_token_id=0, **_COMMON)


def _gpt2():
    return hf.GPT2Config(vocab_size=101, n_positions=256, n_embd=40, n_layer=3, n_head=4, n_inner=136,
                          bos_token_id=1, eos_token_id=2)


def _bert():
    return hf.BertConfig(vocab_size=101, hidden_size=40, num_hidden_layers=3, num_attention_heads=4,
                         intermediate_size=72, max_position_embeddings=256)


def _mixtral():
    return hf.MixtralConfig(hidden_size=32, intermediate_size=56, num_key_value_heads=2, num_local_experts=5,
                            num_experts_per_tok=2, sliding_window=None, **_COMMON)


def _qwen2moe():
    return hf.Qwen2MoeConfig(hidden_size=32, intermediate_size=72, moe_intermediate_size=24,
                             shared_expert_intermediate_size=40, num_experts=6, num_experts_per_tok=2,
                             num_key_value_heads=2, mlp_only_layers=[1], decoder_sparse_step=1, **_COMMON)


# ---- families outside the core zoo: other norms, ALiBi, soft-capping, parallel branches, other MoE routers ----

def _gemma2():   # sandwich norms, soft-capping, alternating sliding window; eager attention only
    return hf.Gemma2Config(hidden_size=48, intermediate_size=96, num_key_value_heads=2, head_dim=12,
                           sliding_window=4, query_pre_attn_scalar=12, **_COMMON)


def _bloom():    # ALiBi (a [B, H, S, S] bias added to the scores), eager attention only
    return hf.BloomConfig(vocab_size=101, hidden_size=40, n_layer=3, n_head=4, bos_token_id=1, eos_token_id=2)


def _opt():      # ReLU MLP, learned positions, the stream reshaped to [B*S, d] around the FFN
    return hf.OPTConfig(vocab_size=101, hidden_size=40, num_hidden_layers=3, ffn_dim=72, num_attention_heads=4,
                        max_position_embeddings=256, word_embed_proj_dim=40, bos_token_id=1, eos_token_id=2,
                        pad_token_id=0)


def _falcon():   # parallel attention and MLP under one shared LayerNorm (Falcon-7B layout)
    return hf.FalconConfig(vocab_size=101, hidden_size=48, num_hidden_layers=3, num_attention_heads=4,
                           parallel_attn=True, new_decoder_architecture=False, multi_query=True, bias=False,
                           alibi=False, bos_token_id=1, eos_token_id=2)


def _phimoe():   # sparsemixer router: successive arg-maxes, no top-k op
    return hf.PhimoeConfig(hidden_size=32, intermediate_size=56, num_key_value_heads=2, num_local_experts=4,
                           num_experts_per_tok=2, sliding_window=None, **_COMMON)


def _granitemoe():  # forward takes use_cache only through **kwargs
    return hf.GraniteMoeConfig(hidden_size=32, intermediate_size=40, num_key_value_heads=2, num_local_experts=4,
                               num_experts_per_tok=2, **_COMMON)


def _deepseekv3():  # first layer dense, shared expert, sigmoid group-limited routing, MLA attention
    return hf.DeepseekV3Config(hidden_size=32, intermediate_size=64, moe_intermediate_size=24,
                               num_key_value_heads=4, n_routed_experts=8, n_shared_experts=1, num_experts_per_tok=2,
                               n_group=2, topk_group=1, first_k_dense_replace=1, q_lora_rank=16, kv_lora_rank=16,
                               qk_rope_head_dim=8, qk_nope_head_dim=8, v_head_dim=8, **_COMMON)


def _cohere():   # parallel attention and FFN
    return hf.CohereConfig(hidden_size=48, intermediate_size=88, num_key_value_heads=2, pad_token_id=0, **_COMMON)


def _gemma3():
    return hf.Gemma3TextConfig(hidden_size=48, intermediate_size=96, num_key_value_heads=2, head_dim=12,
                               sliding_window=4, query_pre_attn_scalar=12,
                               layer_types=["sliding_attention", "sliding_attention", "full_attention"], **_COMMON)


def _gptj():     # parallel attention and MLP, partial rotary
    return hf.GPTJConfig(vocab_size=101, n_positions=256, n_embd=40, n_layer=3, n_head=4, rotary_dim=4, n_inner=72,
                         bos_token_id=1, eos_token_id=2)


def _exaone4():  # norms on the branch outputs only
    return hf.Exaone4Config(hidden_size=48, intermediate_size=88, num_key_value_heads=2, sliding_window=4,
                            layer_types=["sliding_attention", "sliding_attention", "full_attention"], **_COMMON)


def _olmoe():
    return hf.OlmoeConfig(hidden_size=32, intermediate_size=40, num_key_value_heads=2, num_experts=6,
                          num_experts_per_tok=2, **_COMMON)


def _qwen3moe():  # renormalised top-k, no shared expert, q/k norms
    return hf.Qwen3MoeConfig(hidden_size=32, intermediate_size=64, moe_intermediate_size=20, num_experts=7,
                             num_experts_per_tok=3, norm_topk_prob=True, num_key_value_heads=2, head_dim=8,
                             **_COMMON)


# ---- plain nn.Module transformers; names say nothing -------------------------------------------------------

class _RMS(nn.Module):
    def __init__(self, d):
        super().__init__()
        self.w = nn.Parameter(torch.ones(d) + 0.1 * torch.randn(d))

    def forward(self, x):
        return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + 1e-6) * self.w


class _Attn(nn.Module):
    def __init__(self, d, h):
        super().__init__()
        self.h = h
        self.a = nn.Linear(d, 3 * d, bias=False)
        self.b = nn.Linear(d, d, bias=False)

    def forward(self, x):
        B, S, D = x.shape
        q, k, v = self.a(x).view(B, S, 3, self.h, D // self.h).permute(2, 0, 3, 1, 4)
        o = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        return self.b(o.transpose(1, 2).reshape(B, S, D))


class _Gated(nn.Module):
    def __init__(self, d, f):
        super().__init__()
        self.a = nn.Linear(d, 2 * f, bias=False)   # fused gate-up
        self.b = nn.Linear(f, d, bias=False)

    def forward(self, x):
        g, u = self.a(x).chunk(2, dim=-1)
        return self.b(F.silu(g) * u)


class _Mlp(nn.Module):
    def __init__(self, d, f):
        super().__init__()
        self.a = nn.Linear(d, f)
        self.b = nn.Linear(f, d)

    def forward(self, x):
        return self.b(torch.relu(self.a(x)))


class _Block(nn.Module):
    """form: 'pre_norm' | 'parallel' | 'sandwich'."""

    def __init__(self, d, f, h, form, ffn):
        super().__init__()
        self.form = form
        self.n1, self.n2 = _RMS(d), _RMS(d)
        self.a, self.b = _Attn(d, h), ffn(d, f)
        if form == "sandwich":
            self.n3, self.n4 = _RMS(d), _RMS(d)

    def forward(self, x):
        if self.form == "parallel":
            y = self.n1(x)
            return x + self.a(y) + self.b(y)
        if self.form == "sandwich":
            x = x + self.n3(self.a(self.n1(x)))
            return x + self.n4(self.b(self.n2(x)))
        x = x + self.a(self.n1(x))
        return x + self.b(self.n2(x))


class PlainLM(nn.Module):
    def __init__(self, vocab=89, d=36, widths=(76, 76, 76), h=3, form="pre_norm", ffn=_Gated):
        super().__init__()
        self.e = nn.Embedding(vocab, d)
        self.z = nn.ModuleList([_Block(d, f, h, form, ffn) for f in widths])
        self.n = _RMS(d)
        self.o = nn.Linear(d, vocab, bias=False)

    def forward(self, input_ids):
        x = self.e(input_ids)
        for blk in self.z:
            x = blk(x)
        return self.o(self.n(x))


def _plain(**kw):
    def build():
        torch.manual_seed(0)
        return PlainLM(**kw).eval()
    return build


def _gated(n, d, f, act="silu", bias=False, form="pre_norm", patterns=None):
    return Expect(n, form, ("gated",) * n, act, d, (f,) * n, bias, patterns=patterns)


def _mlp(n, d, f, act, bias=True, form="pre_norm", decoder=True, patterns=None):
    return Expect(n, form, ("mlp",) * n, act, d, (f,) * n, bias, decoder, patterns=patterns)


ZOO: dict[str, Entry] = {e.name: e for e in [
    Entry("llama", _hf(hf.LlamaForCausalLM, _llama()), _gated(3, 48, 104), 101),
    Entry("qwen2", _hf(hf.Qwen2ForCausalLM, _qwen2()), _gated(3, 40, 88), 101),
    Entry("mistral", _hf(hf.MistralForCausalLM, _mistral()), _gated(3, 56, 120), 101),
    Entry("gemma", _hf(hf.GemmaForCausalLM, _gemma()), _gated(3, 48, 96, act="gelu_tanh"), 101),
    Entry("phi3", _hf(hf.Phi3ForCausalLM, _phi3()), _gated(3, 48, 80), 101),
    Entry("gpt2", _hf(hf.GPT2LMHeadModel, _gpt2()), _mlp(3, 40, 136, "gelu_tanh"), 101),
    Entry("bert", _hf(hf.BertModel, _bert()), _mlp(3, 40, 72, "gelu", form="post_norm", decoder=False), 101),
    Entry("mixtral", _hf(hf.MixtralForCausalLM, _mixtral()),
          Expect(3, "pre_norm", ("moe",) * 3, "silu", 32, (56,) * 3, False, num_experts=5, top_k=2), 101),
    Entry("qwen2moe", _hf(hf.Qwen2MoeForCausalLM, _qwen2moe()),
          Expect(3, "pre_norm", ("moe", "gated", "moe"), "silu", 32, (24, 72, 24), False, num_experts=6,
                 top_k=2, shared_expert=40), 101),
    Entry("plain", _plain(), _gated(3, 36, 76), 89),
    Entry("gemma2", _hf(hf.Gemma2ForCausalLM, _gemma2()), _gated(3, 48, 96, act="gelu_tanh", form="sandwich"), 101,
          core=False),
    Entry("bloom", _hf(hf.BloomForCausalLM, _bloom()), _mlp(3, 40, 160, "gelu_tanh"), 101, core=False),
    Entry("opt", _hf(hf.OPTForCausalLM, _opt()), _mlp(3, 40, 72, "relu", patterns=("causal",) * 3), 101,
          core=False),
    Entry("falcon", _hf(hf.FalconForCausalLM, _falcon()),
          _mlp(3, 48, 192, "gelu", bias=False, form="parallel", patterns=("causal",) * 3), 101, core=False),
    Entry("phimoe", _hf(hf.PhimoeForCausalLM, _phimoe()),
          Expect(3, "pre_norm", ("moe",) * 3, "silu", 32, (56,) * 3, False, num_experts=4, top_k=2), 101,
          core=False),
    Entry("granitemoe", _hf(hf.GraniteMoeForCausalLM, _granitemoe()),
          Expect(3, "pre_norm", ("moe",) * 3, "silu", 32, (40,) * 3, False, num_experts=4, top_k=2), 101,
          core=False),
    Entry("deepseekv3", _hf(hf.DeepseekV3ForCausalLM, _deepseekv3()),
          Expect(3, "pre_norm", ("gated", "moe", "moe"), "silu", 32, (64, 24, 24), False, num_experts=8, top_k=2,
                 shared_expert=24), 101, core=False),
    Entry("cohere", _hf(hf.CohereForCausalLM, _cohere()), _gated(3, 48, 88, form="parallel"), 101, core=False),
    Entry("gemma3", _hf(hf.Gemma3ForCausalLM, _gemma3()),
          _gated(3, 48, 96, act="gelu_tanh", form="sandwich", patterns=("sliding", "sliding", "causal")), 101,
          core=False),
    Entry("gptj", _hf(hf.GPTJForCausalLM, _gptj()), _mlp(3, 40, 72, "gelu_tanh", form="parallel"), 101,
          core=False),
    Entry("exaone4", _hf(hf.Exaone4ForCausalLM, _exaone4()),
          _gated(3, 48, 88, form="branch_output_norm", patterns=("sliding", "sliding", "causal")), 101, core=False),
    Entry("olmoe", _hf(hf.OlmoeForCausalLM, _olmoe()),
          Expect(3, "pre_norm", ("moe",) * 3, "silu", 32, (40,) * 3, False, num_experts=6, top_k=2), 101,
          core=False),
    Entry("qwen3moe", _hf(hf.Qwen3MoeForCausalLM, _qwen3moe()),
          Expect(3, "pre_norm", ("moe",) * 3, "silu", 32, (20,) * 3, False, num_experts=7, top_k=3), 101,
          core=False),
    Entry("plain_parallel", _plain(form="parallel"), _gated(3, 36, 76, form="parallel"), 89),
    Entry("plain_sandwich", _plain(form="sandwich", ffn=_Mlp), _mlp(3, 36, 76, "relu", form="sandwich"), 89),
    Entry("plain_resized", _plain(widths=(76, 52, 76, 76)),
          Expect(4, "pre_norm", ("gated",) * 4, "silu", 36, (76, 52, 76, 76), False), 89),
]}

DENSE = [n for n, e in ZOO.items() if e.core and "moe" not in e.expect.kinds]
DECODERS = [n for n, e in ZOO.items() if e.core and e.expect.decoder]
FAMILIES = [n for n, e in ZOO.items() if not e.core]           # tested by tests/compiler/test_families.py
FAMILIES_DENSE = [n for n in FAMILIES if "moe" not in ZOO[n].expect.kinds]


def example_inputs(entry: Entry, batch=2, seq=7, left_pad=0, seed=1):
    """(args, kwargs) for `entry`'s model; `left_pad` masks the first positions of row 0."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(1, entry.vocab, (batch, seq), generator=g)
    if entry.name.startswith("plain"):
        return (ids,), {}
    mask = torch.ones(batch, seq, dtype=torch.long)
    mask[0, :left_pad] = 0
    return (ids,), {"attention_mask": mask}
