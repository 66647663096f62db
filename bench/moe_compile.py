"""Compile time of a MoE model with many experts on the ONNX backend, per phase.

    python bench/moe_compile.py [--experts 128] [--layers 12] [--top-k 8] [--out FILE]

Model: Qwen3-MoE-shaped (transformers' Qwen3MoeForCausalLM) at tiny widths (hidden 64, expert width 32, vocab
from the family sweep's tiny config), random weights, so what is timed is the per-expert work of the compiler,
not the weights: routefx lowers each expert of each layer to its own ONNX nodes (~7: the row gather, up / gate /
down MatMuls, the activation) on pre-packed constant weights, so a 12-layer model of 128 experts exports ~12k
ONNX nodes. Reports `routefx.compile(model, Dense(), backend="onnx")` wall time and its phases (capture, passes,
the ONNX runner's export / fold / optimize / fuse / serialize / session), the ONNX node count and one call's
time on the sweep's padded batch, with the machine's CPU named.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time

os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")

import onnx  # noqa: E402
import torch  # noqa: E402
import transformers  # noqa: E402

import routefx  # noqa: E402

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
import family_sweep as fs  # noqa: E402
from cpu import machine  # noqa: E402


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--experts", type=int, default=128)
    p.add_argument("--layers", type=int, default=12)
    p.add_argument("--top-k", type=int, default=8)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--out", default=None, help="results JSON (default: print only)")
    a = p.parse_args(argv)
    torch.set_num_threads(a.threads)
    cfg = fs.tiny_config("qwen3_moe")
    cfg.num_experts, cfg.num_hidden_layers, cfg.num_experts_per_tok = a.experts, a.layers, a.top_k
    torch.manual_seed(0)
    model = transformers.Qwen3MoeForCausalLM(cfg).eval()
    ids, mask = fs.inputs()
    x = {"input_ids": ids, "attention_mask": mask}
    t = time.perf_counter()
    cm = routefx.compile(model, routefx.policies.Dense(), example_inputs=(), example_kwargs=x, backend="onnx")
    wall = time.perf_counter() - t
    with torch.no_grad():
        ref = model(**x, use_cache=False).logits
        out = cm(**x).logits
        cm(**x)
        t = time.perf_counter()
        cm(**x)
        call_ms = (time.perf_counter() - t) * 1e3
    graph = onnx.load_from_string(cm.runner.onnx_model).graph
    res = {"machine": machine(), "model": {"experts": a.experts, "layers": a.layers, "top_k": a.top_k,
                                           "hidden": cfg.hidden_size, "expert_width": cfg.moe_intermediate_size},
           "compile_s": round(wall, 2), "capture_s": round(cm.report.capture_seconds, 2),
           "passes_s": round(cm.report.compile_seconds, 2),
           "onnx_s": {k: round(v, 2) for k, v in cm.runner.timings.items()},
           "onnx_nodes": len(graph.node), "call_ms": round(call_ms, 2),
           "max_abs_vs_hf": float((out - ref)[mask.bool()].abs().max())}
    print(json.dumps(res, indent=1))
    if a.out:
        with open(a.out, "w") as f:
            json.dump(res, f, indent=1)


if __name__ == "__main__":
    main()
