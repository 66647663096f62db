"""Kernel tuning probe for the Triton routed FFN (issue 12): where the time goes at large T, per kernel and per
configuration, with weight tiles by pointer loads and through tensor descriptors (TMA).

FFN d=4096, F=14336, gated SiLU, bf16, Duo route mixes of bench/gpu_ffn.py. For each case (T, budget):
    dense       plain FFN through F.linear (cuBLAS)
    sorted      plain torch with the sort precomputed outside the timing (bench/gpu_ffn.py's `_sorted_torch`)
    triton      the op with weights by pointers ("ptr"), through descriptors ("tma"), and with gate/up rows
                interleaved in one matrix ("paired": kernel 1 may run one N = 2·BN product), each autotuned
and for each Triton variant the device time per kernel (torch.profiler) and every configuration the autotuner
timed (ms), so the best configuration's rate can be compared with cuBLAS on the same shapes.

    python bench/gpu_tune.py [--out DIR] [--cases 8192:0.5 8192:1.0 1024:0.5]
    python bench/gpu_tune.py --smoke-cpu      # code paths only: tiny fp32 shapes under TRITON_INTERPRET=1
"""
from __future__ import annotations

import argparse
import json
import os
import sys

if "--smoke-cpu" in sys.argv:
    os.environ["TRITON_INTERPRET"] = "1"  # before triton is first imported
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import torch  # noqa: E402

from bench.gpu_ffn import _dense, _duo_routes, _profile, _rel, _sorted_plan, _sorted_torch  # noqa: E402

D, F = 4096, 14336


def _flops(routes, ranges):
    widths = torch.tensor([ranges[2 * r + 1] - ranges[2 * r] for r in range(len(ranges) // 2)], device=routes.device)
    return float(6 * D * widths[routes.flatten()].sum().item())


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", default=None)
    ap.add_argument("--cases", nargs="+", default=["8192:0.5", "8192:1.0", "1024:0.5"])
    ap.add_argument("--smoke-cpu", action="store_true")
    args = ap.parse_args(argv)
    import time

    import triton.testing
    global D, F

    from routefx.backends.triton import ffn as tffn
    dev, dt = torch.device("cuda"), torch.bfloat16
    if args.smoke_cpu:
        dev, dt, D, F, args.cases = torch.device("cpu"), torch.float32, 64, 192, ["300:0.5", "300:1.0"]
    gen = torch.Generator().manual_seed(0)
    w = tuple((torch.randn(*s, generator=gen) / s[1] ** 0.5).to(dev, dt) for s in ((F, D), (F, D), (D, F)))
    wu, wg, wd = w
    ranges = [0, F, 0, F // 4, 0, 0]
    def bench(fn):
        if dev.type == "cpu":
            t0 = time.perf_counter()
            fn()
            return (time.perf_counter() - t0) * 1e3
        return float(triton.testing.do_bench(fn, warmup=25, rep=100, return_mode="median"))
    res = {"device": torch.cuda.get_device_name(0) if dev.type == "cuda" else "cpu", "torch": torch.__version__, "triton": triton.__version__,
           "cases": []}
    real_ok = tffn._tma_ok
    for case in args.cases:
        n_tok, budget = int(case.split(":")[0]), float(case.split(":")[1])
        x = torch.randn(n_tok, D, generator=gen).to(dev, dt)
        routes = _duo_routes(n_tok, budget, dev, gen)
        flops = _flops(routes, ranges)
        row = {"T": n_tok, "budget": budget, "useful_tflop": flops / 1e12}
        row["dense_ms"] = bench(lambda: _dense(x, w))
        plan = _sorted_plan(routes, ranges)
        row["sorted_ms"] = bench(lambda: _sorted_torch(x, w, plan))
        ref = _sorted_torch(x, w, plan)
        pu, pg = tffn.interleave_gate_up(wu, wg)  # gate/up rows interleaved: kernel 1's paired tile
        for variant, ok in (("ptr", lambda *t: False), ("tma", real_ok), ("paired", real_ok)):
            tffn._tma_ok = ok
            u_, g_ = (pu, pg) if variant == "paired" else (wu, wg)
            def call(xx, rr, gg, u_=u_, g_=g_, **kw):
                return tffn._forward(xx, rr, gg, u_, g_, wd, None, None, None, ranges, "silu", path="sorted")
            try:
                out = call(x, routes, None)
                if dev.type == "cuda":
                    torch.cuda.synchronize()
                row[f"{variant}_rel_err"] = _rel(out, ref)
                size = "small" if n_tok <= tffn._SMALL_N else "large"
                tma = variant != "ptr" and real_ok(wu, wg, wd)
                up_tuner = tffn._UP_PAIRED[size] if variant == "paired" and tma else tffn._UP[size, tma]
                for name, tuner in (("up", up_tuner), ("down", tffn._DOWN[size, tma])):
                    tim = getattr(tuner, "configs_timings", None) or {}
                    row[f"{variant}_{name}_configs"] = sorted(
                        [(str(c), round(float(t[0] if isinstance(t, (list, tuple)) else t), 4))
                         for c, t in tim.items()], key=lambda p: p[1])
                row[f"{variant}_ms"] = bench(lambda: call(x, routes, None))
                if dev.type == "cuda":
                    row[f"{variant}_profile"] = _profile(lambda xx, rr, gg: call(xx, rr, gg), dev, dt, D, n_tok,
                                                     torch.Generator().manual_seed(1))
            except Exception as e:  # noqa: BLE001
                row[f"{variant}_error"] = f"{type(e).__name__}: {e}"[:400]
        tffn._tma_ok = real_ok
        for k in ("sorted", "ptr", "tma", "paired"):
            if f"{k}_ms" in row:
                row[f"{k}_speedup"] = row["dense_ms"] / row[f"{k}_ms"]
                row[f"{k}_tflops"] = flops / row[f"{k}_ms"] / 1e9
        row["flop_ideal"] = 6 * D * F * n_tok / flops
        res["cases"].append(row)
        print(json.dumps({k: v for k, v in row.items() if not k.endswith(("_configs", "_profile"))}), flush=True)
        for k in ("ptr", "tma", "paired"):
            for part in ("up", "down"):
                print(f"  {k} {part} best configs:", row.get(f"{k}_{part}_configs", [])[:4], flush=True)
            print(f"  {k} profile:", [(p["name"][:40], round(p["device_ms_per_call"], 3))
                                      for p in row.get(f"{k}_profile", [])[:6]], flush=True)
        if args.out:
            with open(os.path.join(args.out, "gpu_tune.json"), "w") as f:
                json.dump(res, f, indent=1)
    print("=== summary (ms; speedup over dense; efficiency = speedup / FLOP-ideal)")
    for r in res["cases"]:
        parts = [f"T={r['T']} b={r['budget']}: dense {r['dense_ms']:.3f}"]
        for k in ("sorted", "ptr", "tma", "paired"):
            if f"{k}_ms" in r:
                parts.append(f"{k} {r[k + '_ms']:.3f} ({r[k + '_speedup']:.2f}x, eff {r[k + '_speedup'] / r['flop_ideal']:.2f},"
                             f" {r[k + '_tflops']:.0f} TF/s)")
            elif f"{k}_error" in r:
                parts.append(f"{k} ERROR {r[k + '_error'][:120]}")
        print("; ".join(parts))


if __name__ == "__main__":
    main()
