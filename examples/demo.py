"""routefx demo: the main job, end to end, on a language model trained here.

1. Load the benchmark LM (`bench/quality_model.py`: a Llama trained on the Python standard library) from its
   cache; on a cold cache, train the quick stand-in instead (about a minute) and say so.
2. Compile it on the ONNX backend three ways: Dense (every FFN through routefx::routed_ffn), Duo at FFN budget 0.5
   with the local router (per token and layer: skip, small or big FFN branch), and static pruning (PruneLayers,
   keep 0.5).
3. Time them on held-out text (interleaved runs, median, one process): measured speedup over dense next to the
   FLOP-ideal one; then held-out perplexity of each against the uncompiled model.
4. Draw Duo's token x layer routing map on a held-out sequence.

    python examples/demo.py [--quick] [--out DIR]
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
    if busy_note():
        print(busy_note())

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
    print(f"\n(demo took {time.perf_counter() - t0:.0f} s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
