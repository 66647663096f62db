"""CPU benchmark: routefx (ONNX, optionally inductor; dense and Duo) against torch eager and torch.compile
(inductor) on two model shapes, every candidate of both shapes timed in the same interleaved, shuffled rounds in
one process.

Shapes (transformers `LlamaForCausalLM` from configs, random weights, torch.manual_seed(0), fp32, mask all ones):
  A  8 layers, hidden 1024, FFN 2816, 16/4 heads, vocab 32000, batch 1 x 512 tokens
  B  12 layers, hidden 768, FFN 2048, 12/4 heads, vocab 32000, batch 1 x 256 tokens

Per shape it reports (principle 5 of DESIGN.md, honest compute accounting):
  latency        median of interleaved rounds (routefx.timing.median_seconds, one dict for both shapes)
  speedup        against routefx ONNX dense and against the fastest dense engine in the same rounds
  FLOP-ideal     dense FLOPs per token / the candidate's with the routes realised on the measured input
  efficiency     speedup / FLOP-ideal (both speedups)
  ceiling        from a profile of ONNX dense taken in the run: the fraction f of kernel time in FFN GEMMs gives
                 the best speedup if only FFN time shrank, 1 / (1 - f + f r) at realised FFN fraction r; divided by
                 the FLOP-ideal, the best attainable efficiency
  GEMM rates     ONNX Runtime MatMul (weight an initializer, routefx's session options) and torch.mm on the
                 shape's FFN product [tokens, hidden] x [hidden, FFN] (and a 2048^3 product), in the same rounds
  memory         peak RSS of a fresh process (numpy + onnxruntime only) that loads the saved ONNX dense model
                 (external data) and runs it once, against the weight bytes; the same for the first Duo model
  compile time   routefx.compile wall time (and process CPU time), split into capture, calibration, passes and
                 the ONNX backend's prepare (export from the captured graph, fold, optimize, fuse, serialize,
                 session; wall and CPU seconds each) and the fused-kernel rewrites made; "without
                 calibration" = wall - report.calibration_seconds

Writes bench/results/cpu.json (every number) and bench/RESULTS.md (generated from the JSON by bench/report.py).

    .venv/bin/python bench/cpu.py                 # the real run (both shapes, all routers and budgets)
    .venv/bin/python bench/cpu.py --quick         # budget 0.5 only, 1 + 3 rounds, results to /tmp
    .venv/bin/python bench/cpu.py --smoke         # minutes: two tiny shapes, one router, no inductor, /tmp
    .venv/bin/python bench/cpu.py --budgets 0.5 --routers random local --reps 5   # a smaller real run
"""
from __future__ import annotations

import argparse
import collections
import dataclasses
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
from routefx.timing import CPU_WARM_EACH, median_seconds  # noqa: E402

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from report import DENSE, assess, fmt, overall_targets, print_summary, write_markdown  # noqa: E402

HERE = os.path.dirname(os.path.abspath(__file__))
SQUARE = 2048  # the large square product of the peak GEMM rate


@dataclasses.dataclass(frozen=True)
class Shape:
    layers: int = 8
    hidden: int = 1024
    ffn: int = 2816
    heads: int = 16
    kv_heads: int = 4
    vocab: int = 32000
    batch: int = 1
    seq: int = 512


FULL = Shape()
SMOKE = Shape(layers=2, hidden=256, ffn=704, heads=4, kv_heads=2, vocab=1000, batch=1, seq=128)
# the two shapes of every run (issue 14: different width, depth and length), timed in the same rounds
SHAPES = {"A": FULL, "B": Shape(layers=12, hidden=768, ffn=2048, heads=12, kv_heads=4, vocab=32000, batch=1, seq=256)}
SMOKE_SHAPES = {"A": SMOKE, "B": Shape(layers=3, hidden=192, ffn=512, heads=4, kv_heads=2, vocab=1000, batch=1,
                                       seq=64)}


# ---- set-up --------------------------------------------------------------------------------------------------

def build_model(m: Shape) -> torch.nn.Module:
    cfg = transformers.LlamaConfig(vocab_size=m.vocab, hidden_size=m.hidden, intermediate_size=m.ffn,
                                   num_hidden_layers=m.layers, num_attention_heads=m.heads,
                                   num_key_value_heads=m.kv_heads, max_position_embeddings=2048, bos_token_id=1,
                                   eos_token_id=2)
    torch.manual_seed(0)
    return transformers.LlamaForCausalLM(cfg).to(torch.float32).eval()


def batch(gen: torch.Generator, b: int, s: int, vocab: int) -> dict:
    return {"input_ids": torch.randint(3, vocab, (b, s), generator=gen),
            "attention_mask": torch.ones(b, s, dtype=torch.long)}


def rss_gib() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**30


def loadavg() -> list[float]:
    with open("/proc/loadavg") as f:
        return [float(v) for v in f.read().split()[:3]]


_ISA = {"avx", "avx2", "fma", "avx512f", "avx512bw", "avx512vl", "avx512_vnni", "avx_vnni", "avx512_bf16",
        "avx512_fp16", "amx_tile", "amx_bf16", "amx_int8"}  # the flags that decide GEMM kernels


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
            "simd": sorted(f for f in flags if f in _ISA),
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

def _ort_matmul(m: int, k: int, n: int):
    """(run, a, w): an ONNX Runtime MatMul [m, k] x [k, n] with the weight an initializer (pre-packed like
    routefx's weights) and the routefx ONNX backend's session options for a dense graph."""
    rng = np.random.default_rng(0)
    a = rng.standard_normal((m, k), dtype=np.float32)
    w = (rng.standard_normal((k, n), dtype=np.float32) / np.sqrt(k)).astype(np.float32)
    graph = helper.make_graph([helper.make_node("MatMul", ["a", "w"], ["y"])], "peak_matmul",
                              [helper.make_tensor_value_info("a", TensorProto.FLOAT, [m, k])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [m, n])],
                              initializer=[numpy_helper.from_array(w, "w")])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)])
    sess = ort.InferenceSession(model.SerializeToString(), sess_options=onnx_backend.session_options(),
                                providers=["CPUExecutionProvider"])
    got = sess.run(None, {"a": a})[0]
    assert np.abs(got - a @ w).max() < 1e-3, "peak MatMul gives wrong numbers"
    return (lambda: sess.run(None, {"a": a})), a, w


def peak_fns(repeat: int, m: Shape, square: bool = True) -> tuple[dict, dict]:
    """torch.mm and ONNX Runtime MatMul, fp32, on the FFN's shape [tokens, hidden] x [hidden, ffn] (and on a
    SQUARE^3 product when `square`): each engine's GEMM rate; the peak is the fastest (the MFU denominator)."""
    shapes = {"ffn": (m.batch * m.seq, m.hidden, m.ffn)}
    if square:
        shapes["square"] = (SQUARE, SQUARE, SQUARE)
    fns, flops = {}, {}
    for name, (rows, k, n) in shapes.items():
        run, a, w = _ort_matmul(rows, k, n)
        ta, tw = torch.from_numpy(a), torch.from_numpy(w)
        fns[f"peak_onnx_{name}"] = lambda run=run: [run() for _ in range(repeat)]
        fns[f"peak_torch_{name}"] = lambda ta=ta, tw=tw: [torch.mm(ta, tw) for _ in range(repeat)]
        flops[f"peak_onnx_{name}"] = flops[f"peak_torch_{name}"] = 2.0 * rows * k * n
    so = onnx_backend.session_options()
    info = {"shapes": [f"[{r},{k}]x[{k},{n}]" for r, k, n in shapes.values()], "flops": flops,
            "repeat_per_call": repeat,
            "session_options": {"intra_op_num_threads": so.intra_op_num_threads,
                                "inter_op_num_threads": so.inter_op_num_threads,
                                "execution_mode": str(so.execution_mode),
                                "graph_optimization_level": str(so.graph_optimization_level),
                                "enable_mem_pattern": so.enable_mem_pattern}}
    return fns, info


def peak_rates(info: dict, lat: dict, repeat: int) -> None:
    """Fill `info` with each peak function's GFLOP/s, the best of them, and ONNX Runtime's rate over torch's on
    the FFN shape (popping their latencies)."""
    info["rates_gflops"] = {k.removeprefix("peak_"): info["flops"][k] / (lat.pop(k) / repeat) / 1e9
                            for k in list(info["flops"])}
    info["best"] = max(info["rates_gflops"], key=info["rates_gflops"].get)
    info["gflops"] = info["rates_gflops"][info["best"]]
    r = info["rates_gflops"]
    info["ffn_onnx_over_torch"] = r["onnx_ffn"] / r["torch_ffn"]


# ---- candidates ----------------------------------------------------------------------------------------------

def compile_routefx(model, policy, cal, backend: str = "onnx") -> tuple[object, dict]:
    """routefx.compile with `backend` (ONNX unless asked), every policy the same way (captured on the calibration
    data, which has the measured input's form); returns the compiled model and its compile-time record."""
    gc.collect()
    routefx.clear_capture_cache()     # each candidate's compile time from scratch: no export kept by an earlier one
    t, c = time.perf_counter(), time.process_time()
    cm = routefx.compile(model, policy, calibration=cal, backend=backend)
    wall, cpu = time.perf_counter() - t, time.process_time() - c
    rep = cm.report
    prep = dict(cm.runner.timings)
    accounted = rep.capture_seconds + rep.calibration_seconds + rep.compile_seconds + sum(prep.values())
    rec = {"wall_s": round(wall, 3), "cpu_s": round(cpu, 3), "capture_s": rep.capture_seconds,
           "calibration_s": rep.calibration_seconds, "compile_s": rep.compile_seconds, "onnx_prepare_s": prep,
           "onnx_prepare_cpu_s": dict(getattr(cm.runner, "cpu_timings", {})),
           "onnx_fusions": dict(getattr(cm.runner, "fusions", {})),
           "without_calibration_s": round(wall - rep.calibration_seconds, 3),
           "unaccounted_s": round(wall - accounted, 3),
           "passes_s": {p.name: round(p.seconds, 3) for p in rep.passes},
           "onnx_model_mib": round(cm.runner.weight_bytes / 2**20, 1) if backend == "onnx" else None,
           "export_path": getattr(cm.runner, "export_path", None)}
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
    plan_budget = cm.report.plan.get("budget") or {}
    realised = cm.report.flops_per_token.get("realised") or {}
    return {"flops_per_token_x": fpt, "budget_x": st.budget,
            "mix_x": [{"key": l["key"], "skip_small_big": [round(v, 4) for v in l["mix"]]} for l in st.layers],
            "budget_calibration": plan_budget.get("realised"), "lambda": plan_budget.get("lam"),
            "flops_per_token_calibration": realised.get("calibration"),
            "static_fraction_calibration": cm.report.plan.get("calibration", {}).get("static_fraction"),
            "flops_per_token_x_seconds": round(t1 - t, 3), "route_stats_x_seconds": round(t2 - t1, 3)}


def max_logit_diff(a, b) -> float:
    return (a.logits - b.logits).abs().max().item()


def spec(args) -> list[tuple[str, str, object, str]]:
    """(key, label, policy, backend) of the routefx candidates, ONNX dense first; with --routefx-inductor also
    routefx's inductor backend on dense and on the first router at the middle budget."""
    out = [(DENSE, "routefx ONNX dense", routefx.policies.Dense(), "onnx")]
    for router in args.routers:
        for b in args.budgets:
            out.append((f"duo_{router}_{b:g}", f"routefx ONNX Duo {router} b={b:g}",
                        routefx.policies.Duo(budget=b, router=router), "onnx"))
    if args.routefx_inductor:
        router, b = args.routers[0], args.budgets[len(args.budgets) // 2]
        out += [("inductor_dense", "routefx inductor dense", routefx.policies.Dense(), "inductor"),
                (f"inductor_duo_{router}_{b:g}", f"routefx inductor Duo {router} b={b:g}",
                 routefx.policies.Duo(budget=b, router=router), "inductor")]
    return out


# ---- ONNX profile --------------------------------------------------------------------------------------------

_OVERHEAD = {"TopK", "CumSum", "NonZero", "ScatterND", "ScatterElements", "Less", "Range", "Gather", "GatherND",
             "Equal", "ConstantOfShape", "Div", "Unsqueeze", "ArgMax", "Shape", "Reshape", "Expand", "Cast"}


# control-flow nodes: their kernel time includes their branch's nodes, which the profiler also lists
_CONTROL_FLOW = {"If", "Loop", "Scan"}


def profile_candidate(cm, x, runs: int, m: Shape) -> dict:
    """Run the candidate's graph under ONNX Runtime's profiler; time per op type and per FFN route, and the
    GEMM rate of the FFN MatMuls (FLOPs from the routes realised on x) and of the other MatMuls."""
    kwargs = {**x, "use_cache": False}
    st = cm.route_stats([x])
    tokens = int(x["attention_mask"].sum())
    k = cm.policy.small_fraction if hasattr(cm.policy, "small_fraction") else 0.0
    per_row = {"skip": 0.0, "small": 2.0 * 3 * m.hidden * round(k * m.ffn), "big": 2.0 * 3 * m.hidden * m.ffn}
    ffn_flops = sum(tokens * sum(f * per_row[n] for n, f in zip(l["names"], l["mix"])) for l in st.layers) \
        if st.layers and len(st.layers[0]["names"]) == 3 else m.layers * tokens * per_row["big"]
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
             and e["ts"] >= start and e.get("args", {}).get("op_name") not in _CONTROL_FLOW]
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
            by_class["index/shape ops (TopK, Gather, ScatterND, Equal, ArgMax, Reshape, ...)"] += us
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


# ---- memory of a fresh process -------------------------------------------------------------------------------

_RSS_CHILD = r"""
import json, sys, time
import numpy as np, onnxruntime as ort
path, threads, b, s, vocab = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4]), int(sys.argv[5])
def kib():  # VmHWM: this process's peak RSS (ru_maxrss would carry the forking parent's over exec)
    with open("/proc/self/status") as f:
        return int(next(l for l in f if l.startswith("VmHWM")).split()[1])
base = kib()
so = ort.SessionOptions()
so.intra_op_num_threads, so.inter_op_num_threads = threads, 1
so.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
so.log_severity_level = 3
t = time.perf_counter()
sess = ort.InferenceSession(path, sess_options=so, providers=["CPUExecutionProvider"])
load_s = time.perf_counter() - t
loaded = kib()
feeds = {"input_ids": np.random.default_rng(0).integers(3, vocab, (b, s)), "attention_mask": np.ones((b, s), np.int64)}
feeds = {i.name: feeds[i.name] for i in sess.get_inputs()}
sess.run(None, feeds)
print(json.dumps({"baseline_kib": base, "after_load_kib": loaded, "peak_kib": kib(), "load_s": load_s}))
"""


def fresh_process_rss(cm, m: Shape) -> dict:
    """Peak RSS of a new Python process (numpy + onnxruntime only) that loads the compiled ONNX model (saved with
    external data) and runs it once on a [batch, seq] input, against the model's weight bytes."""
    import tempfile
    with tempfile.TemporaryDirectory(prefix="routefx_bench_rss_") as tmp:
        path = os.path.join(tmp, "model.onnx")
        cm.runner.save(path, external_data=True)
        files = {f: os.path.getsize(os.path.join(tmp, f)) for f in os.listdir(tmp)}
        out = subprocess.run([sys.executable, "-c", _RSS_CHILD, path, str(torch.get_num_threads()), str(m.batch),
                              str(m.seq), str(m.vocab)], capture_output=True, text=True, timeout=900)
    if out.returncode != 0:
        return {"error": out.stderr.strip().splitlines()[-1] if out.stderr.strip() else f"rc {out.returncode}"}
    r = json.loads(out.stdout.strip().splitlines()[-1])
    w = cm.runner.weight_bytes
    return {"weight_bytes": w, "file_bytes": files, "baseline_gib": r["baseline_kib"] / 2**20,
            "after_load_gib": r["after_load_kib"] / 2**20, "peak_gib": r["peak_kib"] / 2**20,
            "load_s": round(r["load_s"], 2), "peak_over_weights": r["peak_kib"] * 1024 / w,
            "peak_minus_baseline_over_weights": (r["peak_kib"] - r["baseline_kib"]) * 1024 / w}


# ---- efficiency ceiling -------------------------------------------------------------------------------------

_FFN_CLASS = "FFN MatMul (routed_ffn up/gate/down)"


def ceilings(shape_res: dict, m: Shape) -> None:
    """From the dense ONNX profile: the fraction f of dense kernel time spent in FFN GEMMs; if only that time
    shrank with the FFN FLOPs (fraction r realised on x) and every other kernel kept its dense time, the best
    speedup is 1 / (1 - f + f r) and the best efficiency that over the FLOP-ideal (Amdahl). Fills each Duo
    candidate's "ceiling_speedup" / "ceiling_efficiency" and shape_res["ceiling"]["by_budget"]."""
    prof = shape_res.get("profile_dense")
    if not prof or not prof.get("kernel_ms_per_run"):
        return
    f = prof["by_class_ms"].get(_FFN_CLASS, 0.0) / prof["kernel_ms_per_run"]
    c = shape_res["candidates"]
    dense_fpt = c[DENSE]["flops_per_token_x"]
    ffn_fpt = m.layers * 2.0 * 3 * m.hidden * m.ffn
    shape_res["ceiling"] = {"ffn_time_fraction": f, "by_budget": {
        f"{b:g}": 1.0 / (1.0 - f + f * b) for b in (1.0, 0.75, 0.5, 0.25)}}
    for k, v in c.items():
        if v.get("flops_per_token_x") is None or not k.startswith(("duo_", "inductor_duo")):
            continue
        r = (v["flops_per_token_x"] - (dense_fpt - ffn_fpt)) / ffn_fpt
        v["ffn_flop_fraction_x"] = r
        v["ceiling_speedup"] = 1.0 / (1.0 - f + f * r)
        v["ceiling_efficiency"] = v["ceiling_speedup"] / (dense_fpt / v["flops_per_token_x"])


# ---- main ----------------------------------------------------------------------------------------------------

def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="budget 0.5 only, 1 warm-up + 3 rounds, outputs to /tmp")
    p.add_argument("--smoke", action="store_true",
                   help="check the script in minutes: two tiny Llama shapes, budget 0.5, router local, no inductor, "
                        "1 warm-up + 2 rounds, peak repeat 1, outputs to /tmp")
    p.add_argument("--shapes", default="A,B", help="which of the shapes to run (A: 8x1024 1x512, B: 12x768 1x256)")
    p.add_argument("--seed", type=int, default=0, help="seed of the per-round order of the candidates")
    p.add_argument("--reps", type=int, default=None, help="timed interleaved rounds (default 9, quick 3)")
    p.add_argument("--warmup", type=int, default=None, help="warm-up rounds (default 2, quick 1)")
    p.add_argument("--budgets", type=float, nargs="+", default=None, help="Duo budgets (default 0.75 0.5 0.25)")
    p.add_argument("--routers", nargs="+", default=["random", "local", "static"])
    p.add_argument("--cal-batches", type=int, default=2)
    p.add_argument("--cal-batch", type=int, default=2)
    p.add_argument("--cal-seq", type=int, default=256)
    p.add_argument("--no-inductor", action="store_true")
    p.add_argument("--routefx-inductor", action="store_true",
                   help="also time routefx's inductor backend (dense, and the first router at the middle budget)")
    p.add_argument("--no-rss", action="store_true", help="skip the fresh-process memory measurement")
    p.add_argument("--peak-repeat", type=int, default=8, help="peak MatMuls per timed call")
    p.add_argument("--profile-runs", type=int, default=5, help="profiled runs of ONNX dense (the ceiling)")
    p.add_argument("--json", default=None)
    p.add_argument("--md", default=None)
    a = p.parse_args(argv)
    table = SMOKE_SHAPES if a.smoke else SHAPES
    a.shape_map = {k: table[k] for k in a.shapes.split(",") if k}
    if a.smoke:
        a.quick, a.no_inductor, a.routers, a.peak_repeat, a.profile_runs = True, True, ["local"], 1, 2
        a.cal_seq = min(a.cal_seq, min(m.seq for m in a.shape_map.values()))
    if a.budgets is None:
        a.budgets = [0.5] if a.quick else [0.75, 0.5, 0.25]
    a.reps = a.reps if a.reps is not None else (2 if a.smoke else 3 if a.quick else 9)
    a.warmup = a.warmup if a.warmup is not None else (1 if a.quick else 2)
    tmp = "/tmp/routefx_bench_cpu_" + ("smoke" if a.smoke else "quick")
    a.json = a.json or (tmp + ".json" if a.quick else os.path.join(HERE, "results", "cpu.json"))
    a.md = a.md or (tmp + ".md" if a.quick else os.path.join(HERE, "RESULTS.md"))
    return a


def command_line() -> str:
    return " ".join([".venv/bin/python", os.path.relpath(os.path.abspath(sys.argv[0]), os.path.dirname(HERE))]
                    + sys.argv[1:])


def setup_shape(name: str, m: Shape, args, fns: dict) -> dict:
    """Compile every candidate of one model shape, check it, profile ONNX dense and measure a fresh process's
    memory; adds the timed functions to `fns` as '{name}:{key}'. Returns the shape's record."""
    sr = {"model": {"class": "transformers.LlamaForCausalLM", "layers": m.layers, "hidden": m.hidden,
                    "intermediate": m.ffn, "heads": m.heads, "kv_heads": m.kv_heads, "vocab": m.vocab,
                    "dtype": "float32", "seed": 0},
          "settings": {"batch": m.batch, "seq": m.seq, "input_seed": 0, "cal_seed": 1}, "candidates": {}}
    print(f"== shape {name}: {m}", flush=True)
    model = build_model(m)
    x = batch(torch.Generator().manual_seed(0), m.batch, m.seq, m.vocab)
    gen = torch.Generator().manual_seed(1)
    cal = [batch(gen, args.cal_batch, min(args.cal_seq, m.seq), m.vocab) for _ in range(args.cal_batches)]
    sr["settings"]["cal_seq"] = min(args.cal_seq, m.seq)
    cands = sr["candidates"]
    with torch.no_grad():
        ref = model(**x, use_cache=False)
    compiled = {}
    for key, label, policy, backend in spec(args):
        print(f"-- [{name}] compiling {label}", flush=True)
        rec = {"label": label, "policy": policy.to_dict()}
        try:
            cm, rec["compile"] = compile_routefx(model, policy, cal, backend)
            rec.update(evaluate_routes(cm, x))
            compiled[key] = cm
            fns[f"{name}:{key}"] = (lambda cm=cm: cm(**x))
            print(f"   compile {rec['compile']['without_calibration_s']:.1f}s (+ calibration "
                  f"{rec['compile']['calibration_s']:.1f}s; prepare {rec['compile']['onnx_prepare_s']}, "
                  f"{rec['compile'].get('export_path')}), budget x {rec['budget_x']:.3f}, "
                  f"RSS {rec['compile']['rss_after_gib']:.1f} GiB", flush=True)
        except Exception as e:  # noqa: BLE001 - recorded, the run goes on
            traceback.print_exc()
            rec["error"] = _err(e)
        cands[key] = rec
    if DENSE not in compiled:
        raise SystemExit(f"shape {name}: routefx ONNX dense failed to compile; nothing to compare against")
    dense_fpt = cands[DENSE]["flops_per_token_x"]
    with torch.no_grad():
        sr["checks"] = {k: max_logit_diff(cm(**x), ref) for k, cm in compiled.items() if k in (DENSE, "inductor_dense")}
    cands["eager"] = {"label": "torch eager (HF model)", "flops_per_token_x": dense_fpt}
    fns[f"{name}:eager"] = lambda: model(**x, use_cache=False)
    if not args.no_inductor:
        print(f"-- [{name}] torch.compile (inductor)", flush=True)
        rec = {"label": "torch.compile inductor (HF model)", "flops_per_token_x": dense_fpt}
        try:
            opt = torch.compile(model)
            t = time.perf_counter()
            with torch.no_grad():
                out = opt(**x, use_cache=False)
            rec["compile"] = {"wall_s": round(time.perf_counter() - t, 3), "what": "first call (dynamo + inductor)"}
            rec["compile"]["without_calibration_s"] = rec["compile"]["wall_s"]
            sr["checks"]["inductor"] = max_logit_diff(out, ref)
            fns[f"{name}:inductor"] = lambda: opt(**x, use_cache=False)
        except Exception as e:  # noqa: BLE001 - inductor needs a C++ toolchain; record and go on
            traceback.print_exc()
            rec["error"] = _err(e)
        cands["inductor"] = rec
    order = [DENSE, "eager", "inductor"] + [k for k in cands if k not in (DENSE, "eager", "inductor")]
    sr["candidates"] = {k: cands[k] for k in order if k in cands}
    peaks, sr["peak"] = peak_fns(args.peak_repeat, m, square=(name == next(iter(args.shape_map))))
    fns.update({f"{name}:{k}": f for k, f in peaks.items()})
    print(f"-- [{name}] profiling ONNX dense ({args.profile_runs} runs)", flush=True)
    try:
        sr["profile_dense"] = profile_candidate(compiled[DENSE], x, args.profile_runs, m)
    except Exception as e:  # noqa: BLE001
        traceback.print_exc()
        sr["profile_dense"] = {"error": _err(e)}
    if not args.no_rss:
        print(f"-- [{name}] fresh-process memory of ONNX dense and of the first Duo model", flush=True)
        sr["fresh_process"] = {k: fresh_process_rss(compiled[k], m)
                               for k in [DENSE] + [k for k in compiled if k.startswith("duo_")][:1]}
        print(f"   {sr['fresh_process']}", flush=True)
    sr["_x"] = x
    return sr


def finish_shape(sr: dict, name: str, m: Shape, lat: dict, args) -> None:
    """Latencies of one shape's candidates -> speedups, efficiencies (against ONNX dense and against the fastest
    dense engine), MFU, the efficiency ceiling."""
    sr.pop("_x", None)
    own = {k.split(":", 1)[1]: v for k, v in lat.items() if k.startswith(name + ":")}
    peak_rates(sr["peak"], own, args.peak_repeat)
    c = sr["candidates"]
    dense_fpt = c[DENSE]["flops_per_token_x"]
    dense_keys = [k for k in (DENSE, "eager", "inductor", "inductor_dense") if own.get(k)]
    best = min(dense_keys, key=own.get)
    sr["best_dense"] = best
    peak = max(sr["peak"]["gflops"], args.square_gflops or 0.0) * 1e9
    for k, v in c.items():
        if k not in own:
            v["latency_s"] = None
            continue
        v["latency_s"] = own[k]
        v["speedup"] = own[DENSE] / own[k]
        v["speedup_vs_best_dense"] = own[best] / own[k]
        v["ideal"] = dense_fpt / v["flops_per_token_x"]
        v["efficiency"] = v["speedup"] / v["ideal"]
        v["efficiency_vs_best_dense"] = v["speedup_vs_best_dense"] / v["ideal"]
        v["achieved_gflops"] = v["flops_per_token_x"] * m.batch * m.seq / own[k] / 1e9
        v["mfu"] = v["achieved_gflops"] * 1e9 / peak
    ceilings(sr, m)
    sr["targets"] = assess(sr)


def main(argv=None) -> None:
    args = parse_args(argv)
    warnings.filterwarnings("ignore")
    t_start = time.perf_counter()
    res = {"command": command_line(), "date": subprocess.run(["date"], capture_output=True, text=True).stdout.strip(),
           "machine": machine(),
           "settings": {"reps": args.reps, "warmup": args.warmup, "order_seed": args.seed, "smoke": args.smoke,
                        "quick": args.quick, "budgets": args.budgets, "routers": args.routers,
                        "cal_batches": args.cal_batches, "cal_batch": args.cal_batch, "cal_seq": args.cal_seq,
                        "timing": "routefx.timing.median_seconds: every candidate of both shapes and the peak "
                                  f"MatMuls in one dict, order shuffled per round, each timed call right after "
                                  f"{CPU_WARM_EACH} untimed calls of the same candidate",
                        "warm_each": CPU_WARM_EACH},
           "shapes": {}}
    mc = res["machine"]
    print(f"machine: {mc['cpu']} ({', '.join(mc['simd'])}), {mc['cpu_count']} cores, torch threads "
          f"{mc['torch_threads']}", flush=True)
    fns: dict = {}
    for name, m in args.shape_map.items():
        res["shapes"][name] = setup_shape(name, m, args, fns)
        gc.collect()
    res["rss_before_timing_gib"] = round(rss_gib(), 2)
    print(f"-- timing {len(fns)} functions: {args.warmup} warm-up + {args.reps} interleaved rounds "
          f"(RSS {res['rss_before_timing_gib']:.1f} GiB)", flush=True)
    load0, cpu0, t = loadavg(), os.times(), time.perf_counter()
    lat = median_seconds(fns, warmup=args.warmup, reps=args.reps, shuffle_seed=args.seed, warm_each=CPU_WARM_EACH)
    wall, cpu1 = time.perf_counter() - t, os.times()
    res["timing_seconds"] = round(wall, 1)
    share = ((cpu1.user - cpu0.user) + (cpu1.system - cpu0.system)) / wall / max(1, torch.get_num_threads())
    res["timing_conditions"] = {"loadavg_before": load0, "loadavg_after": loadavg(), "cpu_share": round(share, 3)}
    if share < 0.85:
        print(f"WARNING: this process got {share:.2f} of {torch.get_num_threads()} cores while timing: the machine "
              "was shared; absolute times and ratios are disturbed", flush=True)
    first = next(iter(args.shape_map))
    sq = {k: lat[f"{first}:{k}"] for k in ("peak_onnx_square", "peak_torch_square")}
    args.square_gflops = max(2.0 * SQUARE ** 3 / (v / args.peak_repeat) / 1e9 for v in sq.values())
    for name, m in args.shape_map.items():
        finish_shape(res["shapes"][name], name, m, lat, args)
    res["targets"] = overall_targets(res)
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
