"""JetMoE-shaped MoE on CPU: Hugging Face eager (its experts run on the tokens sorted by expert and split by per-expert
counts, one product per expert piece) against the same model compiled by routefx (Dense: RaiseMoE reads the split
pieces as one expert FFN each and runs them as one routed_ffn per layer) on eager and onnx, and MoEBudget(0.5,
top_p) on onnx, in one process with interleaved, shuffled timing rounds (routefx.timing.median_seconds).

Model: JetMoeForCausalLM, 4 layers, hidden 1024, MoE in every layer: 8 experts of width 1408, top-2 (JetMoE-8B's
routing at the CPU MoE benchmark's width); its attention is a mixture of attention heads (8 key-value heads of 64,
top-2 of 8 query/output experts: left as captured); vocab 32000; random weights (seed 0; experts and router
re-drawn with std 0.02), fp32. Input: batch 1 x 256 random tokens. Threads: 2.

Reported per candidate: median latency, speedup over Hugging Face eager, FLOP-ideal speedup (FLOPs per token of
the captured model / the candidate's with its routes realised on the timed input), max |logits - HF| (not a bound
for MoEBudget, which drops experts on purpose).

    python bench/moe_jetmoe.py                  # -> bench/results/moe_jetmoe.json, a table on stdout
    python bench/moe_jetmoe.py --smoke          # 2 layers, 64 tokens, 1 + 2 rounds (checks the script)
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
    cfg = transformers.JetMoeConfig(
        vocab_size=a.vocab, hidden_size=a.hidden, intermediate_size=a.expert, num_hidden_layers=a.layers,
        num_key_value_heads=a.hidden // 128, kv_channels=64, num_local_experts=a.experts,
        num_experts_per_tok=a.top_k, max_position_embeddings=4096)
    cfg._attn_implementation = "sdpa"
    torch.manual_seed(0)
    model = transformers.JetMoeForCausalLM(cfg).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if ".mlp." in name and p.dim() > 1:
                p.normal_(0.0, 0.02)
    return model


def main(argv=None) -> None:
    run(argv, __doc__, build, dict(hidden=1024, experts=8, expert=1408, top_k=2), "moe_jetmoe.json",
        lambda a: f"JetMoE {a.layers} layers d={a.hidden}, {a.experts} experts x {a.expert} top-{a.top_k}, "
                  f"{a.tokens} tokens", budgets=True)


if __name__ == "__main__":
    main()
