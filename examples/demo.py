"""routefx demo: the main job, end to end, on a language model trained here.

1. Load the benchmark LM (`bench/quality_model.py`: a Llama trained on the Python standard library) from its
   cache; on a cold cache, train the quick stand-in instead (about a minute) and say so.
2. Compile it on the ONNX backend three ways: Dense (every FFN through routefx::routed_ffn), Duo at FFN budget 0.5
   with the local router (per token and layer: skip, small or big FFN branch), and static pruning (PruneLayers,
   keep 0.5).
3. Time them on held-out text (interleaved runs, median, one process): measured speedup over dense next to the
   FLOP-ideal one; then held-out perplexity of each against the uncompiled model.
4. Draw Duo's token x layer routing map on a held-out sequence.
5. Speed at a realistic width: the same three compilations of a Llama-shaped model of the CPU benchmark's width
   (hidden 1024, FFN 2816, random weights, batch 1 x 512), timed against the uncompiled Hugging Face model. The
   trained LM above is tiny (its GEMMs take microseconds, so per-call overhead decides its latencies); at this
   width the FFN GEMMs dominate and routing saves what its FLOPs say. Random weights say nothing about quality
   (step 3 does that); they make the speed figures reproducible without a download.

    python examples/demo.py [--quick] [--no-wide] [--out DIR]
"""
from __future__ import annotations

import argparse
import os
import sys
import time

os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)                         # bench/ (the benchmark LM) lives beside the package

import torch  # noqa: E402

import routefx  # noqa: E402
from bench.quality_model import (calibration_batches, heldout_batches, load_quality_model,  # noqa: E402
                                 perplexity)
from routefx.cli_bench import (bench_compiled, busy_note, compile_policies, cpu_name, format_bench,  # noqa: E402
                               plot_routes, route_map)
from routefx.errors import ArtifactError  # noqa: E402


def load(quick: bool):
    if not quick:
        try:
            return load_quality_model(train_if_missing=False)
        except ArtifactError as e:
            print(f"(no trained benchmark LM in the cache: {e})")
            print("(using the QUICK STAND-IN instead; `python bench/quality_model.py` trains the benchmark LM, "
                  "about 20 minutes on 2 cores, and later demos use it)")
    return load_quality_model(train_if_missing=True, quick=True)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true", help="use the quick stand-in even when the benchmark LM exists")
    p.add_argument("--no-wide", action="store_true", help="skip step 5 (about a minute)")
    p.add_argument("--out", default=os.path.join(ROOT, "demo_out"), help="where the routing plot goes")
    args = p.parse_args(argv)
    t0 = time.perf_counter()

    model, tok, info = load(args.quick)
    s = info["settings"]
    seq = s["seq_len"]
    print(f"== model: {info['label']}\n   cache {info['path']} "
          f"({'trained now' if info['trained_now'] else 'verified by sha256 and reused'})")

    calibration = calibration_batches(tok, n=4, seq_len=seq, batch=4)        # train split
    heldout = heldout_batches(tok, n=4, seq_len=seq, batch=8)                # held-out files
    x = heldout[0]                                                           # [8, seq] timing input
    policies = {"duo:0.5": routefx.policies.Duo(budget=0.5, router="local"),
                "prune:0.5": routefx.policies.PruneLayers(keep=0.5)}
    print(f"\n== compiling on the ONNX backend: dense, {', '.join(f'{k} = {v!r}' for k, v in policies.items())}")
    compiled = compile_policies(model, policies, calibration, x, backend="onnx")
    print(compiled["duo:0.5"].report)

    print(f"\n== latency on {cpu_name()}, {torch.get_num_threads()} threads, batch {x['input_ids'].shape[0]} x {seq} "
          "held-out tokens (median of 9 interleaved runs, one process)")
    rows = bench_compiled(compiled, x, reps=9)
    print(format_bench(rows))
    note = busy_note(rows)
    if note:
        print(note)

    print(f"\n== held-out perplexity ({sum(b['input_ids'].numel() for b in heldout):,} tokens of files never "
          "trained on)")
    ref = perplexity(lambda **b: model(**b, use_cache=False), heldout)
    print(f"  {'uncompiled model (HF eager)':<30}{ref:9.3f}")
    for label, cm in compiled.items():
        ppl = perplexity(cm, heldout)
        print(f"  {label + ' (ONNX)':<30}{ppl:9.3f}   {100 * (ppl / ref - 1):+7.2f}% vs uncompiled")

    print("\n== Duo's routing on a held-out sequence")
    duo = compiled["duo:0.5"]
    print(duo.route_stats(heldout))
    sample = {k: v[:1, :96] for k, v in heldout[1].items()}
    tokens = [tok.decode([i]) for i in sample["input_ids"][0].tolist()]
    rmap = route_map(duo, sample, tokens, name="Duo budget 0.5, local router")
    try:
        path = plot_routes([rmap], os.path.join(args.out, "routing_map.png"),
                           title=f"routefx demo: {info['label']}")
        print(f"  routing map written to {path}")
    except routefx.RoutefxError as e:                                       # matplotlib not installed
        print(f"  no routing map: {e}")
    if not args.no_wide:
        wide_speed(policies)
    print(f"\n(demo took {time.perf_counter() - t0:.0f} s)")
    return 0


WIDE = dict(vocab_size=32000, hidden_size=1024, intermediate_size=2816, num_hidden_layers=6, num_attention_heads=16,
            num_key_value_heads=4)
WIDE_BATCH, WIDE_SEQ = 1, 512


def wide_speed(policies: dict) -> None:
    """Step 5 (module docstring): the policies on a Llama-shaped model of the CPU benchmark's width."""
    import transformers
    torch.manual_seed(0)
    model = transformers.LlamaForCausalLM(transformers.LlamaConfig(**WIDE, max_position_embeddings=2048)).eval()
    gen = torch.Generator().manual_seed(0)

    def tokens(b, s):
        return {"input_ids": torch.randint(3, WIDE["vocab_size"], (b, s), generator=gen),
                "attention_mask": torch.ones(b, s, dtype=torch.long)}
    x = tokens(WIDE_BATCH, WIDE_SEQ)
    calibration = [tokens(2, 256) for _ in range(2)]
    print(f"\n== speed at a realistic width: Llama-shaped, {WIDE['num_hidden_layers']} layers, hidden "
          f"{WIDE['hidden_size']}, FFN {WIDE['intermediate_size']}, {WIDE['num_attention_heads']}/"
          f"{WIDE['num_key_value_heads']} heads, vocab {WIDE['vocab_size']}, random weights, fp32, batch "
          f"{WIDE_BATCH} x {WIDE_SEQ}; {cpu_name()}, {torch.get_num_threads()} threads")
    compiled = compile_policies(model, policies, calibration, x, backend="onnx")

    def hf():
        with torch.inference_mode():
            return model(**x, use_cache=False)
    rows = bench_compiled(compiled, x, reps=7, baselines={"HF eager": hf})
    print(format_bench(rows))
    by = {r["label"]: r for r in rows}
    hf_ms = by["HF eager"]["ms"]
    print("  vs the uncompiled model (HF eager, torch): " + ", ".join(
        f"{k} {hf_ms / r['ms']:.2f}x" for k, r in by.items() if k != "HF eager"))
    note = busy_note(rows)
    if note:
        print(note)


if __name__ == "__main__":
    sys.exit(main())
