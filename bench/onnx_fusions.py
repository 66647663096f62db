"""A/B of the ONNX backend's fusions (routefx.backends.onnx_fusions) on the dense bench model, in one process.

One capture of the model (bench/cpu.py's Llama shapes), then one ONNX Runtime session per fusion variant (each
exported from the same graph), run in interleaved rounds (order shuffled per round) with ONNX Runtime's profiler on.
Reported per variant: the median process CPU seconds per run (one intra-op thread by default, so that CPU time is
kernel work and not the thread pool's spinning) and ORT's per-kernel times summed by op type, against the variant
without fusions. Kernel and CPU times are what a shared machine disturbs least; wall time is printed for reference.

    .venv/bin/python bench/onnx_fusions.py --shape A --layers 4 --rounds 7      # each fusion (~1 min quiet, 3 GiB)
    .venv/bin/python bench/onnx_fusions.py --shape A --variants none,all --rounds 9   # 8 layers (~2 min, 2.5 GiB)
    .venv/bin/python bench/onnx_fusions.py --shape A --layers 2 --rounds 3      # smoke (~1 min)

Every session holds its own pre-packed weights (about 0.8 GiB per variant at 8 layers of shape A).
"""
from __future__ import annotations

import argparse
import collections
import dataclasses
import json
import os
import random
import statistics
import sys
import time
import warnings

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from cpu import SHAPES, SMOKE, batch, build_model  # noqa: E402

import routefx  # noqa: E402
from routefx.backends import onnx as onnx_backend  # noqa: E402
from routefx.backends.onnx_fusions import FUSIONS  # noqa: E402

VARIANTS = {"none": (), "shared_kv_heads": ("shared_kv_heads",), "rotary": ("rotary",), "rms_norm": ("rms_norm",),
            "rms_norm+skip": ("rms_norm", "skip_rms_norm"), "causal_gqa": ("causal_gqa",),
            "all_but_causal_gqa": tuple(f for f in FUSIONS if f != "causal_gqa"), "all": FUSIONS}


def kernel_ms_by_op(path: str, skip_runs: int) -> tuple[dict, int]:
    """{op type: kernel ms per run} from an ORT profile, excluding the first `skip_runs` runs."""
    with open(path) as f:
        events = json.load(f)
    ends = sorted(e["ts"] + e["dur"] for e in events if e.get("cat") == "Session" and e.get("name") == "model_run")
    start = ends[skip_runs - 1] if skip_runs and len(ends) > skip_runs else 0
    runs = len([t for t in ends if t > start])
    by_op = collections.Counter()
    for e in events:
        if (e.get("cat") == "Node" and e.get("name", "").endswith("_kernel_time") and e["ts"] >= start
                and e.get("args", {}).get("op_name") not in ("If", "Loop", "Scan")):  # their branches' nodes
                                                                                        # are listed too
            by_op[e.get("args", {}).get("op_name", "?")] += e["dur"] / 1e3
    return {k: v / max(runs, 1) for k, v in by_op.items()}, runs


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--shape", default="A", help="A, B (bench/cpu.py) or smoke")
    p.add_argument("--layers", type=int, default=None, help="override the shape's layer count")
    p.add_argument("--variants", default="none,shared_kv_heads,rotary,rms_norm+skip,all",
                   help=f"comma-separated, from {', '.join(VARIANTS)}")
    p.add_argument("--rounds", type=int, default=7)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--json", default="/tmp/routefx_bench_onnx_fusions.json")
    a = p.parse_args(argv)
    warnings.filterwarnings("ignore")
    torch.set_num_threads(a.threads)
    m = SMOKE if a.shape == "smoke" else SHAPES[a.shape]
    if a.layers:
        m = dataclasses.replace(m, layers=a.layers)
    names = a.variants.split(",")
    model = build_model(m)
    x = batch(torch.Generator().manual_seed(0), m.batch, m.seq, m.vocab)
    cm = routefx.compile(model, routefx.policies.Dense(), example_inputs=(), example_kwargs={**x, "use_cache": False},
                         backend="eager")
    gm, kwargs = cm.graph_module, {**x, "use_cache": False}
    with torch.no_grad():
        ref = model(**kwargs).logits
    runners = {}
    for n in names:
        r = onnx_backend.prepare(gm, kwargs, profile=True, fusions=VARIANTS[n])
        err = (r(**x).logits - ref).abs().max().item()
        print(f"{n}: fusions {r.fusions}, max |logits - eager| {err:.2e}, prepare CPU s {r.cpu_timings}", flush=True)
        runners[n] = r
    cpu = {n: [] for n in names}
    wall = {n: [] for n in names}
    rng = random.Random(0)
    for i in range(a.warmup + a.rounds):
        order = names[:]
        rng.shuffle(order)
        for n in order:
            c, t = time.process_time(), time.perf_counter()
            runners[n](**x)
            if i >= a.warmup:
                cpu[n].append(time.process_time() - c)
                wall[n].append(time.perf_counter() - t)
    res = {"shape": dataclasses.asdict(m), "threads": a.threads, "rounds": a.rounds, "variants": {}}
    base = None
    for n in names:
        by_op, runs = kernel_ms_by_op(runners[n].end_profiling(), a.warmup + 1)  # + the correctness run
        rec = {"fusions": runners[n].fusions, "cpu_s_median": statistics.median(cpu[n]),
               "wall_s_median": statistics.median(wall[n]), "kernel_ms": sum(by_op.values()),
               "by_op_ms": dict(sorted(by_op.items(), key=lambda kv: -kv[1])), "profiled_runs": runs}
        res["variants"][n] = rec
        base = base or rec
        print(f"\n{n}: CPU {rec['cpu_s_median'] * 1e3:.1f} ms/run ({rec['cpu_s_median'] / base['cpu_s_median']:.3f}x "
              f"of {names[0]}), kernels {rec['kernel_ms']:.1f} ms ({rec['kernel_ms'] / base['kernel_ms']:.3f}x), "
              f"wall {rec['wall_s_median'] * 1e3:.1f} ms")
        print("   " + ", ".join(f"{k} {v:.2f}" for k, v in list(rec["by_op_ms"].items())[:12]))
    with open(a.json, "w") as f:
        json.dump(res, f, indent=1)
    print(f"\nwrote {a.json}")


if __name__ == "__main__":
    main()
