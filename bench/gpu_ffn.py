"""GPU benchmark of one routed FFN (issue 12): dense cuBLAS vs the reference op vs plain-torch sorted vs Triton.

FFN: d=4096, F=14336, gated SiLU, bf16, random weights. Duo route mix per budget (small = first F/4 neurons):
    1.00: big 100%            0.75: skip 10% / small 20% / big 70%
    0.50: skip 25% / small 33% / big 42%   (the issue's mix)      0.25: skip 50% / small 33% / big 17%
routes assigned to random tokens (exact counts, a random permutation). For T in {1, 16, 128, 1024, 8192, 16384}:
    dense      the plain FFN through F.linear (cuBLAS), every token on all F neurons
    reference  torch.ops.routefx.routed_ffn (sort + one host sync + per-route GEMMs + index_add_)
    sorted     plain torch with the sort precomputed outside the timing: index_select -> 3 GEMMs on the route's
               weight slices -> index_add_ into an fp32 buffer
    triton     routefx.backends.triton.ffn.routed_ffn (metadata + 2 kernels, no host sync)
reported as median ms (triton.testing.do_bench), useful TFLOP/s (the FLOPs the routes need: 6*d*width per
token), speedup over dense, FLOP-ideal speedup (dense FLOPs / routed FLOPs) and efficiency = speedup / FLOP-ideal.
Also: the floor per case from two numbers (FLOPs / measured cuBLAS peak, bytes / measured copy bandwidth);
decode-sized steps (T = 1..64, eager and CUDA-graph replays); a K=2 MoE-like case (8 equal experts of F/8,
softmax gates); the time of the routing metadata alone; a profile of the kernels at T=8192, budget 0.5; the
autotuner's chosen configurations; the relative error of every Triton result against the reference op.

    python bench/gpu_ffn.py [--quick] [--out DIR]     # on a GPU (< 3 minutes on an H200)
    python bench/gpu_ffn.py --smoke-cpu               # TRITON_INTERPRET=1, fp32 tiny shapes, CPU: code paths only
`run(out_dir=None, quick=False)` returns the results dict (imported by bench/gpu.py).
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
import traceback

if __name__ == "__main__" and "--smoke-cpu" in sys.argv:
    os.environ["TRITON_INTERPRET"] = "1"  # must precede the first import of triton
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

MIXES = {1.0: (0.0, 0.0, 1.0), 0.75: (0.10, 0.20, 0.70), 0.5: (0.25, 0.33, 0.42), 0.25: (0.50, 0.33, 0.17)}


def _timer(device):
    """fn -> median ms. CUDA: triton.testing.do_bench (events); CPU smoke: a host clock around 2 calls."""
    if device.type == "cuda":
        import triton.testing

        def bench(fn, quick=False):
            return float(triton.testing.do_bench(fn, warmup=10 if quick else 25, rep=30 if quick else 80,
                                                 return_mode="median"))
        return bench

    def bench(fn, quick=False):
        fn()
        ts = []
        for _ in range(2):
            t0 = time.perf_counter()
            fn()
            ts.append((time.perf_counter() - t0) * 1e3)
        return statistics.median(ts)
    return bench


def _duo_routes(n_tok, budget, device, gen):
    """[T, 1] route ids (0 big, 1 small, 2 skip) with the budget's mix, exact counts on random tokens."""
    skip, small, _ = MIXES[budget]
    n_skip, n_small = round(n_tok * skip), round(n_tok * small)
    ids = torch.zeros(n_tok, dtype=torch.int64)
    perm = torch.randperm(n_tok, generator=gen)
    ids[perm[:n_skip]] = 2
    ids[perm[n_skip:n_skip + n_small]] = 1
    return ids.view(n_tok, 1).to(device)


def _dense(x, w):
    wu, wg, wd = w
    return F.linear(F.silu(F.linear(x, wg)) * F.linear(x, wu), wd)


def _sorted_plan(routes, ranges):
    """Precomputed (outside timing) per-route token index lists: [(idx [n] int64, start, end)]."""
    flat = routes[:, 0]
    plan = []
    for r in range(len(ranges) // 2):
        s, e = ranges[2 * r], ranges[2 * r + 1]
        idx = (flat == r).nonzero().flatten()
        if s < e and idx.numel():
            plan.append((idx, s, e))
    return plan


def _sorted_torch(x, w, plan):
    wu, wg, wd = w
    out = torch.zeros(x.shape, dtype=torch.float32, device=x.device)
    for idx, s, e in plan:
        xs = x.index_select(0, idx)
        h = F.silu(F.linear(xs, wg[s:e])) * F.linear(xs, wu[s:e])
        out.index_add_(0, idx, F.linear(h, wd[:, s:e]).float())
    return out.to(x.dtype)


def _rel(out, ref):
    out, ref = out.double(), ref.double()
    return ((out - ref).norm() / ref.norm().clamp_min(1e-30)).item()


def _ceilings(device, dtype, bench):
    """Measured cuBLAS matmul rate (TFLOP/s) and device copy bandwidth (GB/s, read + write)."""
    if device.type != "cuda":
        return {"gemm_tflops": float("nan"), "copy_gbs": float("nan")}
    a = torch.randn(8192, 8192, device=device, dtype=dtype)
    b = torch.randn(8192, 8192, device=device, dtype=dtype)
    ms = bench(lambda: a @ b)
    src = torch.randn(256 << 20, device=device, dtype=torch.float32)  # 1 GiB
    dst = torch.empty_like(src)
    ms_copy = bench(lambda: dst.copy_(src))
    return {"gemm_tflops": 2 * 8192 ** 3 / ms / 1e9, "copy_gbs": 2 * src.numel() * 4 / ms_copy / 1e6}


def _graphed(fn):
    """Capture fn() in a CUDA graph (after a warm-up on a side stream); returns replay."""
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        fn()
    torch.cuda.current_stream().wait_stream(s)
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        fn()
    return g.replay


def run(out_dir=None, quick=False, smoke_cpu=False) -> dict:
    """Run the FFN benchmark; returns (and with out_dir, writes gpu_ffn.json) the results dict."""
    from routefx.backends.triton import ffn as tffn
    from routefx.backends.triton.routing import route_metadata
    import routefx.ir.ops  # noqa: F401  (registers torch.ops.routefx.routed_ffn)

    if smoke_cpu:
        device, dtype, d, n = torch.device("cpu"), torch.float32, 64, 96
        tokens, decode_tokens, moe_tokens = [1, 5, 37], [1, 3], [24]
    else:
        if not torch.cuda.is_available():
            raise SystemExit("bench/gpu_ffn.py needs a CUDA GPU (or --smoke-cpu)")
        device, dtype, d, n = torch.device("cuda"), torch.bfloat16, 4096, 14336
        tokens = [1, 16, 128, 1024, 8192, 16384]
        decode_tokens = [1, 2, 4, 8, 16, 32, 64]
        moe_tokens = [8192] if quick else [1024, 8192]
    budgets = [1.0, 0.5] if (quick and not smoke_cpu) else [1.0, 0.75, 0.5, 0.25]
    if quick and not smoke_cpu:
        tokens = [1, 16, 128, 1024, 8192]  # 128: the sorted path with the small configurations (65-256 rows)
    bench = _timer(device)
    gen = torch.Generator().manual_seed(0)
    torch.manual_seed(0)
    k_small = n // 4
    ranges = [0, n, 0, k_small, 0, 0]
    w = [torch.randn(n, d, device=device, dtype=dtype) * d ** -0.5,  # w_up, w_gate, w_down
         torch.randn(n, d, device=device, dtype=dtype) * d ** -0.5,
         torch.randn(d, n, device=device, dtype=dtype) * n ** -0.5]
    wu, wg, wd = w
    elt = torch.finfo(dtype).bits // 8
    res = {"device": torch.cuda.get_device_name() if device.type == "cuda" else "cpu (TRITON_INTERPRET=1 smoke)",
           "torch": torch.__version__, "triton": __import__("triton").__version__, "d": d, "F": n,
           "dtype": str(dtype), "k_small": k_small, "quick": quick, "ffn": [], "decode": [], "moe": [],
           "errors": []}
    try:
        res["ceilings"] = _ceilings(device, dtype, bench)
    except Exception:
        res["ceilings"] = {"gemm_tflops": float("nan"), "copy_gbs": float("nan")}
        res["errors"].append(f"ceilings: {traceback.format_exc(limit=3)}")
    peak, bw = res["ceilings"]["gemm_tflops"], res["ceilings"]["copy_gbs"]
    print(f"device {res['device']}  torch {res['torch']}  triton {res['triton']}  "
          f"cuBLAS {peak:.0f} TFLOP/s  copy {bw:.0f} GB/s", flush=True)

    def call_triton(x, routes, gates=None, rng=ranges):
        return tffn.routed_ffn(x, routes, gates, wu, wg, wd, None, None, None, rng, "silu")

    def call_path(x, routes, path, gates=None, rng=ranges):  # one path of the Triton op forced, eager only
        return tffn._forward(x, routes, gates, wu, wg, wd, None, None, None, rng, "silu", path=path)

    def call_ref(x, routes, gates=None, rng=ranges):
        return torch.ops.routefx.routed_ffn(x, routes, gates, wu, wg, wd, None, None, None, rng, "silu")

    # (a) the FFN table
    for n_tok in tokens:
        x = torch.randn(n_tok, d, device=device, dtype=dtype)
        t_dense = bench(lambda: _dense(x, w), quick)
        for budget in budgets:
            row = {"T": n_tok, "budget": budget}
            try:
                routes = _duo_routes(n_tok, budget, device, gen)
                counts = torch.bincount(routes.flatten().cpu(), minlength=3).tolist()
                width_sum = counts[0] * n + counts[1] * k_small
                flops = 6 * d * width_sum
                used_f = n if counts[0] else (k_small if counts[1] else 0)  # nested: union of used ranges
                nbytes = (3 * d * used_f + 2 * n_tok * d) * elt
                row.update(counts=counts, realised_budget=width_sum / (n_tok * n), flops=flops, bytes=nbytes,
                           floor_ms=max(flops / peak / 1e9, nbytes / bw / 1e6) if device.type == "cuda" else None)
                plan = _sorted_plan(routes, ranges)
                out = call_triton(x, routes)
                row["rel_err_vs_ref"] = _rel(out, call_ref(x, routes))
                times = {"dense": t_dense,
                         "reference": bench(lambda: call_ref(x, routes), quick),
                         "sorted": bench(lambda: _sorted_torch(x, w, plan), quick),
                         "triton": bench(lambda: call_triton(x, routes), quick),
                         "metadata": bench(lambda: route_metadata(routes.view(-1), 3, launch=tffn._launch), quick)}
                if n_tok <= tffn.DECODE_MAX_T:  # the op took the decode path: time the sorted one too
                    times["triton_sorted"] = bench(lambda: call_path(x, routes, "sorted"), quick)
                    row["rel_err_sorted_vs_ref"] = _rel(call_path(x, routes, "sorted"), call_ref(x, routes))
                row["ms"] = times
                ideal = (n_tok * n) / width_sum if width_sum else float("inf")
                row["flop_ideal"] = ideal
                for k, t in times.items():
                    if k in ("metadata", "triton_sorted"):
                        continue
                    useful = 6 * d * n * n_tok if k == "dense" else flops
                    row.setdefault("tflops", {})[k] = useful / t / 1e9
                    row.setdefault("speedup", {})[k] = t_dense / t
                    row.setdefault("efficiency", {})[k] = (t_dense / t) / ideal if width_sum else None
            except Exception as e:  # keep going: one broken case must not hide the others
                row["error"] = f"{type(e).__name__}: {e}"
                res["errors"].append(f"ffn T={n_tok} b={budget}: {traceback.format_exc(limit=3)}")
            res["ffn"].append(row)
            ms = row.get("ms", {})
            print(f"T={n_tok:6d} b={budget:.2f} " + " ".join(f"{k}={v:.4f}" for k, v in ms.items())
                  + f" err={row.get('rel_err_vs_ref', float('nan')):.2e}" + (f" ERROR {row['error']}"
                                                                            if "error" in row else ""), flush=True)

    # (b) decode-sized steps, budget 0.5 and 1.0: eager and CUDA-graph replays (capture proves no host sync)
    for n_tok in decode_tokens:
        x = torch.randn(n_tok, d, device=device, dtype=dtype)
        for budget in (0.5, 1.0):
            row = {"T": n_tok, "budget": budget}
            try:
                routes = _duo_routes(n_tok, budget, device, gen)
                if n_tok == 1 and budget == 0.5:
                    routes.fill_(1)  # one token: a small route (a skip would time nothing)
                ms = {"dense": bench(lambda: _dense(x, w), quick),
                      "triton": bench(lambda: call_triton(x, routes), quick),
                      "triton_sorted": bench(lambda: call_path(x, routes, "sorted"), quick)}
                if device.type == "cuda":
                    ms["dense_graph"] = bench(_graphed(lambda: _dense(x, w)), quick)
                    ms["triton_graph"] = bench(_graphed(lambda: call_triton(x, routes)), quick)
                row["ms"] = ms
                row["rel_err_vs_ref"] = _rel(call_triton(x, routes), call_ref(x, routes))
            except Exception as e:
                row["error"] = f"{type(e).__name__}: {e}"
                res["errors"].append(f"decode T={n_tok} b={budget}: {traceback.format_exc(limit=3)}")
            res["decode"].append(row)
            print(f"decode T={n_tok:3d} b={budget:.2f} " + " ".join(f"{k}={v:.4f}" for k, v in
                  row.get("ms", {}).items()) + (f" ERROR {row['error']}" if "error" in row else ""), flush=True)

    # (c) MoE-like: 8 equal experts of F/8 neurons, top-2 with softmax gates
    moe_ranges = [v for e in range(8) for v in (e * n // 8, (e + 1) * n // 8)]
    for n_tok in moe_tokens:
        row = {"T": n_tok, "experts": 8, "K": 2}
        try:
            x = torch.randn(n_tok, d, device=device, dtype=dtype)
            routes = torch.rand(n_tok, 8, device=device).topk(2, dim=-1).indices
            gates = torch.softmax(torch.randn(n_tok, 2, device=device), -1).to(dtype)
            row["rel_err_vs_ref"] = _rel(call_triton(x, routes, gates, moe_ranges), call_ref(x, routes, gates,
                                                                                            moe_ranges))
            ms = {"dense": bench(lambda: _dense(x, w), quick),
                  "reference": bench(lambda: call_ref(x, routes, gates, moe_ranges), quick),
                  "triton": bench(lambda: call_triton(x, routes, gates, moe_ranges), quick)}
            row["ms"] = ms
            row["flop_ideal"] = 4.0  # 2 of 8 experts of F/8: a quarter of the dense FLOPs
            row["efficiency"] = {k: ms["dense"] / t / 4.0 for k, t in ms.items()}
        except Exception as e:
            row["error"] = f"{type(e).__name__}: {e}"
            res["errors"].append(f"moe T={n_tok}: {traceback.format_exc(limit=3)}")
        res["moe"].append(row)

    # (d) where the time goes at T=8192 (or the largest T), budget 0.5: per-kernel device times
    res["profile"], res["profile_decode"], res["profile_moe"] = [], [], []
    if device.type == "cuda":
        for key, n_prof, rng in (("profile", min(max(tokens), 8192), None), ("profile_decode", 16, None),
                                 ("profile_moe", max(moe_tokens), moe_ranges)):
            try:
                res[key] = _profile(call_triton, device, dtype, d, n_prof, gen, rng)
            except Exception:
                res["errors"].append(f"{key}: {traceback.format_exc(limit=3)}")
    try:
        res["autotune"] = tffn.kernel_configs()
    except Exception:
        res["autotune"] = {}
        res["errors"].append(f"autotune: {traceback.format_exc(limit=3)}")
    if out_dir:
        os.makedirs(out_dir, exist_ok=True)
        with open(os.path.join(out_dir, "gpu_ffn.json"), "w") as f:
            json.dump(res, f, indent=1, default=str)
    _print_summary(res)
    return res


def _profile(call_triton, device, dtype, d, n_tok, gen, moe_ranges=None):
    """Device time per op call by kernel name (5 calls under torch.profiler): Duo routes at budget 0.5, or with
    moe_ranges 8 experts top-2 with gates."""
    from torch.profiler import ProfilerActivity, profile
    x = torch.randn(n_tok, d, device=device, dtype=dtype)
    if moe_ranges is None:
        routes, gates, extra = _duo_routes(x.shape[0], 0.5, device, gen), None, {}
    else:
        routes = torch.rand(n_tok, 8, device=device).topk(2, dim=-1).indices
        gates = torch.softmax(torch.randn(n_tok, 2, device=device), -1).to(dtype)
        extra = {"rng": moe_ranges}
    call_triton(x, routes, gates, **extra)
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(5):
            call_triton(x, routes, gates, **extra)
        torch.cuda.synchronize()
    rows = []
    for ev in prof.key_averages():
        dev_us = getattr(ev, "device_time_total", None) or getattr(ev, "cuda_time_total", 0)
        if dev_us:
            rows.append({"name": ev.key[:80], "calls": ev.count, "device_ms_per_call": dev_us / 1e3 / 5})
    rows.sort(key=lambda r: -r["device_ms_per_call"])
    return rows[:15]


def _print_summary(res):
    for e in res["errors"]:
        print("ERROR", e)
    print("\nautotune:", json.dumps(res["autotune"], indent=None)[:3000])
    for key, label in (("profile", "T=8192, b=0.5"), ("profile_decode", "T=16, b=0.5"),
                       ("profile_moe", "MoE 8 experts top-2")):
        if res.get(key):
            print(f"\nprofile ({label}; device ms per op call):")
            for r in res[key]:
                print(f"  {r['device_ms_per_call']:.4f}  {r['name']}")
    print("\nMoE (8 experts, K=2, gates):")
    for r in res["moe"]:
        print(f"  T={r['T']} " + " ".join(f"{k}={v:.3f}ms" for k, v in r.get("ms", {}).items())
              + " eff " + " ".join(f"{k}={v:.2f}" for k, v in r.get("efficiency", {}).items())
              + f" err={r.get('rel_err_vs_ref', float('nan')):.1e}" + (f" ERROR {r['error']}" if "error" in r else ""))
    print("\ndecode steps (ms; graph = CUDA-graph replay):")
    for r in res["decode"]:
        print(f"  T={r['T']:3d} b={r['budget']:.2f} " + " ".join(f"{k}={v:.4f}" for k, v in r.get("ms", {}).items())
              + f" err={r.get('rel_err_vs_ref', float('nan')):.1e}")
    print(f"\n{res['device']}  d={res['d']} F={res['F']} {res['dtype']}  cuBLAS {res['ceilings']['gemm_tflops']:.0f} "
          f"TFLOP/s, copy {res['ceilings']['copy_gbs']:.0f} GB/s")
    print(f"{'T':>6} {'b':>4} {'ideal':>5} | {'dense':>7} {'ref':>7} {'sorted':>7} {'triton':>7} {'meta':>6} "
          f"{'floor':>6} ms | speedup ref/sort/trit | eff ref/sort/trit | trit TF/s  err")
    for r in res["ffn"]:
        ms = r.get("ms")
        if not ms:
            print(f"{r['T']:6d} {r['budget']:4.2f} ERROR {r.get('error')}")
            continue
        sp, ef = r["speedup"], r["efficiency"]
        eff = "/".join("  -  " if ef[k] is None else f"{ef[k]:.2f}" for k in ("reference", "sorted", "triton"))
        floor = r.get("floor_ms")
        print(f"{r['T']:6d} {r['budget']:4.2f} {r['flop_ideal']:5.2f} | {ms['dense']:7.3f} {ms['reference']:7.3f} "
              f"{ms['sorted']:7.3f} {ms['triton']:7.3f} {ms['metadata']:6.3f} "
              f"{(floor if floor is not None else float('nan')):6.3f} | "
              f"{sp['reference']:.2f}/{sp['sorted']:.2f}/{sp['triton']:.2f} | {eff} | "
              f"{r['tflops']['triton']:6.0f}  {r['rel_err_vs_ref']:.1e}")


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true", help="fewer sizes and budgets, shorter timing")
    ap.add_argument("--out", default=None, help="directory for gpu_ffn.json")
    ap.add_argument("--smoke-cpu", action="store_true", help="TRITON_INTERPRET=1, CPU fp32 tiny shapes")
    a = ap.parse_args(argv)
    t0 = time.time()
    res = run(out_dir=a.out, quick=a.quick, smoke_cpu=a.smoke_cpu)
    print(f"\nwall {time.time() - t0:.1f} s; errors: {len(res['errors'])}")
    return 1 if res["errors"] else 0


if __name__ == "__main__":
    sys.exit(main())
