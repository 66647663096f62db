"""GPU benchmark (issue 12): a whole Llama-shaped model, routefx backend "triton" against Hugging Face eager and
torch.compile (inductor), in one process on one GPU; then bench/gpu_ffn.py's run() (one FFN, T sweep, decode
steps) when that file exists.

Model: transformers `LlamaForCausalLM` from a config (8 layers, hidden 2048, FFN 5632, 16 query / 4 key-value
heads, vocab 32000), random weights (torch.manual_seed(0), initialised on the GPU), bf16, sdpa attention. Input:
batch 4 x 2048 random token ids, attention mask all ones.

Candidates: hf_eager, hf_inductor (torch.compile(model), its defaults), routefx_dense (Dense(), backend
"triton"), routefx_duo_<b> (Duo(budget=b, router=--router), backend "triton") for b in 0.75 / 0.5 / 0.25.
With --attention-variants (CUDA) also routefx_dense_flex / routefx_duo_0.5_flex (the masked attention as
block-sparse FlexAttention: backend option flex_attention=True, routefx/backends/triton/attention.py; it failed
on the H200 on 2026-11-26 before a fix made afterwards) and routefx_dense_causal / routefx_duo_0.5_causal (SDPA's
causal kernel when the mask is causal, one host read per forward: causal_check=True,
routefx/backends/causal_sdpa.py). Both experimental; what they gain is attention's, not routing's.
For each one:
  latency      median over interleaved rounds (routefx.timing.median_seconds, every call followed by
               torch.cuda.synchronize()), all candidates and a cuBLAS peak GEMM in the same rounds
  speedup      over hf_inductor and over routefx_dense, from those medians
  FLOP-ideal   routefx's FLOP count: CompiledModel.flops_per_token([x]) of routefx_dense / of the candidate, with
               the routes realised on the measured input x; efficiency = speedup over routefx_dense / FLOP-ideal
  TFLOP/s      FLOPs per token x tokens / latency (dense count for HF), MFU against the peak GEMM
               ([8192, 2048] x [2048, 5632] bf16, torch.mm)
  compile      routefx.compile wall time (capture, calibration, passes) and, separately, the first call
               (Inductor compile + kernel autotuning); Inductor's on-disk cache is not cleared
  check        max |logits - reference| (HF eager for dense candidates, the eager backend on the same rewritten
               graph for Duo), so a fast wrong answer cannot pass unnoticed

Duo calibration is small (2 batches of [2, 256] tokens) so that the script stays under 5 minutes with its
Inductor compiles. Each part runs in a try block; gpu.json is rewritten after each part, so a failure or a
timeout keeps what was measured.

    python bench/gpu.py --out DIR             # the real run (CUDA)
    python bench/gpu.py --out DIR --quick     # budget 0.5 only, 1 + 3 rounds, gpu_ffn.run(quick=True)
    python bench/gpu.py --out DIR --smoke-cpu # the same code paths on tiny fp32 shapes, CPU, TRITON_INTERPRET=1
    python bench/gpu.py --report DIR/gpu.json # the markdown report again (bench/gpu_report.py)
"""
from __future__ import annotations

import argparse
import gc
import importlib.util
import inspect
import json
import os
import platform
import sys
import time
import traceback

HERE = os.path.dirname(os.path.abspath(__file__))
FULL = dict(layers=8, d=2048, ffn=5632, heads=16, kv_heads=4, vocab=32000, batch=4, seq=2048, cal=(2, 2, 256))
SMOKE = dict(layers=2, d=64, ffn=176, heads=4, kv_heads=2, vocab=256, batch=2, seq=24, cal=(2, 2, 16))
TARGETS = {"dense_vs_inductor": 0.95, "duo_0.5_vs_inductor": 1.3}


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default=None, help="output folder for gpu.json and gpu.md (default: print only)")
    p.add_argument("--quick", action="store_true", help="budget 0.5 only, 1 warm-up + 3 rounds")
    p.add_argument("--smoke-cpu", action="store_true", help="tiny fp32 shapes on CPU under TRITON_INTERPRET=1")
    p.add_argument("--budgets", type=float, nargs="+", default=None)
    p.add_argument("--router", default="local", choices=["local", "random", "static"])
    p.add_argument("--reps", type=int, default=None, help="timed rounds (default 9, quick 3)")
    p.add_argument("--warmup", type=int, default=None, help="warm-up rounds (default 2, quick 1)")
    p.add_argument("--no-inductor", action="store_true", help="leave out hf_inductor")
    p.add_argument("--no-ffn", action="store_true", help="leave out bench/gpu_ffn.py")
    p.add_argument("--also-static", action="store_true",
                   help="also time each routefx candidate compiled with static shapes (<key>_static)")
    p.add_argument("--no-cudagraphs", dest="cudagraphs", action="store_false",
                   help="leave out the CUDA-graph variants (hf_inductor_cg: torch.compile mode reduce-overhead; "
                        "routefx_dense_cg, routefx_duo_0.5_cg: backend option cudagraphs=True)")
    p.add_argument("--attention-variants", action="store_true",
                   help="also routefx_{dense,duo_0.5}_flex (backend option flex_attention=True: masked attention "
                        "as block-sparse FlexAttention) and _causal (causal_check=True: SDPA's causal kernel when "
                        "the mask is causal); both experimental")
    p.add_argument("--time-budget", type=float, default=280.0,
                   help="seconds for the whole script (default 280): model compiles stop at budget - 100 s "
                        "(- 10 s with --no-ffn); "
                        "bench/gpu_ffn.py runs in full with >= 180 s left, --quick with >= 45 s, else not at all")
    p.add_argument("--report", default=None, metavar="JSON", help="only print the markdown report of a JSON file")
    return p.parse_args(argv)


ARGS = parse_args() if __name__ == "__main__" else None
if ARGS is not None and ARGS.smoke_cpu:
    os.environ.setdefault("TRITON_INTERPRET", "1")  # before any @triton.jit kernel is imported
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
os.environ.setdefault("TQDM_DISABLE", "1")

import torch  # noqa: E402
import transformers  # noqa: E402

import routefx  # noqa: E402
from routefx.timing import median_seconds  # noqa: E402

sys.path.insert(0, HERE)
from gpu_report import report  # noqa: E402


def log(msg: str) -> None:
    print(f"[gpu.py {time.strftime('%H:%M:%S')}] {msg}", flush=True)


def _err(e: BaseException) -> str:
    lines = str(e).strip().splitlines()
    return f"{type(e).__name__}: {lines[0] if lines else ''}"[:500]


def machine(device: torch.device) -> dict:
    import triton
    out = {"device": torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor() or "cpu",
           "versions": {"torch": torch.__version__, "triton": triton.__version__,
                        "transformers": transformers.__version__, "cuda": torch.version.cuda,
                        "python": platform.python_version()},
           "triton_interpret": os.environ.get("TRITON_INTERPRET")}
    if device.type == "cuda":
        p = torch.cuda.get_device_properties(device)
        out["gpu_memory_gib"] = round(p.total_memory / 2**30, 1)
        out["sm_count"] = p.multi_processor_count
    return out


def build_model(shape: dict, device, dtype) -> torch.nn.Module:
    cfg = transformers.LlamaConfig(vocab_size=shape["vocab"], hidden_size=shape["d"], intermediate_size=shape["ffn"],
                                   num_hidden_layers=shape["layers"], num_attention_heads=shape["heads"],
                                   num_key_value_heads=shape["kv_heads"], max_position_embeddings=4096,
                                   bos_token_id=1, eos_token_id=2)
    cfg._attn_implementation = "sdpa"
    torch.manual_seed(0)
    with torch.device(device):
        model = transformers.LlamaForCausalLM(cfg)
    return model.to(dtype).eval()


def batch(gen: torch.Generator, b: int, s: int, vocab: int, device) -> dict:
    ids = torch.randint(3, vocab, (b, s), generator=gen)
    return {"input_ids": ids.to(device), "attention_mask": torch.ones(b, s, dtype=torch.long, device=device)}


def json_saver(out_dir: str | None, name: str, res: dict):
    """A function that writes `res` to out_dir/name (nothing without out_dir): called after each part, so that a
    failure or a timeout keeps what was measured."""
    def save():
        if out_dir:
            os.makedirs(out_dir, exist_ok=True)
            with open(os.path.join(out_dir, name), "w") as f:
                json.dump(res, f, indent=1, default=str)
    return save


def sync(device):
    return torch.cuda.synchronize if device.type == "cuda" else (lambda: None)


def logits_diff(a, b) -> float:
    return (a.logits.float() - b.logits.float()).abs().max().item()


# ---- whole model ------------------------------------------------------------------------------------------------

def compile_routefx(model, policy, x, cal, device) -> tuple[object, dict]:
    """routefx.compile with backend "triton", then the first call (Inductor compile, autotuning) timed apart."""
    done = sync(device)
    routefx.clear_capture_cache()     # each candidate's compile time from scratch: no export kept by an earlier one
    t = time.perf_counter()
    if policy.needs_calibration:
        cm = routefx.compile(model, policy, calibration=cal, backend="triton")
    else:
        cm = routefx.compile(model, policy, example_inputs=(), example_kwargs=x, backend="triton")
    t1 = time.perf_counter()
    with torch.no_grad():
        cm(**x)
    done()
    t2 = time.perf_counter()
    rep = cm.report
    rec = {"routefx_compile_s": round(t1 - t, 3), "capture_s": rep.capture_seconds,
           "calibration_s": rep.calibration_seconds, "passes_s": rep.compile_seconds,
           "first_call_s": round(t2 - t1, 3), "runner": repr(cm.runner),
           "flex_fallback": getattr(cm.runner, "flex_fallback", None)}
    return cm, rec


def flops(cm, x) -> dict:
    st = cm.route_stats([x])
    budget = cm.plan.budget
    return {"flops_per_token_x": cm.flops_per_token([x]), "budget_x": st.budget,
            "budget_calibration": None if budget is None else budget.realised,
            "lambda": None if budget is None else budget.lam,
            "mix_x": [[round(v, 4) for v in layer["mix"]] for layer in st.layers]}


def eager_graph_logits(cm, x):
    """The eager backend's output on the same rewritten graph (the reference for a routed candidate)."""
    gm = cm.graph_module
    consts = gm.meta["routefx"].constant_kwargs
    with torch.no_grad():
        return gm(**{n.target: x.get(n.target, consts.get(n.target)) for n in gm.graph.nodes if n.op == "placeholder"})


def _order(budgets) -> list[float]:
    """Duo budgets in the order they are compiled: 0.5 first (it carries a target), then the others."""
    return sorted(budgets, key=lambda b: (b != 0.5, -b))


def variant(cm, key, suffix, options, x, ref, rec, c, fns, device) -> None:
    """The same lowered graph prepared again with other triton-backend options, timed as `<key>_<suffix>`:
    "static" (dynamic=False, like hf_inductor's first compile: what dynamic shapes cost) or "cg"
    (cudagraphs=True: the forward replayed as CUDA graphs, what the host launch overhead costs). The first-call
    time covers three calls (CUDA graph trees warm up, then record)."""
    from routefx.backends.triton import backend as tb
    gm = cm.graph_module
    consts = gm.meta["routefx"].constant_kwargs
    kw = {n.target: x.get(n.target, consts.get(n.target)) for n in gm.graph.nodes if n.op == "placeholder"}
    run = tb.prepare(gm, kw, **options)
    from torch._dynamo.utils import counters
    skips = counters["inductor"]["cudagraph_skips"]
    t = time.perf_counter()
    with torch.no_grad():
        for _ in range(3 if options.get("cudagraphs") else 1):
            out = run(**kw)
    sync(device)()
    c[f"{key}_{suffix}"] = {**{k: rec[k] for k in ("flops_per_token_x", "budget_x") if k in rec},
                            "first_call_s": round(time.perf_counter() - t, 3), "runner": repr(run),
                            "cudagraph_skips": counters["inductor"]["cudagraph_skips"] - skips,
                            "max_logit_diff": logits_diff(out, ref if key == "routefx_dense" else
                                                          eager_graph_logits(cm, x))}
    fns[f"{key}_{suffix}"] = lambda: run(**kw)


def hf_cudagraphs(model, x, ref, c, fns, device) -> None:
    """torch.compile(model, mode="reduce-overhead"): Hugging Face's model replayed as CUDA graphs (the fair
    baseline for routefx's cudagraphs variants)."""
    t = time.perf_counter()
    torch._logging.set_logs(perf_hints=True)  # Inductor says why it could not use CUDA graphs, if it cannot
    hf_cg = torch.compile(model, mode="reduce-overhead")
    with torch.no_grad():
        for _ in range(3):
            torch.compiler.cudagraph_mark_step_begin()
            out = hf_cg(**x)
    sync(device)()
    c["hf_inductor_cg"] = {"first_call_s": round(time.perf_counter() - t, 3),
                           "max_logit_diff": logits_diff(out, ref), "check": "hf_eager"}

    def call():
        torch.compiler.cudagraph_mark_step_begin()
        return hf_cg(**x)
    fns["hf_inductor_cg"] = call


def whole_model(args, shape: dict, device, dtype, res: dict, save, deadline: float) -> None:
    """Compile the candidates in priority order (hf_inductor, routefx_dense, Duo 0.5, the other budgets) while
    time.perf_counter() < deadline, then time all compiled ones in the same interleaved rounds."""
    budgets = args.budgets or ([0.5] if args.quick else [0.75, 0.5, 0.25])
    gen = torch.Generator().manual_seed(1)
    x = batch(gen, shape["batch"], shape["seq"], shape["vocab"], device)
    n_cal, cal_b, cal_s = shape["cal"]
    cal = [batch(gen, cal_b, cal_s, shape["vocab"], device) for _ in range(n_cal)]
    tokens = shape["batch"] * shape["seq"]
    model = build_model(shape, device, dtype)
    wm = res["whole_model"] = {"shape": {k: v for k, v in shape.items() if k != "cal"}, "dtype": str(dtype),
                               "tokens": tokens, "router": args.router, "calibration": list(shape["cal"]),
                               "candidates": {}, "errors": {}, "skipped_for_time": []}
    c = wm["candidates"]
    fns = {}
    with torch.no_grad():
        ref = model(**x)
    fns["hf_eager"] = lambda: model(**x)
    c["hf_eager"] = {}
    todo = ([] if args.no_inductor else [("hf_inductor", None)]) + [("routefx_dense", routefx.policies.Dense())] + [
        (f"routefx_duo_{b:g}", routefx.policies.Duo(budget=b, router=args.router)) for b in _order(budgets)]
    for key, policy in todo:
        if time.perf_counter() > deadline:
            wm["skipped_for_time"].append(key)
            log(f"{key}: skipped, the compile deadline has passed")
            continue
        try:
            if policy is None:  # torch.compile of the Hugging Face model, its defaults
                t = time.perf_counter()
                hf_c = torch.compile(model)
                with torch.no_grad():
                    out = hf_c(**x)
                sync(device)()
                c[key] = {"first_call_s": round(time.perf_counter() - t, 3), "max_logit_diff": logits_diff(out, ref),
                          "check": "hf_eager"}
                fns[key] = lambda: hf_c(**x)
                log(f"{key}: first call (compile) {c[key]['first_call_s']} s")
                if args.cudagraphs and device.type == "cuda":
                    try:
                        hf_cudagraphs(model, x, ref, c, fns, device)
                        log(f"hf_inductor_cg: first three calls {c['hf_inductor_cg']['first_call_s']} s")
                    except Exception as e:  # noqa: BLE001 - record and go on
                        wm["errors"]["hf_inductor_cg"] = _err(e)
                        traceback.print_exc()
                continue
            cm, rec = compile_routefx(model, policy, x, cal, device)
            rec.update(flops(cm, x))
            with torch.no_grad():
                out = cm(**x)
            rec["max_logit_diff"] = logits_diff(out, ref if key == "routefx_dense" else eager_graph_logits(cm, x))
            rec["check"] = "hf_eager" if key == "routefx_dense" else "eager backend, same graph"
            c[key] = rec
            fns[key] = (lambda cm=cm: cm(**x))
            log(f"{key}: compile {rec['routefx_compile_s']} s + first call {rec['first_call_s']} s, "
                f"budget on x {rec['budget_x']:.3f}, max logit diff {rec['max_logit_diff']:.3g}")
            if args.also_static and time.perf_counter() < deadline:
                variant(cm, key, "static", {"dynamic": False}, x, ref, rec, c, fns, device)
            for suffix, option in (("flex", "flex_attention"), ("causal", "causal_check")):
                if not (args.attention_variants and device.type == "cuda" and time.perf_counter() < deadline
                        and key in ("routefx_dense", "routefx_duo_0.5")):
                    continue
                try:  # the same graph with the masked attention lowered otherwise (experimental options)
                    variant(cm, key, suffix, {option: True}, x, ref, rec, c, fns, device)
                    log(f"{key}_{suffix}: first call {c[f'{key}_{suffix}']['first_call_s']} s, runner "
                        f"{c[f'{key}_{suffix}']['runner']}")
                except Exception as e:  # noqa: BLE001 - record and go on
                    wm["errors"][f"{key}_{suffix}"] = _err(e)
                    traceback.print_exc()
            if args.cudagraphs and device.type == "cuda" and key in ("routefx_dense", "routefx_duo_0.5") \
                    and time.perf_counter() < deadline:
                try:
                    variant(cm, key, "cg", {"cudagraphs": True}, x, ref, rec, c, fns, device)
                    log(f"{key}_cg: first three calls {c[key + '_cg']['first_call_s']} s, max logit diff "
                        f"{c[key + '_cg']['max_logit_diff']:.3g}")
                except Exception as e:  # noqa: BLE001 - record and go on
                    wm["errors"][f"{key}_cg"] = _err(e)
                    traceback.print_exc()
        except Exception as e:  # noqa: BLE001 - record and go on
            wm["errors"][key] = _err(e)
            traceback.print_exc()
        gc.collect()
        save()
    a = torch.randn(tokens, shape["d"], dtype=dtype, device=device)
    w = torch.randn(shape["d"], shape["ffn"], dtype=dtype, device=device)
    fns["peak_mm"] = lambda: torch.mm(a, w)
    done = sync(device)
    timed = {k: (lambda f=f: (f(), done())) for k, f in fns.items()}
    warmup, reps = args.warmup or (1 if args.quick else 2), args.reps or (3 if args.quick else 9)
    t = time.perf_counter()
    med = median_seconds(timed, warmup=warmup, reps=reps)
    wm["timing"] = {"warmup": warmup, "reps": reps, "seconds": round(time.perf_counter() - t, 2)}
    peak = 2.0 * tokens * shape["d"] * shape["ffn"] / med.pop("peak_mm")
    wm["peak_tflops"] = peak / 1e12
    dense_fpt = c.get("routefx_dense", {}).get("flops_per_token_x")
    for k, v in c.items():
        v["latency_ms"] = med[k] * 1e3
        for base in ("hf_inductor", "hf_inductor_cg", "routefx_dense", "routefx_dense_cg", "routefx_dense_flex",
                     "routefx_dense_causal"):
            if base in med:
                v[f"speedup_vs_{base}"] = med[base] / med[k]
        fpt = v.get("flops_per_token_x", dense_fpt)
        if fpt:
            v["tflops"] = fpt * tokens / med[k] / 1e12
            v["mfu"] = v["tflops"] * 1e12 / peak
        mode = next((m for m in ("_cg", "_flex", "_causal", "_static") if k.endswith(m)), "")
        dense = f"routefx_dense{mode}" if f"routefx_dense{mode}" in med else "routefx_dense"  # within one mode
        if dense_fpt and "flops_per_token_x" in v and dense in med:
            v["ideal"] = dense_fpt / v["flops_per_token_x"]
            v["efficiency"] = v[f"speedup_vs_{dense}"] / v["ideal"]
    wm["targets"] = assess(c)
    if device.type == "cuda":
        from routefx.backends.triton import ffn
        wm["kernel_configs"] = ffn.kernel_configs()  # what the autotuner picked for the routed FFNs
    del model, fns, timed
    gc.collect()


def assess(c: dict) -> dict:
    out = {}
    d = c.get("routefx_dense", {}).get("speedup_vs_hf_inductor")
    if d is not None:
        out["dense_vs_inductor"] = {"target": f">= {TARGETS['dense_vs_inductor']}x", "value": round(d, 3),
                                    "met": d >= TARGETS["dense_vs_inductor"]}
    h = c.get("routefx_duo_0.5", {}).get("speedup_vs_hf_inductor")
    if h is not None:
        out["duo_0.5_vs_inductor"] = {"target": f">= {TARGETS['duo_0.5_vs_inductor']}x", "value": round(h, 3),
                                      "met": h >= TARGETS["duo_0.5_vs_inductor"]}
    # the same with CUDA graphs: routefx's cudagraphs option against torch.compile's defaults, and like for like
    # against torch.compile(mode="reduce-overhead")
    for key, base, target in (("routefx_dense_cg", "hf_inductor", "dense_vs_inductor"),
                              ("routefx_dense_cg", "hf_inductor_cg", "dense_vs_inductor"),
                              ("routefx_duo_0.5_cg", "hf_inductor", "duo_0.5_vs_inductor"),
                              ("routefx_duo_0.5_cg", "hf_inductor_cg", "duo_0.5_vs_inductor")):
        v = c.get(key, {}).get(f"speedup_vs_{base}")
        if v is not None:
            out[f"{key.removeprefix('routefx_')}_vs_{base.removeprefix('hf_')}"] = {
                "target": f">= {TARGETS[target]}x", "value": round(v, 3), "met": v >= TARGETS[target]}
    return out


# ---- the FFN table and decode steps (bench/gpu_ffn.py, another file) ----------------------------------------------

def ffn_part(args, res: dict, seconds_left: float) -> None:
    path = os.path.join(HERE, "gpu_ffn.py")
    if not os.path.exists(path):
        log("bench/gpu_ffn.py is absent: the FFN table and decode steps are skipped")
        res["ffn"] = {"skipped": "bench/gpu_ffn.py is absent"}
        return
    quick = args.quick or args.smoke_cpu or seconds_left < 180
    if seconds_left < 45 and not args.smoke_cpu:
        log(f"only {seconds_left:.0f} s left: bench/gpu_ffn.py skipped")
        res["ffn"] = {"skipped": f"time budget spent ({seconds_left:.0f} s left)"}
        return
    spec = importlib.util.spec_from_file_location("routefx_bench_gpu_ffn", path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    kw = {"out_dir": None, "quick": quick}
    if args.smoke_cpu and "smoke_cpu" in inspect.signature(mod.run).parameters:
        kw["smoke_cpu"] = True
    log(f"bench/gpu_ffn.py run({kw}) with {seconds_left:.0f} s left")
    t = time.perf_counter()
    res["ffn_run"] = kw
    res["ffn"] = mod.run(**kw)
    res["ffn_seconds"] = round(time.perf_counter() - t, 1)


# ---- main ---------------------------------------------------------------------------------------------------------

def main(args) -> dict:
    if args.report:
        with open(args.report) as f:
            print(report(json.load(f)))
        return {}
    t0 = time.perf_counter()
    if args.smoke_cpu:
        device, dtype, shape, mode = torch.device("cpu"), torch.float32, SMOKE, "smoke-cpu (TRITON_INTERPRET=1, fp32)"
    else:
        if not torch.cuda.is_available():
            sys.exit("bench/gpu.py needs a CUDA GPU (or --smoke-cpu)")
        device, dtype, shape, mode = torch.device("cuda"), torch.bfloat16, FULL, "cuda bf16"
    res = {"mode": mode + (" quick" if args.quick else ""), "command": " ".join(["bench/gpu.py"] + sys.argv[1:]),
           "machine": machine(device), "errors": {}}
    log(f"{mode} on {res['machine']['device']}, versions {res['machine']['versions']}")

    write = json_saver(args.out, "gpu.json", res)

    def save():
        res["total_seconds"] = round(time.perf_counter() - t0, 1)
        write()
        if args.out:
            with open(os.path.join(args.out, "gpu.md"), "w") as f:
                f.write(report(res))

    try:
        whole_model(args, shape, device, dtype, res, save,
                    deadline=t0 + args.time_budget - (10 if args.no_ffn else 100))
    except Exception as e:  # noqa: BLE001
        res["errors"]["whole_model"] = _err(e)
        traceback.print_exc()
    save()
    log(f"whole model done at {time.perf_counter() - t0:.0f} s")
    if not args.no_ffn:
        try:
            ffn_part(args, res, seconds_left=args.time_budget - (time.perf_counter() - t0))
        except Exception as e:  # noqa: BLE001
            res["errors"]["ffn"] = _err(e)
            traceback.print_exc()
    save()
    print(report(res), flush=True)
    log(f"total {time.perf_counter() - t0:.0f} s")
    return res


if __name__ == "__main__":
    main(ARGS)
