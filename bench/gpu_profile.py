"""Where the whole model's time goes on a GPU (issue 12), and whether the compiled routers pick the eager routes.

The model of bench/gpu.py (Llama, 8 layers, d=2048, F=5632, bf16, batch 4 x 2048): Hugging Face torch.compile,
routefx backend "triton" Dense and Duo(budget, router). For each candidate, after two warm-up calls:
  wall         median ms of 5 synchronised calls
  profile      device time per call by kernel (torch.profiler, 3 calls), summed into classes: routefx's Triton
               kernels, cuBLAS GEMMs, attention, sorting, Inductor's fused kernels, the rest; device time vs wall
               (a gap is host overhead or a synchronisation)
and the configurations the autotuner picked for the routed FFN kernels.
Route agreement: the Duo graph with its route ids as outputs (`static_routes.with_route_outputs`), compiled by the
triton backend as `compile` does, against the eager backend on the same input: the share of equal route ids per
layer and the max logit difference; with --emulate again under Inductor's `emulate_precision_casts` (rounds
intermediates like eager), to tell rounding of fused elementwise code from other causes.

    python bench/gpu_profile.py --out DIR          # CUDA (about 3 minutes on an H200)
    python bench/gpu_profile.py --smoke-cpu        # the code paths on tiny fp32 shapes under TRITON_INTERPRET=1
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
import traceback

HERE = os.path.dirname(os.path.abspath(__file__))
if __name__ == "__main__" and "--smoke-cpu" in sys.argv:
    os.environ.setdefault("TRITON_INTERPRET", "1")
sys.path.insert(0, HERE)
sys.path.insert(0, os.path.dirname(HERE))

import torch  # noqa: E402

import gpu as G  # noqa: E402  (bench/gpu.py: the model, the inputs, compile_routefx)
import routefx  # noqa: E402
from routefx.backends.static_routes import with_route_outputs  # noqa: E402
from routefx.backends.triton import backend as tb  # noqa: E402

CLASSES = [("routefx triton", ("up_kernel", "down_kernel", "span_up", "span_down", "route_")),
           ("sort", ("sort", "Sort", "radix", "Radix", "scan", "Scan")),
           ("attention", ("flash", "fmha", "attention", "Attention", "efficient")),
           ("cuBLAS GEMM", ("gemm", "Gemm", "nvjet", "cutlass", "xmma", "cublas", "sm90_", "sm80_")),
           ("inductor fused", ("triton_",))]


def _class(name: str) -> str:
    for cls, keys in CLASSES:
        if any(k in name for k in keys):
            return cls
    return "other"


def profile(fn, device, calls: int = 3) -> dict:
    from torch.profiler import ProfilerActivity
    from torch.profiler import profile as prof_ctx
    sync = G.sync(device)
    with torch.no_grad():
        for _ in range(2):
            fn()
        sync()
        walls = []
        for _ in range(5):
            t = time.perf_counter()
            fn()
            sync()
            walls.append((time.perf_counter() - t) * 1e3)
        acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
        with prof_ctx(activities=acts) as prof:
            for _ in range(calls):
                fn()
            sync()
    rows = {}
    for ev in prof.key_averages():
        us = getattr(ev, "device_time_total", None) or getattr(ev, "cuda_time_total", 0) or 0
        if device.type != "cuda":
            us = ev.self_cpu_time_total
        if us and (device.type != "cuda" or ev.device_type.name == "CUDA"):
            rows[ev.key] = rows.get(ev.key, 0.0) + us / 1e3 / calls
    kernels = sorted(({"name": k[:110], "ms": round(v, 4), "class": _class(k)} for k, v in rows.items()),
                     key=lambda r: -r["ms"])
    classes = {}
    for r in kernels:
        classes[r["class"]] = round(classes.get(r["class"], 0.0) + r["ms"], 4)
    total = sum(r["ms"] for r in kernels)
    return {"wall_ms": round(statistics.median(walls), 3), "device_ms": round(total, 3),
            "classes": dict(sorted(classes.items(), key=lambda kv: -kv[1])), "top": kernels[:25]}


def agreement(gm, run, kw) -> dict:
    """Route ids and logits of `run` (a compiled with_route_outputs graph) against eager on the same graph."""
    with torch.no_grad():
        out_c, routes_c = run(**kw)
        out_e, routes_e = gm(**kw)
    eq = [float((a == b).double().mean()) for a, b in zip(routes_c, routes_e)]
    return {"layers": len(eq), "equal_share_per_layer": [round(v, 6) for v in eq],
            "all_equal": all(v == 1.0 for v in eq),
            "differing_ids": int(sum((a != b).sum().item() for a, b in zip(routes_c, routes_e))),
            "ids": int(sum(a.numel() for a in routes_e)),
            "max_logit_diff": G.logits_diff(out_c, out_e)}


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", default=None)
    ap.add_argument("--smoke-cpu", action="store_true")
    ap.add_argument("--router", default="local")
    ap.add_argument("--budget", type=float, default=0.5)
    ap.add_argument("--emulate", action="store_true",
                    help="also check route agreement with Inductor's emulate_precision_casts (one more compile)")
    args = ap.parse_args(argv)
    if args.smoke_cpu:
        device, dtype, shape = torch.device("cpu"), torch.float32, G.SMOKE
    else:
        device, dtype, shape = torch.device("cuda"), torch.bfloat16, G.FULL
    res = {"machine": G.machine(device), "shape": {k: v for k, v in shape.items() if k != "cal"},
           "router": args.router, "budget": args.budget, "candidates": {}, "agreement": {}, "errors": {}}

    save = G.json_saver(args.out, "gpu_profile.json", res)

    gen = torch.Generator().manual_seed(1)
    x = G.batch(gen, shape["batch"], shape["seq"], shape["vocab"], device)
    n_cal, cal_b, cal_s = shape["cal"]
    cal = [G.batch(gen, cal_b, cal_s, shape["vocab"], device) for _ in range(n_cal)]
    model = G.build_model(shape, device, dtype)
    fns = {}
    if device.type == "cuda":
        hf_c = torch.compile(model)
        fns["hf_inductor"] = lambda: hf_c(**x)
    for key, policy in (("routefx_dense", routefx.policies.Dense()),
                        (f"routefx_duo_{args.budget:g}", routefx.policies.Duo(budget=args.budget, router=args.router))):
        try:
            cm, rec = G.compile_routefx(model, policy, x, cal, device)
            fns[key] = (lambda cm=cm: cm(**x))
            res["candidates"][key] = {"compile": rec, "budget_x": cm.route_stats([x]).budget}
            if key.startswith("routefx_duo"):
                _record_configs(res)  # right after the first call: what the autotuner picked for the Duo shapes
                save()
                gm = cm.graph_module
                consts = gm.meta["routefx"].constant_kwargs
                kw = {n.target: x.get(n.target, consts.get(n.target)) for n in gm.graph.nodes
                      if n.op == "placeholder"}
                with_routes = with_route_outputs(gm)
                variants = [("default", {})] + ([("emulate_precision_casts", {"emulate_precision_casts": True})]
                                                if args.emulate else [])
                for variant, patch in variants:
                    try:
                        t = time.perf_counter()
                        with torch._inductor.config.patch(patch):
                            run = tb.prepare(with_routes, kw)
                            res["agreement"][variant] = agreement(with_routes, run, kw)
                        res["agreement"][variant]["compile_and_call_s"] = round(time.perf_counter() - t, 1)
                        print(variant, json.dumps(res["agreement"][variant]), flush=True)
                    except Exception as e:  # noqa: BLE001
                        res["errors"][f"agreement_{variant}"] = G._err(e)
                        traceback.print_exc()
        except Exception as e:  # noqa: BLE001
            res["errors"][key] = G._err(e)
            traceback.print_exc()
        save()
    for key, fn in fns.items():
        try:
            res["candidates"].setdefault(key, {})["profile"] = p = profile(fn, device)
            print(f"=== {key}: wall {p['wall_ms']} ms, device {p['device_ms']} ms, classes {p['classes']}", flush=True)
            for r in p["top"][:14]:
                print(f"    {r['ms']:8.3f}  {r['class']:15s} {r['name']}", flush=True)
        except Exception as e:  # noqa: BLE001
            res["errors"][f"profile_{key}"] = G._err(e)
            traceback.print_exc()
        save()
    _record_configs(res)
    save()
    return res


def _record_configs(res: dict) -> None:
    """The configurations the autotuner picked so far, per kernel and key, into res and printed."""
    from routefx.backends.triton import ffn
    res["kernel_configs"] = ffn.kernel_configs()
    for name, picked in res["kernel_configs"].items():
        for key, cfg in picked.items():
            print(f"config {name} {key}: {cfg}", flush=True)


if __name__ == "__main__":
    main()
