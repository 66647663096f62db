"""GPU generation benchmark (issue 17): tokens/s of routefx backend "triton" with CUDA-graph decode steps against
Hugging Face `generate`, in one process on one GPU.

Model: bench/gpu.py's Llama (8 layers, d=2048, F=5632, 16/4 heads, vocab 32000, bf16, random weights). Prompt
128 tokens (batch 1 and 8), `--new` new tokens (default 64), greedy, EOS off (random weights), so every candidate
generates the same number of tokens. Candidates:
    hf_generate        model.generate (transformers' dynamic cache, eager)
    dense_graphs       routefx Dense, backend triton: static window + one CUDA graph per decode step (the default)
    dense_no_graphs    the same compiled model with static_cache=False (growing cache, no CUDA graphs)
    duo_0.5_graphs     routefx Duo(0.5) with CUDA-graph decode steps
Each is warmed up once (compiles, autotunes, captures), then timed `--reps` times (median); tokens/s = batch x new
tokens / wall seconds of the whole generate call (prefill included), and decode tokens/s from routefx's
GenerationStats. Greedy tokens of dense_graphs are compared with hf_generate's (bf16: the same up to the first
near-tie; the identical prefix length per row is recorded). Not here yet: Duo's bytes-ideal speedup (see
bench/generate.py for the CPU one).

    python bench/gpu_generate.py --out DIR [--new 64] [--batches 1 8]
    python bench/gpu_generate.py --smoke-cpu      # tiny fp32 model on CPU, TRITON_INTERPRET=1, no graphs
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
import traceback

if "--smoke-cpu" in sys.argv:
    os.environ.setdefault("TRITON_INTERPRET", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import torch  # noqa: E402

import routefx  # noqa: E402
from routefx.generate import generate_with_stats  # noqa: E402
from gpu import FULL, SMOKE, build_model, json_saver, machine  # noqa: E402


def _sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _time(fn, device, reps):
    out, secs = None, []
    for _ in range(reps):
        _sync(device)
        t = time.perf_counter()
        out = fn()
        _sync(device)
        secs.append(time.perf_counter() - t)
    return out, statistics.median(secs)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", default=None)
    ap.add_argument("--new", type=int, default=64)
    ap.add_argument("--prompt", type=int, default=128)
    ap.add_argument("--batches", type=int, nargs="+", default=[1, 8])
    ap.add_argument("--reps", type=int, default=2)
    ap.add_argument("--time-budget", type=float, default=200.0)
    ap.add_argument("--smoke-cpu", action="store_true")
    args = ap.parse_args(argv)
    t_start = time.perf_counter()
    smoke = args.smoke_cpu
    device = torch.device("cpu" if smoke else "cuda")
    dtype = torch.float32 if smoke else torch.bfloat16
    shape = SMOKE if smoke else FULL
    prompt, new = (8, 6) if smoke else (args.prompt, args.new)
    res = {"machine": machine(device), "prompt": prompt, "new_tokens": new, "dtype": str(dtype),
           "shape": {k: v for k, v in shape.items() if k != "cal"}, "rows": [], "errors": {}}

    save = json_saver(args.out, "gpu_generate.json", res)

    model = build_model(shape, device, dtype)
    model.generation_config.eos_token_id = None
    model.generation_config.pad_token_id = 0
    gen = torch.Generator().manual_seed(7)
    cal = [torch.randint(3, shape["vocab"], (2, 64 if not smoke else 16), generator=gen).to(device) for _ in range(2)]
    cms = {}
    for key, policy in (("dense", routefx.policies.Dense()), ("duo_0.5", routefx.policies.Duo(budget=0.5))):
        try:
            t = time.perf_counter()
            cms[key] = routefx.compile(model, policy, calibration=cal if policy.needs_calibration else None,
                                       backend="triton")
            res[f"compile_{key}_s"] = round(time.perf_counter() - t, 2)
        except Exception as e:  # noqa: BLE001
            res["errors"][f"compile_{key}"] = f"{type(e).__name__}: {str(e)[:300]}"
            traceback.print_exc()
    for b in args.batches:
        if time.perf_counter() - t_start > args.time_budget:
            res["errors"][f"batch_{b}"] = "skipped: time budget spent"
            continue
        ids = torch.randint(3, shape["vocab"], (b, prompt), generator=gen).to(device)
        mask = torch.ones_like(ids)
        row = {"batch": b, "candidates": {}}
        res["rows"].append(row)
        cands = {"hf_generate": lambda: (model.generate(ids, attention_mask=mask, max_new_tokens=new,
                                                        do_sample=False), None)}
        for key, cm in cms.items():
            for graphs in ((True, False) if key == "dense" else (True,)):
                name = f"{key}_{'graphs' if graphs else 'no_graphs'}"
                cands[name] = (lambda cm=cm, graphs=graphs: generate_with_stats(
                    cm, ids, mask, max_new_tokens=new, eos_token_id=[], pad_token_id=0,
                    static_cache=None if graphs else False))
        for name, fn in cands.items():
            try:
                t = time.perf_counter()
                with torch.no_grad():
                    fn()
                    _sync(device)
                    warm = time.perf_counter() - t
                    (seq, stats), sec = _time(fn, device, args.reps)
                c = {"first_call_s": round(warm, 2), "seconds": sec, "tokens_per_s": b * new / sec,
                     "new_tokens": int(seq.shape[1] - prompt)}
                if stats is not None:
                    c.update(mode=stats.mode, decode_tokens_per_s=stats.decode_tokens_per_second,
                             prefill_ms=stats.prefill_seconds * 1e3)
                row["candidates"][name] = c
                row.setdefault("_seqs", {})[name] = seq
                print(f"[gpu_generate] batch {b} {name}: {c['tokens_per_s']:.1f} tok/s "
                      f"(first call {warm:.1f} s){'' if stats is None else ', mode ' + stats.mode}", flush=True)
            except Exception as e:  # noqa: BLE001
                res["errors"][f"{name}_b{b}"] = f"{type(e).__name__}: {str(e)[:300]}"
                traceback.print_exc()
        seqs = row.pop("_seqs", {})
        hf = row["candidates"].get("hf_generate")
        for name, c in row["candidates"].items():
            if hf and name != "hf_generate":
                c["speedup_vs_hf"] = c["tokens_per_s"] / hf["tokens_per_s"]
        if "hf_generate" in seqs and "dense_graphs" in seqs:
            a, r = seqs["dense_graphs"][:, prompt:], seqs["hf_generate"][:, prompt:]
            same = (a == r).long().cumprod(1).sum(1)
            row["dense_vs_hf_identical_prefix"] = same.tolist()
        if "duo_0.5" in cms and "dense_graphs" in row["candidates"] and "duo_0.5_graphs" in row["candidates"]:
            row["duo_speedup_vs_dense"] = (row["candidates"]["duo_0.5_graphs"]["tokens_per_s"]
                                           / row["candidates"]["dense_graphs"]["tokens_per_s"])
        save()
    res["total_seconds"] = round(time.perf_counter() - t_start, 1)
    save()
    print(json.dumps({k: v for k, v in res.items() if k != "machine"}, indent=1, default=str))


if __name__ == "__main__":
    main()
