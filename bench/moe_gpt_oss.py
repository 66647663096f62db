"""GPT-OSS-shaped MoE on CPU: Hugging Face eager (its experts through transformers' grouped-GEMM implementation)
against the same model compiled by routefx (Dense: RaiseMoE reads the experts' interleaved gate/up columns, their
per-expert biases and the clamped unit onto one routed_ffn per layer) on eager and onnx, and MoEBudget(0.5, top_p)
on onnx, in one process with interleaved, shuffled timing rounds (routefx.timing.median_seconds).

Model: GptOssForCausalLM, 4 layers, hidden 768, 32 experts of width 768, top-4 (gpt-oss-20b's routing), swiglu
limit 7, 12 query / 4 key-value heads of 64, sliding window 128 on alternate layers, vocab 32000, random weights
(seed 0; experts and router drawn with std 0.02, biases 0.01), fp32, eager attention (GPT-OSS's attention sinks
have no SDPA path in transformers). Input: batch 1 x 256 random tokens. Threads: 2.

Reported per candidate: median latency, speedup over Hugging Face eager, FLOP-ideal speedup (FLOPs per token of
the captured model / the candidate's with its routes realised on the timed input), max |logits - HF| (not a bound
for MoEBudget, which drops experts on purpose).

    python bench/moe_gpt_oss.py                 # -> bench/results/moe_gpt_oss.json, a table on stdout
    python bench/moe_gpt_oss.py --smoke         # 2 layers, 64 tokens, 1 + 2 rounds (checks the script)
"""
from __future__ import annotations

import os
import sys

os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")

import torch  # noqa: E402
import transformers  # noqa: E402

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from moe_batched import run  # noqa: E402



def build(a) -> torch.nn.Module:
    cfg = transformers.GptOssConfig(
        vocab_size=a.vocab, hidden_size=a.hidden, intermediate_size=a.expert, num_hidden_layers=a.layers,
        num_attention_heads=a.hidden // 64, num_key_value_heads=a.hidden // 192, head_dim=64,
        num_local_experts=a.experts, num_experts_per_tok=a.top_k, sliding_window=128,
        layer_types=["sliding_attention", "full_attention"] * (a.layers // 2) + ["full_attention"] * (a.layers % 2),
        max_position_embeddings=4096, rope_parameters={"rope_type": "default", "rope_theta": 150000.0})
    cfg._attn_implementation = "eager"
    torch.manual_seed(0)
    model = transformers.GptOssForCausalLM(cfg).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if ".mlp." in name:
                p.normal_(0.0, 0.02 if p.dim() > 1 else 0.01)
    return model


def main(argv=None) -> None:
    run(argv, __doc__, build, dict(hidden=768, experts=32, expert=768, top_k=4), "moe_gpt_oss.json",
        lambda a: f"GPT-OSS {a.layers} layers d={a.hidden}, {a.experts} experts x {a.expert} top-{a.top_k}, "
                  f"{a.tokens} tokens", budgets=True)

if __name__ == "__main__":
    main()
