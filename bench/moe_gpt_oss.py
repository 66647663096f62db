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

import argparse
import json
import os
import sys

os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")

import torch  # noqa: E402
import transformers  # noqa: E402

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from moe_batched import measure  # noqa: E402

HERE = os.path.dirname(os.path.abspath(__file__))


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
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--hidden", type=int, default=768)
    ap.add_argument("--experts", type=int, default=32)
    ap.add_argument("--expert", type=int, default=768, help="expert width")
    ap.add_argument("--top-k", type=int, default=4)
    ap.add_argument("--vocab", type=int, default=32000)
    ap.add_argument("--tokens", type=int, default=256)
    ap.add_argument("--budget", type=float, default=0.5)
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--reps", type=int, default=7)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--smoke", action="store_true")
    ap.add_argument("--out", default=os.path.join(HERE, "results", "moe_gpt_oss.json"))
    a = ap.parse_args(argv)
    if a.smoke:
        a.layers, a.tokens, a.warmup, a.reps, a.vocab = 2, 64, 1, 2, 4096
    torch.set_num_threads(a.threads)
    model = build(a)
    x = torch.randint(0, a.vocab, (1, a.tokens), generator=torch.Generator().manual_seed(1))
    res = measure(model, x, a, {"family": "gpt_oss", "layers": a.layers, "hidden": a.hidden, "experts": a.experts,
                                "expert_width": a.expert, "top_k": a.top_k, "vocab": a.vocab, "tokens": a.tokens},
                  f"GPT-OSS {a.layers} layers d={a.hidden}, {a.experts} experts x {a.expert} top-{a.top_k}, "
                  f"{a.tokens} tokens", budgets=(a.budget,) if a.budget else ())
    if not a.smoke:
        with open(a.out, "w") as f:
            json.dump(res, f, indent=1)
        print("wrote", a.out)


if __name__ == "__main__":
    main()
