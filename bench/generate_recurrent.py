"""Generation with recurrent state: tokens/s of routefx's cached decode (the layers' convolution and scan states as
explicit graph inputs and outputs, `routefx.generate.step`) against the uncached generation routefx ran such models
with before (each step the compiled model on the whole sequence so far) and Hugging Face eager `generate`, in one
process, interleaved rounds in a shuffled order, median wall time per candidate.

Models (random weights, fp32, built from configs):
  bamba    Bamba-shaped hybrid: 4 layers, hidden 512, FFN 1408, Mamba-2 mixers (16 heads x 64, state 64, chunk 64)
           in layers 0, 2, 3 and attention (8 / 4 heads) in layer 1
  mamba    Mamba-1: 4 layers, hidden 512, state 16 (its torch scan is a loop over positions: routefx captures the
           prefill per prompt length, and the old uncached path compiled a new graph at every step, so it is run
           with --uncached-mamba only)
Prompt 64 random tokens, greedy, no EOS; new tokens 64 (--new), batch 1 and 4 (--batches). Each candidate's
output is checked token-identical to Hugging Face `generate` (uncached: to routefx cached).

    .venv/bin/python bench/generate_recurrent.py            # both models, bench/results/generate_recurrent.json
    .venv/bin/python bench/generate_recurrent.py --quick    # 2 layers, 16 + 8 tokens: checks the script
"""
from __future__ import annotations

import argparse
import json
import os
import random
import statistics
import sys
import time
import warnings

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import routefx  # noqa: E402
from routefx.cli_bench import cpu_name  # noqa: E402
from routefx.generate.loop import _Uncached, generate_with_stats  # noqa: E402
from routefx.policies import Dense  # noqa: E402

VOCAB = 32000


def build(name: str, layers: int, quick: bool):
    ids = dict(vocab_size=VOCAB, pad_token_id=0, bos_token_id=1, eos_token_id=2, tie_word_embeddings=False)
    torch.manual_seed(0)
    if name == "bamba":
        from transformers import BambaConfig, BambaForCausalLM
        cfg = BambaConfig(hidden_size=512, intermediate_size=1408, num_hidden_layers=layers, num_attention_heads=8,
                          num_key_value_heads=4, attn_layer_indices=[1], mamba_n_heads=16, mamba_d_head=64,
                          mamba_n_groups=1, mamba_d_state=64, mamba_d_conv=4, mamba_expand=2,
                          mamba_chunk_size=64, **ids)
        return BambaForCausalLM(cfg).eval()
    from transformers import MambaConfig, MambaForCausalLM
    return MambaForCausalLM(MambaConfig(hidden_size=512, state_size=16, num_hidden_layers=layers, expand=2,
                                        conv_kernel=4, use_mambapy=False, **ids)).eval()


def _uncached(cm, ids, mask, n):
    step, seq = _Uncached(cm, mask.clone()), ids
    logits = step.prefill(ids)
    for i in range(n):
        nxt = logits.argmax(-1)
        seq = torch.cat([seq, nxt[:, None]], dim=1)
        if i + 1 < n:
            logits = step.decode(nxt[:, None])
    return seq


def run(name: str, args) -> dict:
    layers = 2 if args.quick else 4
    model = build(name, layers, args.quick)
    cm = routefx.compile(model, Dense(), backend="onnx")
    prompt, new = (16, 8) if args.quick else (64, args.new)
    rows = {}
    for B in args.batches:
        ids = torch.randint(3, VOCAB, (B, prompt), generator=torch.Generator().manual_seed(B))
        mask = torch.ones_like(ids)
        with torch.no_grad():
            ref = model.generate(ids, attention_mask=mask, max_new_tokens=new, do_sample=False, min_new_tokens=new)
        t0 = time.perf_counter()
        out, stats = generate_with_stats(cm, ids, mask, max_new_tokens=new, min_new_tokens=new)
        first = time.perf_counter() - t0
        assert stats.mode == "cached", stats.mode
        assert torch.equal(out, ref), "routefx cached differs from Hugging Face generate"
        cands = {
            "hf_eager": lambda: model.generate(ids, attention_mask=mask, max_new_tokens=new, do_sample=False,
                                               min_new_tokens=new),
            "routefx_onnx_cached": lambda: cm.generate(ids, mask, max_new_tokens=new, min_new_tokens=new),
        }
        if name != "mamba" or args.uncached_mamba:
            assert torch.equal(_uncached(cm, ids, mask, new), out), "uncached differs from cached"
            cands["routefx_onnx_uncached"] = lambda: _uncached(cm, ids, mask, new)
        times = {k: [] for k in cands}
        order = list(cands)
        for _ in range(args.rounds):
            random.shuffle(order)
            for k in order:
                t = time.perf_counter()
                with torch.no_grad():
                    cands[k]()
                times[k].append(time.perf_counter() - t)
        med = {k: statistics.median(v) for k, v in times.items()}
        row = {k: {"ms": round(1e3 * v, 1), "tok_s": round(B * new / v, 1),
                   "vs_hf": round(med["hf_eager"] / v, 2)} for k, v in med.items()}
        if "routefx_onnx_uncached" in med:
            row["cached_vs_uncached"] = round(med["routefx_onnx_uncached"] / med["routefx_onnx_cached"], 2)
        row["first_generate_s"] = round(first, 1)   # captures, lowering and the run
        rows[f"batch{B}"] = row
        print(name, f"batch {B}:", json.dumps(row), flush=True)
    return {"layers": layers, "prompt": prompt, "new": new, "rows": rows}


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true")
    p.add_argument("--models", nargs="+", default=["bamba", "mamba"])
    p.add_argument("--batches", nargs="+", type=int, default=[1, 4])
    p.add_argument("--new", type=int, default=64)
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--uncached-mamba", action="store_true")
    p.add_argument("--out", default=None)
    args = p.parse_args(argv)
    if args.quick:
        args.rounds, args.batches = 1, [1]
    if args.threads:
        torch.set_num_threads(args.threads)
    warnings.filterwarnings("ignore")
    result = {"cpu": cpu_name(), "cores": len(os.sched_getaffinity(0)), "torch_threads": torch.get_num_threads(),
              "versions": {"torch": torch.__version__, "transformers": __import__("transformers").__version__},
              "date": time.strftime("%Y-%m-%d"), "models": {}}
    print("CPU:", result["cpu"], f"({result['cores']} cores)", flush=True)
    for name in args.models:
        result["models"][name] = run(name, args)
    out = args.out or (None if args.quick else "bench/results/generate_recurrent.json")
    if out:
        with open(out, "w") as f:
            json.dump(result, f, indent=1)
        print("wrote", out)


if __name__ == "__main__":
    main()
