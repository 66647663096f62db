"""What a decode step could cost, and what the ONNX decode's step costs, measured in the running process.

Roofline. One decode step multiplies B tokens by every weight matrix of the model once: it must stream the weight
bytes from memory (plus the KV cache). `weight_stream_seconds` times exactly that work with no model around it:
[B, d] x a weight buffer as large as the dense decode step's weight bytes, through torch (`x @ W.T`) and through
a one-MatMul ONNX Runtime session (the weights an initializer, pre-packed as in the compiled graphs; the same
session options), median of `reps` interleaved calls after `warmup`, and keeps the faster per batch. Both take one
buffer (viewed as [R, d] and as [d, R]: the values do not matter for the time; ONNX Runtime reads its pre-packed
copy, so the process holds ~3x the bytes while this runs, ~1.4 GiB on the CPU benchmark model). At batch 1 this is
a matrix-vector product, bound by memory bandwidth (bytes / seconds is reported as the machine's bandwidth); at
larger batches the same GEMM says whether compute starts to matter. A decode step also reads the KV cache: its bytes
(at the mean length of the decode steps) are added at the measured bandwidth.

Step time. `step_seconds` times single ONNX decode steps of a compiled model (`Stepper.decode`, the greedy token fed
back) by `Stepper` path: the runner's plain call, IO binding (the cache kept as OrtValues), numpy arrays (the
default: the cache kept as the arrays ONNX Runtime returns), in lockstep, median per step.

`roofline` sets a batch's measured decode tokens/s and step times against it, `roofline_markdown` renders the table
bench/generate.py puts in its section of RESULTS.md.
"""
from __future__ import annotations

import random
import statistics
import time

import numpy as np
import onnx_ir as ir
import torch

from routefx.backends import onnx_session
from routefx.backends.onnx import session_options
from routefx.generate.loop import Stepper
from routefx.timing import CPU_WARM_EACH, median_seconds

__all__ = ["PATHS", "weight_stream_seconds", "step_seconds", "roofline", "roof_of", "roofline_markdown"]


def _matmul_session(w: np.ndarray):
    """An ONNX Runtime session computing x [B, d] @ w [d, R] with `w` an initializer (handed over in memory)."""
    d, r = w.shape
    x = ir.Value(name="x", type=ir.TensorType(ir.DataType.FLOAT), shape=ir.Shape(["B", d]))
    wv = ir.Value(name="w", type=ir.TensorType(ir.DataType.FLOAT), shape=ir.Shape([d, r]),
                  const_value=ir.Tensor(w, name="w"))
    y = ir.Value(name="y", type=ir.TensorType(ir.DataType.FLOAT), shape=ir.Shape(["B", r]))
    node = ir.Node("", "MatMul", [x, wv], outputs=[y])
    graph = ir.Graph([x], [y], nodes=[node], initializers=[wv], opset_imports={"": 17}, name="stream")
    return onnx_session.prepare_graph(ir.Model(graph, ir_version=10)).session(session_options())


def weight_stream_seconds(nbytes: int, hidden: int, batches, *, reps: int = 15, warmup: int = 3,
                          seed: int = 0) -> dict:
    """Seconds to multiply [B, hidden] by `nbytes` of fp32 weights, per batch B, through torch and ONNX Runtime
    (see the module docstring). Returns {"bytes", "rows", "torch": {B: s}, "onnxruntime": {B: s}, "best": {B: s},
    "bandwidth_gb_s" (bytes / best seconds at the smallest batch)}."""
    rows = nbytes // (4 * hidden)
    buf = torch.empty(rows * hidden, dtype=torch.float32)
    buf.uniform_(-0.05, 0.05, generator=torch.Generator().manual_seed(seed))   # touched: no zero-page reads
    w_torch = buf.view(rows, hidden)                                            # x @ w_torch.T
    sess = _matmul_session(buf.numpy().reshape(hidden, rows))                   # x @ w
    res = {"bytes": rows * hidden * 4, "rows": rows, "torch": {}, "onnxruntime": {}, "best": {}}
    for B in batches:
        x = torch.randn(B, hidden, generator=torch.Generator().manual_seed(seed + B))
        xn = x.numpy()
        fns = {"torch": lambda x=x: x @ w_torch.T, "onnxruntime": lambda xn=xn: sess.run(None, {"x": xn})}
        for k, v in median_seconds(fns, warmup=warmup, reps=reps, shuffle_seed=seed + B,
                                   warm_each=CPU_WARM_EACH).items():
            res[k][B] = v
        res["best"][B] = min(res["torch"][B], res["onnxruntime"][B])
    res["bandwidth_gb_s"] = res["bytes"] / res["best"][min(batches)] / 1e9
    return res


PATHS = ("call", "io_binding", "arrays")


def step_seconds(cm, prompt: torch.Tensor, *, steps: int = 60, blocks: int = 3, seed: int = 0) -> dict:
    """Median seconds of one ONNX decode step of `cm` after `prompt` [B, S] (no padding) per `Stepper` path (the
    runner's plain call, IO binding, numpy arrays). A block prefills one Stepper per path and runs `steps` steps
    in lockstep (every path at the same cache length, in a shuffled order at each step, fed the same greedy
    token); one short warm-up block, then `blocks` timed ones. Also says whether every path gave the same logits."""
    mask = torch.ones_like(prompt)
    times = {p: [] for p in PATHS}
    same = True
    rng = random.Random(seed)
    with torch.no_grad():
        for b in range(blocks + 1):
            st = {p: Stepper(cm, mask, path=p) for p in PATHS}
            logits = {p: s.prefill(prompt) for p, s in st.items()}
            order = list(PATHS)
            for _ in range(steps if b else 5):
                nxt = logits["call"].argmax(-1)[:, None]
                rng.shuffle(order)
                for p in order:
                    t = time.perf_counter()
                    logits[p] = st[p].decode(nxt)
                    if b:
                        times[p].append(time.perf_counter() - t)
                same &= all(torch.equal(logits["call"], v) for v in logits.values())
    out = {p: statistics.median(v) for p, v in times.items()}
    out["steps_timed"] = len(times["call"])
    out["same_logits"] = same
    return out


def roof_of(roof: dict, weight_fraction: float) -> float:
    """Roofline tokens/s of a step reading `weight_fraction` of the dense weight bytes (and the whole KV cache)."""
    return roof["batch"] / (roof["weight_stream_s"] * weight_fraction + roof["kv_bytes_per_step"] /
                            (roof["bandwidth_gb_s"] * 1e9))


def roofline(stream: dict, dense_bytes: int, kv: int, B: int, dec: dict, steps: dict) -> dict:
    """The batch's roofline (see the module docstring) from `weight_stream_seconds`' result, with the measured
    decode tokens/s `dec` and ONNX dense step times `steps` set against it."""
    w = stream["best"][B] * dense_bytes / stream["bytes"]        # the buffer holds whole rows: scale to the bytes
    roof = {"batch": B, "bandwidth_gb_s": stream["bandwidth_gb_s"], "weight_stream_s": w,
            "weight_stream_torch_s": stream["torch"][B] * dense_bytes / stream["bytes"],
            "weight_stream_onnxruntime_s": stream["onnxruntime"][B] * dense_bytes / stream["bytes"],
            "weight_bytes_per_step": dense_bytes, "kv_bytes_per_step": kv}
    roof["roofline_tok_s"] = roof_of(roof, 1.0)
    roof["roofline_step_s"] = B / roof["roofline_tok_s"]
    roof["hf_1.5x_target_tok_s"] = 1.5 * dec["hf_eager"]
    roof["target_fraction_of_roofline"] = roof["hf_1.5x_target_tok_s"] / roof["roofline_tok_s"]
    roof["onnx_dense_fraction_of_roofline"] = dec["routefx_onnx_dense"] / roof["roofline_tok_s"]
    roof |= {f"step_{p}_s": steps[p] for p in PATHS}
    roof |= {"steps_timed": steps["steps_timed"], "step_same_logits": steps["same_logits"],
             "step_overhead_s": steps["arrays"] - roof["roofline_step_s"]}
    return roof


def roofline_markdown(roofs: dict | None) -> list[str]:
    """The roofline table and what it says about issue 17's target (ONNX dense decode >= 1.5x HF eager)."""
    if not roofs:
        return []
    L = ["", "Roofline (bench/decode_roofline.py, measured in the same process before each batch's rounds): the "
         "dense decode step's weight bytes streamed through one [B, d] x weights product (torch and a one-MatMul "
         "ONNX Runtime session; the faster), plus the KV cache read once at the mean decode length at the "
         "bandwidth measured at B = 1. Step: one ONNX dense decode step, median of 3 x 60 steps in lockstep by "
         "`Stepper` path: the runner's plain call / IO binding (the KV cache kept as OrtValues) / numpy arrays (the "
         "default: the cache kept as the arrays ONNX Runtime returns); overhead = default step - roofline step.", "",
         "| batch | bandwidth GB/s | stream torch / ORT ms | weights + KV MiB/step | roofline tok/s | ONNX dense "
         "of roofline | 1.5x HF target tok/s | target of roofline | step call / IO binding / arrays ms | "
         "overhead ms |",
         "|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for B, r in roofs.items():
        step = " / ".join(f"{1e3 * r['step_' + p + '_s']:.2f}" for p in PATHS)
        L.append(f"| {B} | {r['bandwidth_gb_s']:.1f} | {1e3 * r['weight_stream_torch_s']:.2f} / "
                 f"{1e3 * r['weight_stream_onnxruntime_s']:.2f} | {r['weight_bytes_per_step'] / 2**20:.0f} + "
                 f"{r['kv_bytes_per_step'] / 2**20:.1f} | {r['roofline_tok_s']:.1f} | "
                 f"{r['onnx_dense_fraction_of_roofline']:.2f} | {r['hf_1.5x_target_tok_s']:.1f} | "
                 f"{r['target_fraction_of_roofline']:.2f} | "
                 f"{step} | {1e3 * r['step_overhead_s']:.2f} |")
    over = [B for B, r in roofs.items() if r["target_fraction_of_roofline"] > 1]
    near = [B for B, r in roofs.items() if 0.9 < r["target_fraction_of_roofline"] <= 1]
    if over:
        L += ["", f"At batch {', '.join(over)} the 1.5x HF target lies above the roofline: no fp32 decode that "
              "reads every weight once per step can reach it on this machine."]
    if near:
        L += ["", f"At batch {', '.join(near)} the 1.5x HF target needs over 90% of the roofline: every step's "
              "non-streaming work (attention, norms, the cache concatenation, the runtime's per-node cost) would "
              "have to fit in the remaining few percent."]
    return L
