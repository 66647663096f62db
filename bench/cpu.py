"""CPU benchmark: routefx ONNX (dense and Duo) against torch eager and torch.compile (inductor), in one process.

Model: a Llama-shaped transformers `LlamaForCausalLM` built from a config (8 layers, hidden 1024, FFN 2816,
16 query / 4 key-value heads, vocab 32000), random weights (torch.manual_seed(0)), fp32. Input: batch 1 x 512
random token ids, attention mask all ones.

For every candidate it reports (principle 5 of DESIGN.md, honest compute accounting):
  latency        median of interleaved runs (routefx.timing.median_seconds, all candidates in one dict)
  speedup        t(routefx ONNX dense) / t(candidate), measured in the same rounds
  FLOP-ideal     dense FLOPs per token / the candidate's FLOPs per token with the routes realised on the measured
                 input (CompiledModel.flops_per_token([x])); 1.0 for torch eager and inductor
  efficiency     speedup / FLOP-ideal
  budget         realised FFN compute fraction on the measured input (route_stats([x])) and on calibration data
  MFU            FLOPs per token x tokens / latency / peak, peak = an ONNX Runtime MatMul of the FFN's shape
                 ([512, 1024] x [1024, 2816] fp32, weight as an initializer like routefx's) run with the routefx
                 ONNX backend's session options, timed in the same interleaved rounds (torch.mm for reference)
  compile time   routefx.compile wall time, split into capture, calibration, compile (passes, FLOP counting) and
                 the ONNX backend's prepare (export, fold, optimize, session); "without calibration" = wall -
                 report.calibration_seconds

Duo calibration: 2 batches of [2, 256] random tokens by default (--cal-batches/--cal-batch/--cal-seq); each
per-token Duo compile already spends ~20 s calibrating on them. The serialized ONNX bytes (runner.onnx_model, used
only by runner.save) are dropped after compiling so that all eleven sessions fit in memory at once.

Writes bench/results/cpu.json (every number) and bench/RESULTS.md (tables; regenerated from the JSON).

    .venv/bin/python bench/cpu.py                 # the real run (all candidates, 2 warm-up + 9 timed rounds;
                                                  # ~15 min on 2 cores, ~10 of them routefx.compile, ~18 GiB RSS)
    .venv/bin/python bench/cpu.py --quick         # smoke run: budget 0.5 only, 1 + 3 rounds, results to /tmp
    .venv/bin/python bench/cpu.py --profile-only duo_local_0.25,duo_random_0.25
        # ONNX Runtime profiles (routefx.backends.onnx.prepare(profile=True)) of ONNX dense and the named
        # candidates: time per op type and per FFN route, merged into cpu.json as "profiles"; RESULTS.md redone
"""
from __future__ import annotations

import argparse
import collections
import gc
import json
import os
import platform
import re
import statistics
import subprocess
import sys
import time
import traceback
import warnings

os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
os.environ.setdefault("TQDM_DISABLE", "1")
# a fresh inductor cache, so torch.compile's first call is a cold compile like routefx's
os.environ.setdefault("TORCHINDUCTOR_CACHE_DIR", __import__("tempfile").mkdtemp(prefix="routefx_bench_inductor_"))

import numpy as np  # noqa: E402
import onnx  # noqa: E402
import onnxruntime as ort  # noqa: E402
import torch  # noqa: E402
import transformers  # noqa: E402
from onnx import TensorProto, helper, numpy_helper  # noqa: E402

import routefx  # noqa: E402
from routefx.backends import onnx as onnx_backend  # noqa: E402
from routefx.timing import median_seconds  # noqa: E402

HERE = os.path.dirname(os.path.abspath(__file__))
LAYERS, D, FFN, HEADS, KV_HEADS, VOCAB = 8, 1024, 2816, 16, 4, 32000
BATCH, SEQ = 1, 512
DENSE = "onnx_dense"
TARGETS = {"dense_vs_eager": 1.0, "dense_vs_inductor": 0.9, "duo_efficiency": 0.9, "duo_efficiency_aim": 0.95,
           "dense_mfu": 0.8, "compile_seconds_no_calibration": 30.0}


# ---- set-up --------------------------------------------------------------------------------------------------

def build_model() -> torch.nn.Module:
    cfg = transformers.LlamaConfig(vocab_size=VOCAB, hidden_size=D, intermediate_size=FFN, num_hidden_layers=LAYERS,
                                   num_attention_heads=HEADS, num_key_value_heads=KV_HEADS,
                                   max_position_embeddings=2048, bos_token_id=1, eos_token_id=2)
    torch.manual_seed(0)
    return transformers.LlamaForCausalLM(cfg).to(torch.float32).eval()


def batch(gen: torch.Generator, b: int, s: int) -> dict:
    return {"input_ids": torch.randint(3, VOCAB, (b, s), generator=gen),
            "attention_mask": torch.ones(b, s, dtype=torch.long)}


def rss_gib() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**30


def loadavg() -> list[float]:
    with open("/proc/loadavg") as f:
        return [float(v) for v in f.read().split()[:3]]


def machine() -> dict:
    cpu = ""
    flags = set()
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name") and not cpu:
                    cpu = line.split(":", 1)[1].strip()
                if line.startswith("flags") and not flags:
                    flags = set(line.split(":", 1)[1].split())
    except OSError:
        pass
    mem = None
    try:
        with open("/proc/meminfo") as f:
            mem = round(int(next(l for l in f if l.startswith("MemTotal")).split()[1]) / 2**20, 1)
    except (OSError, StopIteration):
        pass
    import onnxscript
    return {"cpu": cpu, "cpu_count": os.cpu_count(), "affinity": len(os.sched_getaffinity(0)),
            "simd": sorted(f for f in flags if f in {"avx", "avx2", "fma", "avx512f", "avx512_bf16", "amx_tile"}),
            "mem_total_gib": mem, "torch_threads": torch.get_num_threads(),
            "ort_intra_op_threads": onnx_backend.session_options().intra_op_num_threads,
            "python": platform.python_version(), "platform": platform.platform(),
            "versions": {"torch": torch.__version__, "onnxruntime": ort.__version__, "onnx": onnx.__version__,
                         "onnxscript": onnxscript.__version__, "transformers": transformers.__version__,
                         "numpy": np.__version__, "routefx": getattr(routefx, "__version__", "dev")},
            "gcc": _first_line_of(["gcc", "--version"])}


def _first_line_of(cmd) -> str | None:
    try:
        return subprocess.run(cmd, capture_output=True, text=True, timeout=10).stdout.splitlines()[0]
    except Exception:  # noqa: BLE001 - informational only
        return None


def _err(e: BaseException) -> str:
    text = str(e).strip().splitlines()
    return f"{type(e).__name__}: {text[0] if text else ''}"[:500]


# ---- peak GEMM -----------------------------------------------------------------------------------------------

def peak_fns(repeat: int) -> tuple[dict, dict]:
    """ONNX Runtime MatMul [SEQ, D] x [D, FFN] (weight an initializer, like routefx's weights, so it is
    pre-packed the same way) with the routefx ONNX backend's session options; torch.mm of the same shape."""
    rng = np.random.default_rng(0)
    a = rng.standard_normal((SEQ, D), dtype=np.float32)
    b = (rng.standard_normal((D, FFN), dtype=np.float32) / np.sqrt(D)).astype(np.float32)
    graph = helper.make_graph([helper.make_node("MatMul", ["a", "w"], ["y"])], "peak_matmul",
                              [helper.make_tensor_value_info("a", TensorProto.FLOAT, [SEQ, D])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [SEQ, FFN])],
                              initializer=[numpy_helper.from_array(b, "w")])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)])
    so = onnx_backend.session_options()  # exactly what the routefx ONNX backend uses for a dense graph
    sess = ort.InferenceSession(model.SerializeToString(), sess_options=so, providers=["CPUExecutionProvider"])
    feeds = {"a": a}
    ref = a @ b
    got = sess.run(None, feeds)[0]
    assert np.abs(got - ref).max() < 1e-3, "peak MatMul gives wrong numbers"
    ta, tb = torch.from_numpy(a), torch.from_numpy(b)

    def onnx_mm():
        for _ in range(repeat):
            sess.run(None, feeds)

    def torch_mm():
        for _ in range(repeat):
            torch.mm(ta, tb)

    info = {"shape": [SEQ, D, FFN], "flops": 2.0 * SEQ * D * FFN, "repeat_per_call": repeat,
            "session_options": {"intra_op_num_threads": so.intra_op_num_threads,
                                "inter_op_num_threads": so.inter_op_num_threads,
                                "execution_mode": str(so.execution_mode),
                                "graph_optimization_level": str(so.graph_optimization_level),
                                "enable_mem_pattern": so.enable_mem_pattern}}
    return {"peak_onnx_matmul": onnx_mm, "peak_torch_mm": torch_mm}, info


# ---- candidates ----------------------------------------------------------------------------------------------

def compile_routefx(model, policy, x, cal) -> tuple[object, dict]:
    """routefx.compile with the ONNX backend; returns the compiled model and its compile-time record."""
    gc.collect()
    t = time.perf_counter()
    if policy.needs_calibration:
        cm = routefx.compile(model, policy, calibration=cal, backend="onnx")
    else:
        cm = routefx.compile(model, policy, example_inputs=(), example_kwargs=x, backend="onnx")
    wall = time.perf_counter() - t
    rep = cm.report
    prep = dict(cm.runner.timings)
    accounted = rep.capture_seconds + rep.calibration_seconds + rep.compile_seconds + sum(prep.values())
    rec = {"wall_s": round(wall, 3), "capture_s": rep.capture_seconds, "calibration_s": rep.calibration_seconds,
           "compile_s": rep.compile_seconds, "onnx_prepare_s": prep,
           # report.calibration_seconds also holds recognition and FLOP counting (it is timed from the end of
           # capture), so a policy without calibration counts its whole wall time
           "without_calibration_s": round(wall - (rep.calibration_seconds if policy.needs_calibration else 0.0), 3),
           "unaccounted_s": round(wall - accounted, 3),
           "passes_s": {p.name: round(p.seconds, 3) for p in rep.passes},
           "onnx_model_mib": round(len(cm.runner.onnx_model) / 2**20, 1) if cm.runner.onnx_model else None}
    # The serialized model is only needed by runner.save(); dropping it keeps eleven sessions in 24 GiB.
    cm.runner.onnx_model = None
    gc.collect()
    rec["rss_after_gib"] = round(rss_gib(), 2)
    return cm, rec


def evaluate_routes(cm, x) -> dict:
    """FLOPs per token with the routes realised on x, and the realised budget on x and on the calibration data."""
    t = time.perf_counter()
    fpt = cm.flops_per_token([x])
    t1 = time.perf_counter()
    st = cm.route_stats([x])
    t2 = time.perf_counter()
    plan_budget = cm.report.plan.get("calibration", {}).get("budget", {})
    realised = cm.report.flops_per_token.get("realised") or {}
    return {"flops_per_token_x": fpt, "budget_x": st.budget,
            "mix_x": [{"key": l["key"], "skip_small_big": [round(v, 4) for v in l["mix"]]} for l in st.layers],
            "budget_calibration": plan_budget.get("realised"), "lambda": plan_budget.get("lambda"),
            "flops_per_token_calibration": realised.get("calibration"),
            "static_fraction_calibration": cm.report.plan.get("calibration", {}).get("static_fraction"),
            "flops_per_token_x_seconds": round(t1 - t, 3), "route_stats_x_seconds": round(t2 - t1, 3)}


def max_logit_diff(a, b) -> float:
    return (a.logits - b.logits).abs().max().item()


def spec(args) -> list[tuple[str, str, object]]:
    """(key, label, policy) of the routefx candidates, ONNX dense first."""
    out = [(DENSE, "routefx ONNX dense", routefx.policies.Dense())]
    for router in args.routers:
        for b in args.budgets:
            out.append((f"duo_{router}_{b:g}", f"routefx ONNX Duo {router} b={b:g}",
                        routefx.policies.Duo(budget=b, router=router)))
    return out


# ---- ONNX profile --------------------------------------------------------------------------------------------

_OVERHEAD = {"NonZero", "ScatterND", "Gather", "GatherND", "Equal", "ConstantOfShape", "Div", "Unsqueeze",
             "ArgMax", "Shape", "Reshape", "Expand", "Cast"}


def profile_candidate(cm, x, runs: int) -> dict:
    """Run the candidate's graph under ONNX Runtime's profiler; time per op type and per FFN route, and the
    GEMM rate of the FFN MatMuls (FLOPs from the routes realised on x) and of the other MatMuls."""
    kwargs = {**x, "use_cache": False}
    st = cm.route_stats([x])
    tokens = int(x["attention_mask"].sum())
    per_row = {"skip": 0.0, "small": 2.0 * 3 * D * round(0.25 * FFN), "big": 2.0 * 3 * D * FFN}
    ffn_flops = sum(tokens * sum(f * per_row[n] for n, f in zip(l["names"], l["mix"])) for l in st.layers) \
        if len(st.layers[0]["names"]) == 3 else LAYERS * tokens * per_row["big"]
    other_flops = cm.flops_per_token([x]) * tokens - ffn_flops
    runner = onnx_backend.prepare(cm.graph_module, kwargs, profile=True)
    runner.onnx_model = None
    for _ in range(2):
        runner(**x)  # warm-up (also profiled; excluded below by run index)
    for _ in range(runs):
        runner(**x)
    path = runner.end_profiling()
    with open(path) as f:
        events = json.load(f)
    run_ends = sorted(e["ts"] + e["dur"] for e in events if e.get("cat") == "Session" and e.get("name") == "model_run")
    run_durs = [e["dur"] for e in events if e.get("cat") == "Session" and e.get("name") == "model_run"]
    start = run_ends[1] if len(run_ends) > 2 else 0  # skip the two warm-up runs
    nodes = [e for e in events if e.get("cat") == "Node" and e.get("name", "").endswith("_kernel_time")
             and e["ts"] >= start]
    n_runs = max(1, len([d for d, end in zip(run_durs, run_ends) if end > start]))
    by_op = collections.Counter()
    by_class = collections.Counter()
    by_route = collections.Counter()
    for e in nodes:
        op = e.get("args", {}).get("op_name", "?")
        name = e["name"][: -len("_kernel_time")]
        us = e["dur"] / n_runs
        by_op[op] += us
        m = re.search(r"routed_ffn\w*/(route\d+|dense)/(up|gate|down)", name)
        if m:
            by_route[m.group(1)] += us
            by_class["FFN MatMul (routed_ffn up/gate/down)"] += us
        elif op in ("MatMul", "Gemm", "FusedMatMul", "MatMulNBits"):
            by_class["other MatMul/Gemm (attention proj., scores, LM head, routers)"] += us
        elif op in _OVERHEAD:
            by_class["index/shape ops (NonZero, Gather, ScatterND, Equal, ArgMax, Reshape, ...)"] += us
        else:
            by_class["element-wise, norms, softmax, attention kernels, other"] += us
    total = sum(by_op.values())
    ms = lambda v: round(v / 1e3, 2)  # noqa: E731
    ffn_us = by_class["FFN MatMul (routed_ffn up/gate/down)"]
    other_us = by_class["other MatMul/Gemm (attention proj., scores, LM head, routers)"]
    return {"runs": n_runs, "model_run_ms_median": round(statistics.median(run_durs[-runs:]) / 1e3, 2),
            "budget_x": st.budget, "loadavg_after": loadavg(),
            "ffn_matmul_gflops": round(ffn_flops / ffn_us / 1e3, 1) if ffn_us else None,
            "other_matmul_gflops": round(other_flops / other_us / 1e3, 1) if other_us else None,
            "non_matmul_ms": ms(total - ffn_us - other_us),
            "kernel_ms_per_run": ms(total),
            "by_class_ms": {k: ms(v) for k, v in by_class.most_common()},
            "by_op_ms": {k: ms(v) for k, v in by_op.most_common(14)},
            "ffn_matmul_by_route_ms": {k: ms(v) for k, v in sorted(by_route.items())}}


def profile_notes(res: dict) -> tuple[list[str], list[dict]]:
    """What the profiles say, computed: GEMM rates, index-op overhead, FLOP-free time and, from the dense
    profile, each Duo candidate's efficiency ceiling if its FFN GEMMs shrank exactly with FLOPs and every other
    kernel kept its dense time (Amdahl: FLOPs do not count norms, softmax, masking, element-wise ops)."""
    prof, c = res.get("profiles") or {}, res["candidates"]
    d = prof.get(DENSE)
    if not d:
        return [], []
    cls_ffn, cls_mm = "FFN MatMul (routed_ffn up/gate/down)", "other MatMul/Gemm (attention proj., scores, LM head, routers)"
    cls_idx = "index/shape ops (NonZero, Gather, ScatterND, Equal, ArgMax, Reshape, ...)"
    ffn_d, mm_d = d["by_class_ms"].get(cls_ffn, 0.0), d["by_class_ms"].get(cls_mm, 0.0)
    total_d = d["kernel_ms_per_run"]
    fixed_d = total_d - ffn_d - mm_d
    mask_d = d["by_op_ms"].get("Where", 0.0) + d["by_op_ms"].get("IsNaN", 0.0)
    ffn_dense_fpt = LAYERS * 2.0 * 3 * D * FFN
    dense_fpt = c[DENSE]["flops_per_token_x"]
    rows = []
    for k, v in c.items():
        if not k.startswith("duo_") or v.get("efficiency") is None:
            continue
        r = (v["flops_per_token_x"] - (dense_fpt - ffn_dense_fpt)) / ffn_dense_fpt  # FFN FLOP fraction on x
        pred = fixed_d + mm_d + ffn_d * r
        ceiling = total_d / pred / v["ideal"]
        rows.append({"candidate": k, "ffn_flop_fraction_x": round(r, 3), "ceiling": round(ceiling, 3),
                     "measured": round(v["efficiency"], 3)})
    notes = [f"ONNX dense, per run: FFN MatMuls {ffn_d:.0f} ms ({ffn_d / total_d:.0%}), other MatMuls {mm_d:.0f} ms "
             f"({mm_d / total_d:.0%}), everything else {fixed_d:.0f} ms ({fixed_d / total_d:.0%}) — kernels "
             "that the FLOP count does not see and that Duo does not shrink; of these, Where + IsNaN alone take "
             f"{mask_d:.0f} ms ({mask_d / total_d:.0%}): the exported attention (torchlib's scaled_dot_product_attention "
             "with a boolean mask) replaces NaN rows of the softmax by 0 over every [heads, S, S] probability tensor."]
    for k, pr in prof.items():
        if k == DENSE:
            continue
        idx = pr["by_class_ms"].get(cls_idx, 0.0) - d["by_class_ms"].get(cls_idx, 0.0)
        notes.append(f"{k}: FFN MatMuls run at {fmt(pr.get('ffn_matmul_gflops'), '.0f')} GFLOP/s (dense "
                     f"{fmt(d.get('ffn_matmul_gflops'), '.0f')}): the per-route GEMMs on gathered rows are not "
                     f"slower per FLOP; the routing ops (NonZero, Gather, ScatterND, Equal, ArgMax, "
                     f"ConstantOfShape, ...) add {idx:.1f} ms per run over dense "
                     f"({idx / pr['kernel_ms_per_run']:.1%} of its kernel time).")
    if rows:
        notes.append("Efficiency ceiling from the dense profile (FFN GEMM time scaled by the FFN FLOPs realised on "
                     "x, all other kernels at their dense time) vs measured: " + "; ".join(
                         f"{r['candidate'].removeprefix('duo_')} {r['ceiling']:.2f} / {r['measured']:.2f}"
                         for r in rows) + ". So the FLOP-ideal overstates what any implementation that keeps those kernels can reach; "
                     + ("the ceiling alone is below 0.9 for " + ", ".join(r["candidate"].removeprefix("duo_") for r in
                                                                       rows if r["ceiling"] < 0.9) + ". "
                        if any(r["ceiling"] < 0.9 for r in rows) else "") + "What remains below the "
                     "ceiling (a few hundredths) is not attributed by these profiles: the routing ops above are "
                     "~1%; not measured separately are ONNX Runtime's per-run allocation (routed graphs run "
                     "without memory patterns) and run-to-run noise, a few percent on this machine.")
    return notes, rows


# ---- report --------------------------------------------------------------------------------------------------

def fmt(v, spec_=".2f", none="–"):
    return none if v is None else format(v, spec_)


def assess(res: dict) -> dict:
    c = res["candidates"]
    d = c.get(DENSE, {})
    out = {}
    if d.get("latency_s") and c.get("eager", {}).get("latency_s"):
        v = c["eager"]["latency_s"] / d["latency_s"]
        out["onnx_dense_vs_eager"] = {"target": f">= {TARGETS['dense_vs_eager']}x", "value": round(v, 3),
                                      "met": v >= TARGETS["dense_vs_eager"]}
    ind = c.get("inductor", {})
    if ind.get("latency_s") and d.get("latency_s"):
        v = ind["latency_s"] / d["latency_s"]
        out["onnx_dense_vs_inductor"] = {"target": f">= {TARGETS['dense_vs_inductor']}x", "value": round(v, 3),
                                         "met": v >= TARGETS["dense_vs_inductor"]}
    elif "inductor" in c:
        out["onnx_dense_vs_inductor"] = {"target": f">= {TARGETS['dense_vs_inductor']}x", "value": None,
                                         "met": None, "note": ind.get("error")}
    effs = {k: v["efficiency"] for k, v in c.items()
            if k.startswith("duo_") and not k.startswith("duo_static") and v.get("efficiency") is not None}
    if effs:
        worst = min(effs, key=effs.get)
        out["duo_per_token_efficiency"] = {
            "target": f">= {TARGETS['duo_efficiency']} at every budget (aim {TARGETS['duo_efficiency_aim']})",
            "value": round(effs[worst], 3), "worst": worst,
            "met": all(v >= TARGETS["duo_efficiency"] for v in effs.values()),
            "aim_met": all(v >= TARGETS["duo_efficiency_aim"] for v in effs.values()),
            "below_target": sorted(k for k, v in effs.items() if v < TARGETS["duo_efficiency"])}
    if d.get("mfu") is not None:
        out["onnx_dense_mfu"] = {"target": f">= {TARGETS['dense_mfu']}", "value": round(d["mfu"], 3),
                                 "met": d["mfu"] >= TARGETS["dense_mfu"]}
    comp = {k: v["compile"]["without_calibration_s"] for k, v in c.items() if v.get("compile")}
    if comp:
        worst = max(comp, key=comp.get)
        out["compile_without_calibration"] = {
            "target": f"< {TARGETS['compile_seconds_no_calibration']:g} s", "value": comp[worst], "worst": worst,
            "dense": comp.get(DENSE), "met": all(v < TARGETS["compile_seconds_no_calibration"] for v in comp.values())}
    return out


def print_summary(res: dict) -> None:
    c = res["candidates"]
    print(f"\n== batch {BATCH} x {SEQ} tokens, fp32, {res['machine']['torch_threads']} threads; median of "
          f"{res['settings']['reps']} interleaved rounds; peak ONNX MatMul {res['peak']['onnx_gflops']:.1f} GFLOP/s "
          f"(torch.mm {res['peak']['torch_gflops']:.1f})")
    print(f"{'candidate':34s} {'ms':>8s} {'speedup':>8s} {'ideal':>6s} {'eff':>5s} {'bud(x)':>6s} {'bud(cal)':>8s} "
          f"{'MFU':>5s} {'compile':>8s} {'calib':>6s}")
    for k, v in c.items():
        if v.get("latency_s") is None:
            print(f"{v['label']:34s} {'error: ' + str(v.get('error'))[:90]}")
            continue
        comp = v.get("compile") or {}
        print(f"{v['label']:34s} {v['latency_s'] * 1e3:8.1f} {v['speedup']:7.3f}x {v['ideal']:6.3f} "
              f"{v['efficiency']:5.3f} {fmt(v.get('budget_x'), '6.3f'):>6s} "
              f"{fmt(v.get('budget_calibration'), '8.3f'):>8s} {v['mfu']:5.3f} "
              f"{fmt(comp.get('without_calibration_s'), '7.1f'):>7s}s {fmt(comp.get('calibration_s'), '5.1f'):>5s}s")
    print("\n== targets")
    for k, a in res["targets"].items():
        met = {True: "MET", False: "NOT MET", None: "n/a"}[a["met"]]
        extra = {kk: vv for kk, vv in a.items() if kk not in ("target", "value", "met")}
        print(f"  {k:32s} target {a['target']:38s} measured {a['value']}  {met}  {extra if extra else ''}")


def write_markdown(res: dict, path: str) -> None:
    c, m, s = res["candidates"], res["machine"], res["settings"]
    L = ["# CPU benchmark results", "",
         f"Command: `{res['command']}` (from the repository root)  ",
         f"Date: {res['date']}  ",
         f"Machine: {m['cpu']}, {m['cpu_count']} cores ({', '.join(m['simd'])}), {m['mem_total_gib']} GiB; "
         f"torch {m['versions']['torch']} ({m['torch_threads']} threads), onnxruntime {m['versions']['onnxruntime']} "
         f"({m['ort_intra_op_threads']} intra-op threads), transformers {m['versions']['transformers']}, "
         f"Python {m['python']}  ",
         f"Total run time: {res['total_seconds'] / 60:.1f} min; while timing, load average "
         f"{res.get('timing_conditions', {}).get('loadavg_before')} -> "
         f"{res.get('timing_conditions', {}).get('loadavg_after')}, CPU share of this process "
         f"{res.get('timing_conditions', {}).get('cpu_share')} (1.0 = both cores were this process's)", "",
         f"Model: Llama-shaped `LlamaForCausalLM` from a config ({LAYERS} layers, hidden {D}, FFN {FFN}, "
         f"{HEADS}/{KV_HEADS} heads, vocab {VOCAB}), random weights (seed 0), fp32. Measured input: batch {BATCH} x "
         f"{SEQ} random tokens, mask all ones. Duo calibration: {s['cal_batches']} batches of "
         f"[{s['cal_batch']}, {s['cal_seq']}] random tokens (seeded). Latency: median of {s['reps']} interleaved rounds "
         f"after {s['warmup']} warm-up rounds, every candidate (and the peak MatMuls) in the same rounds, one process.",
         "",
         "Speedup is against routefx ONNX dense, measured in the same rounds. FLOP-ideal = dense FLOPs per token / "
         "the candidate's FLOPs per token with the routes it realised on the measured input (1.0 for eager and "
         "inductor). Efficiency = speedup / FLOP-ideal. Budget = realised FFN compute fraction (skip 0, small 0.25, "
         f"big 1). MFU = FLOPs/token x {SEQ} / latency / peak, peak = ONNX Runtime MatMul "
         f"[{SEQ},{D}]x[{D},{FFN}] fp32 with the routefx backend's session options in the same rounds: "
         f"**{res['peak']['onnx_gflops']:.1f} GFLOP/s** (torch.mm: {res['peak']['torch_gflops']:.1f} GFLOP/s). "
         "Compile = routefx.compile wall time minus calibration (capture + passes/FLOP counting + ONNX export, "
         "fold, optimize, session); for inductor, the first call (with an empty inductor cache).", "",
         "| candidate | latency ms | speedup vs ONNX dense | FLOP-ideal | efficiency | MFLOP/token (x) | budget (x) | "
         "budget (cal) | MFU | compile s | calibration s |",
         "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for k, v in c.items():
        comp = v.get("compile") or {}
        if v.get("latency_s") is None:
            L.append(f"| {v['label']} | error: {v.get('error')} | | | | | | | | "
                     f"{fmt(comp.get('without_calibration_s'), '.1f')} | |")
            continue
        L.append(f"| {v['label']} | {v['latency_s'] * 1e3:.1f} | {v['speedup']:.3f} | {v['ideal']:.3f} | "
                 f"{v['efficiency']:.3f} | {v['flops_per_token_x'] / 1e6:.1f} | {fmt(v.get('budget_x'), '.3f')} | "
                 f"{fmt(v.get('budget_calibration'), '.3f')} | {v['mfu']:.3f} | "
                 f"{fmt(comp.get('without_calibration_s'), '.1f')} | {fmt(comp.get('calibration_s'), '.1f')} |")
    L += ["", "## Targets", "", "| target | required | measured | met |", "|---|---|---|---|"]
    names = {"onnx_dense_vs_eager": "routefx ONNX dense vs torch eager (t_eager / t_onnx)",
             "onnx_dense_vs_inductor": "routefx ONNX dense vs inductor (t_inductor / t_onnx)",
             "duo_per_token_efficiency": "Duo efficiency, per-token routers (random, local), worst budget",
             "onnx_dense_mfu": "routefx ONNX dense MFU",
             "compile_without_calibration": "compile time without calibration, worst candidate"}
    for k, a in res["targets"].items():
        met = {True: "yes", False: "**no**", None: "n/a"}[a["met"]]
        val = a["value"]
        if k == "duo_per_token_efficiency":
            val = f"{a['value']} ({a['worst']}); below 0.9: {', '.join(a['below_target']) or 'none'}; " \
                  f"aim 0.95 met: {'yes' if a['aim_met'] else 'no'}"
        elif k == "compile_without_calibration":
            val = f"{a['value']} s ({a['worst']}); ONNX dense {a['dense']} s"
        elif a.get("note"):
            val = f"n/a: {a['note']}"
        L.append(f"| {names.get(k, k)} | {a['target']} | {val} | {met} |")
    L += ["", "## Compile time (seconds)", "",
          "`report.compile_seconds` covers recognition, FLOP counting, the pass pipeline and, for per-token Duo, "
          "the FLOPs realised on the calibration data (a run of the graph over it) and, for static Duo, the route "
          "statistics on it; it does not cover the ONNX backend's prepare (export, fold, optimize, session), which "
          "`runner.timings` gives. `calibration_seconds` covers statistics, router training and the λ search, and also "
          "recognition and FLOP counting of the captured graph (it is timed from the end of capture; ONNX dense, "
          "which calibrates nothing, shows that part): 'without calibration' is the wall time minus "
          "`calibration_seconds` for Duo (so it leaves out those ~1-2 s of recognition) and the whole wall time for "
          "dense.", "",
          "| candidate | wall | capture | calibration | compile_seconds | export | fold | optimize | session | "
          "without calibration | ONNX MiB | RSS after GiB |", "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for k, v in c.items():
        comp = v.get("compile")
        if not comp:
            continue
        p = comp.get("onnx_prepare_s", {})
        L.append(f"| {v['label']} | {comp['wall_s']:.1f} | {fmt(comp.get('capture_s'), '.1f')} | "
                 f"{fmt(comp.get('calibration_s'), '.1f')} | {fmt(comp.get('compile_s'), '.1f')} | "
                 f"{fmt(p.get('export'), '.1f')} | {fmt(p.get('fold'), '.1f')} | {fmt(p.get('optimize'), '.1f')} | "
                 f"{fmt(p.get('session'), '.1f')} | {comp['without_calibration_s']:.1f} | "
                 f"{fmt(comp.get('onnx_model_mib'), '.0f')} | {fmt(comp.get('rss_after_gib'), '.1f')} |")
    checks = res.get("checks", {})
    if checks:
        L += ["", "Numerical checks (max |logits − eager logits| on the measured input): "
              + ", ".join(f"{k} {v:.2e}" if isinstance(v, float) else f"{k} {v}" for k, v in checks.items()) + "."]
    if res.get("profiles"):
        L += ["", "## Where the time goes (ONNX Runtime profile)", "",
              f"Separate invocation: `{res.get('profile_command', '')}` ({res.get('profile_date', '')}); "
              "per-run kernel time in ms, summed per class of node (the profiler adds some overhead, so these are "
              "shares, not latencies).", ""]
        keys = list(res["profiles"])
        classes = []
        for p in res["profiles"].values():
            classes += [k for k in p.get("by_class_ms", {}) if k not in classes]
        L.append("| class | " + " | ".join(keys) + " |")
        L.append("|---|" + "---:|" * len(keys))
        for cl in classes:
            L.append(f"| {cl} | " + " | ".join(fmt(res["profiles"][k]["by_class_ms"].get(cl), ".1f")
                                               for k in keys) + " |")
        L.append("| **kernel total** | " + " | ".join(f"{res['profiles'][k]['kernel_ms_per_run']:.1f}"
                                                      for k in keys) + " |")
        L.append("| non-MatMul kernels | " + " | ".join(fmt(res["profiles"][k].get("non_matmul_ms"), ".1f")
                                                      for k in keys) + " |")
        L.append("| FFN MatMul GFLOP/s (routes realised on x) | " + " | ".join(
            fmt(res["profiles"][k].get("ffn_matmul_gflops"), ".1f") for k in keys) + " |")
        L.append("| other MatMul GFLOP/s | " + " | ".join(
            fmt(res["profiles"][k].get("other_matmul_gflops"), ".1f") for k in keys) + " |")
        L.append("| profiled model_run ms (median) | " + " | ".join(
            fmt(res["profiles"][k].get("model_run_ms_median"), ".0f") for k in keys) + " |")
        L.append("| FFN MatMul by route (dense / route1 small / route2 big) | " + " | ".join(
            ", ".join(f"{r} {v:.1f}" for r, v in res["profiles"][k]["ffn_matmul_by_route_ms"].items())
            for k in keys) + " |")
        L.append("| top op types | " + " | ".join(
            ", ".join(f"{o} {v:.1f}" for o, v in list(res["profiles"][k]["by_op_ms"].items())[:8])
            for k in keys) + " |")
        notes, _ = profile_notes(res)
        L += [""] + [f"- {n}" for n in notes]
    L += ["", "## What this shows / what it does not", ""] + [discussion(res)]
    with open(path, "w") as f:
        f.write("\n".join(L).rstrip() + "\n")


def discussion(res: dict) -> str:
    c = res["candidates"]
    d = c.get(DENSE, {})
    duo = {k: v for k, v in c.items() if k.startswith("duo_") and v.get("efficiency") is not None}
    eff = ", ".join(f"{k.removeprefix('duo_')} {v['efficiency']:.2f}" for k, v in duo.items())
    drift = [(k.removeprefix("duo_"), v["budget_x"], v["budget_calibration"]) for k, v in duo.items()
             if v.get("budget_calibration") is not None and abs(v["budget_x"] - v["budget_calibration"]) > 0.05]
    cond = res.get("timing_conditions", {})
    extra = ""
    if drift:
        extra += (" Budgets are fitted on the calibration data (sequences of "
                  f"{res['settings']['cal_seq']} tokens) and do not hold exactly on the {SEQ}-token input: "
                  + ", ".join(f"{k} {bx:.2f} on x vs {bc:.2f} on calibration" for k, bx, bc in drift)
                  + "; the FLOP-ideal and efficiency use the routes realised on x, so they stay like for like.")
    extra += (f" The run records how much of the 2 cores it got while timing (cpu_share {cond.get('cpu_share')}); "
              "an earlier attempt that overlapped with a test suite running alongside doubled every time and "
              "distorted the ratios (eager fell to 0.49x ONNX dense), so read a run only with cpu_share near 1.")
    return (
        "It shows, on one 2-core shared CPU, in one process with interleaved rounds, how routefx's ONNX backend "
        "compares with the HF model in eager PyTorch and under inductor at equal thread count, how much of the "
        "FLOP reduction that Duo's realised routes promise turns into wall-clock speedup (efficiencies: "
        f"{eff}), how close the dense graph runs to this machine's measured fp32 GEMM rate (MFU "
        f"{fmt(d.get('mfu'), '.2f')}), and what compiling costs. It does not show anything about quality: the "
        "weights are random, so routers (even 'local') learn nothing meaningful and a budget says only how much "
        "compute the routes take, not what it costs in loss; the route mix on real text will differ. The "
        "machine is a shared 2-core VM, so absolute times move between runs (ratios within this run are the "
        "numbers to read; they can still move by a few percent between runs); one input length (512) and batch "
        "1 only; fp32 only; no KV-cache generation; and 'peak' is this machine's measured ORT MatMul rate for "
        "the FFN shape, not the hardware's theoretical peak, so MFU near or above 1 is possible where other "
        "GEMMs (e.g. the LM head) run faster than that shape." + extra)


# ---- main ----------------------------------------------------------------------------------------------------

def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="budget 0.5 only, 1 warm-up + 3 rounds, outputs to /tmp")
    p.add_argument("--reps", type=int, default=None, help="timed interleaved rounds (default 9, quick 3)")
    p.add_argument("--warmup", type=int, default=None, help="warm-up rounds (default 2, quick 1)")
    p.add_argument("--budgets", type=float, nargs="+", default=None, help="Duo budgets (default 0.75 0.5 0.25)")
    p.add_argument("--routers", nargs="+", default=["random", "local", "static"])
    p.add_argument("--cal-batches", type=int, default=2)
    p.add_argument("--cal-batch", type=int, default=2)
    p.add_argument("--cal-seq", type=int, default=256)
    p.add_argument("--no-inductor", action="store_true")
    p.add_argument("--peak-repeat", type=int, default=8, help="peak MatMuls per timed call")
    p.add_argument("--profile-only", default=None,
                   help="comma-separated candidate keys (e.g. duo_local_0.25): profile them and ONNX dense, merge "
                        "into the JSON and rewrite the markdown; no timing run")
    p.add_argument("--profile-runs", type=int, default=5)
    p.add_argument("--json", default=None)
    p.add_argument("--md", default=None)
    a = p.parse_args(argv)
    if a.budgets is None:
        a.budgets = [0.5] if a.quick else [0.75, 0.5, 0.25]
    a.reps = a.reps if a.reps is not None else (3 if a.quick else 9)
    a.warmup = a.warmup if a.warmup is not None else (1 if a.quick else 2)
    a.json = a.json or ("/tmp/routefx_bench_cpu_quick.json" if a.quick else os.path.join(HERE, "results", "cpu.json"))
    a.md = a.md or ("/tmp/routefx_bench_cpu_quick.md" if a.quick else os.path.join(HERE, "RESULTS.md"))
    return a


def command_line() -> str:
    return " ".join([".venv/bin/python", os.path.relpath(os.path.abspath(sys.argv[0]), os.path.dirname(HERE))]
                    + sys.argv[1:])


def run_profiles(args) -> None:
    with open(args.json) as f:
        res = json.load(f)
    s = res["settings"]
    model = build_model()
    x = batch(torch.Generator().manual_seed(s["input_seed"]), BATCH, SEQ)
    gen = torch.Generator().manual_seed(s["cal_seed"])
    cal = [batch(gen, s["cal_batch"], s["cal_seq"]) for _ in range(s["cal_batches"])]
    wanted = [DENSE] + [k for k in args.profile_only.split(",") if k and k != DENSE]
    policies = {k: pol for k, _, pol in spec(argparse.Namespace(routers=["random", "local", "static"],
                                                                budgets=[0.75, 0.5, 0.25]))}
    res["profiles"] = {}
    for k in wanted:
        if k not in policies:
            raise SystemExit(f"unknown candidate {k!r}; known: {sorted(policies)}")
        print(f"-- profiling {k}", flush=True)
        pol = policies[k]
        # the graph does not depend on the backend: compile on the eager backend, export once with profiling on
        cm = (routefx.compile(model, pol, calibration=cal) if pol.needs_calibration else
              routefx.compile(model, pol, example_inputs=(), example_kwargs=x))
        prof = profile_candidate(cm, x, args.profile_runs)
        print(json.dumps(prof, indent=1), flush=True)
        res["profiles"][k] = prof
        del cm
        gc.collect()
    res["profile_command"] = command_line()
    res["profile_date"] = subprocess.run(["date"], capture_output=True, text=True).stdout.strip()
    with open(args.json, "w") as f:
        json.dump(res, f, indent=1)
    write_markdown(res, args.md)
    print(f"merged profiles into {args.json}; rewrote {args.md}")


def main(argv=None) -> None:
    args = parse_args(argv)
    warnings.filterwarnings("ignore")
    if args.profile_only:
        run_profiles(args)
        return
    t_start = time.perf_counter()
    res = {"command": command_line(), "date": subprocess.run(["date"], capture_output=True, text=True).stdout.strip(),
           "machine": machine(),
           "model": {"class": "transformers.LlamaForCausalLM", "layers": LAYERS, "hidden": D, "intermediate": FFN,
                     "heads": HEADS, "kv_heads": KV_HEADS, "vocab": VOCAB, "dtype": "float32", "seed": 0},
           "settings": {"batch": BATCH, "seq": SEQ, "reps": args.reps, "warmup": args.warmup,
                        "budgets": args.budgets, "routers": args.routers, "cal_batches": args.cal_batches,
                        "cal_batch": args.cal_batch, "cal_seq": args.cal_seq, "input_seed": 0, "cal_seed": 1,
                        "timing": "routefx.timing.median_seconds, all candidates and peak MatMuls in one dict",
                        "quick": args.quick},
           "candidates": {}}
    print(f"machine: {res['machine']['cpu']}, {res['machine']['cpu_count']} cores, torch threads "
          f"{res['machine']['torch_threads']}", flush=True)
    model = build_model()
    x = batch(torch.Generator().manual_seed(0), BATCH, SEQ)
    gen = torch.Generator().manual_seed(1)
    cal = [batch(gen, args.cal_batch, args.cal_seq) for _ in range(args.cal_batches)]
    cands = res["candidates"]
    fns = {}
    with torch.no_grad():
        ref = model(**x, use_cache=False)

    # routefx ONNX candidates (dense first: every FLOP-ideal is relative to it)
    compiled = {}
    for key, label, policy in spec(args):
        print(f"-- compiling {label}", flush=True)
        rec = {"label": label, "policy": policy.to_dict()}
        try:
            cm, rec["compile"] = compile_routefx(model, policy, x, cal)
            rec.update(evaluate_routes(cm, x))
            compiled[key] = cm
            fns[key] = (lambda cm=cm: cm(**x))
            print(f"   compile {rec['compile']['without_calibration_s']:.1f}s (+ calibration "
                  f"{rec['compile']['calibration_s']:.1f}s), MFLOP/token on x {rec['flops_per_token_x'] / 1e6:.1f}, "
                  f"budget x {rec['budget_x']:.3f} / cal {fmt(rec['budget_calibration'], '.3f')}, "
                  f"RSS {rec['compile']['rss_after_gib']:.1f} GiB", flush=True)
        except Exception as e:  # noqa: BLE001 - recorded, the run goes on
            traceback.print_exc()
            rec["error"] = _err(e)
        cands[key] = rec
    if DENSE not in compiled:
        raise SystemExit("routefx ONNX dense failed to compile; nothing to compare against")
    dense_fpt = cands[DENSE]["flops_per_token_x"]
    with torch.no_grad():
        res["checks"] = {"onnx_dense": max_logit_diff(compiled[DENSE](**x), ref)}

    # torch eager and inductor
    cands["eager"] = {"label": "torch eager (HF model)", "flops_per_token_x": dense_fpt}
    fns["eager"] = lambda: model(**x, use_cache=False)
    if not args.no_inductor:
        print("-- torch.compile (inductor)", flush=True)
        rec = {"label": "torch.compile inductor (HF model)", "flops_per_token_x": dense_fpt}
        try:
            opt = torch.compile(model)
            t = time.perf_counter()
            with torch.no_grad():
                out = opt(**x, use_cache=False)
            rec["compile"] = {"wall_s": round(time.perf_counter() - t, 3), "what": "first call (dynamo + inductor)"}
            rec["compile"]["without_calibration_s"] = rec["compile"]["wall_s"]
            res["checks"]["inductor"] = max_logit_diff(out, ref)
            fns["inductor"] = lambda: opt(**x, use_cache=False)
            print(f"   first call {rec['compile']['wall_s']:.1f}s", flush=True)
        except Exception as e:  # noqa: BLE001 - inductor needs a C++ toolchain; record and go on
            traceback.print_exc()
            rec["error"] = _err(e)
        cands["inductor"] = rec
    # put torch candidates right after ONNX dense in the table
    order = [DENSE, "eager", "inductor"] + [k for k in cands if k not in (DENSE, "eager", "inductor")]
    res["candidates"] = cands = {k: cands[k] for k in order if k in cands}

    peaks, res["peak"] = peak_fns(args.peak_repeat)
    fns.update(peaks)
    gc.collect()
    res["rss_before_timing_gib"] = round(rss_gib(), 2)
    names = [k for k in [DENSE, "eager", "inductor"] if k in fns] + \
            [k for k in fns if k not in (DENSE, "eager", "inductor")]
    print(f"-- timing {len(names)} functions: {args.warmup} warm-up + {args.reps} interleaved rounds "
          f"(RSS {res['rss_before_timing_gib']:.1f} GiB)", flush=True)
    load0, cpu0, t = loadavg(), os.times(), time.perf_counter()
    lat = median_seconds({k: fns[k] for k in names}, warmup=args.warmup, reps=args.reps)
    wall, cpu1 = time.perf_counter() - t, os.times()
    res["timing_seconds"] = round(wall, 1)
    # contention check: CPU time this process got per core per wall second while timing (1.0 = the cores were
    # ours; a shared 2-core machine running something else shows much less)
    share = ((cpu1.user - cpu0.user) + (cpu1.system - cpu0.system)) / wall / max(1, torch.get_num_threads())
    res["timing_conditions"] = {"loadavg_before": load0, "loadavg_after": loadavg(), "cpu_share": round(share, 3)}
    if share < 0.85:
        print(f"WARNING: this process got {share:.2f} of {torch.get_num_threads()} cores while timing: the machine "
              "was shared; absolute times and ratios are disturbed", flush=True)

    res["peak"]["onnx_matmul_s"] = lat.pop("peak_onnx_matmul") / args.peak_repeat
    res["peak"]["torch_mm_s"] = lat.pop("peak_torch_mm") / args.peak_repeat
    res["peak"]["onnx_gflops"] = res["peak"]["flops"] / res["peak"]["onnx_matmul_s"] / 1e9
    res["peak"]["torch_gflops"] = res["peak"]["flops"] / res["peak"]["torch_mm_s"] / 1e9
    peak = res["peak"]["onnx_gflops"] * 1e9
    t_dense = lat[DENSE]
    for k, v in cands.items():
        if k not in lat:
            v["latency_s"] = None
            continue
        v["latency_s"] = lat[k]
        v["speedup"] = t_dense / lat[k]
        v["ideal"] = dense_fpt / v["flops_per_token_x"]
        v["efficiency"] = v["speedup"] / v["ideal"]
        v["achieved_gflops"] = v["flops_per_token_x"] * BATCH * SEQ / lat[k] / 1e9
        v["mfu"] = v["achieved_gflops"] * 1e9 / peak
        v["mfu_vs_torch_mm"] = v["achieved_gflops"] / res["peak"]["torch_gflops"]
    res["targets"] = assess(res)
    res["total_seconds"] = round(time.perf_counter() - t_start, 1)
    res["peak_rss_gib"] = round(__import__("resource").getrusage(__import__("resource").RUSAGE_SELF).ru_maxrss
                                / 2**20, 2)
    print_summary(res)
    os.makedirs(os.path.dirname(args.json), exist_ok=True)
    with open(args.json, "w") as f:
        json.dump(res, f, indent=1)
    write_markdown(res, args.md)
    print(f"\nwrote {args.json} and {args.md} (total {res['total_seconds'] / 60:.1f} min)")


if __name__ == "__main__":
    main()
