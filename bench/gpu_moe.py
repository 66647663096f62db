"""GPU MoE benchmark (issue 15 on a GPU): the Mixtral shape of bench/moe.py on one CUDA GPU, routefx backend
"triton" (each MoE block one routed_ffn: K = 2 routes with gates, grouped by expert in the Triton kernels) against
Hugging Face eager and torch.compile, and the dense-equivalent Llama (FFN width = top_k x expert width: equal
active FLOPs) on the same engines; one process, interleaved rounds.

Model: MixtralForCausalLM, 4 layers, d=1024, 8 experts x 1408, top-2, 16/4 heads, vocab 32000, random weights, bf16
(`--layers/--hidden/...` change it); input batch 4 x 2048 random tokens (`--batch/--seq`). Candidates:
    hf_eager, hf_inductor                 the MoE model (transformers' grouped-GEMM experts), eager / torch.compile
    routefx_dense                         routefx.compile(moe, Dense(), backend="triton")
    routefx_moebudget_<b>                 MoEBudget(budget=b, rule="top_p"), calibrated on 2 x [2, 256]
    dense_eq_hf_inductor, dense_eq_routefx  the dense-equivalent Llama, torch.compile / routefx triton Dense
Reported: latency (median), speedup of routefx's MoE over HF eager and inductor, MoE / dense-equivalent on the same
engine (the fraction of the equal-FLOP ideal), MoEBudget's efficiency (speedup over routefx_dense / FLOP-ideal from
routefx's FLOP count on the timed input), max |logits - reference| (HF eager for Dense, the eager backend's graph
for MoEBudget).

    python bench/gpu_moe.py --out DIR [--quick]
    python bench/gpu_moe.py --smoke-cpu     # tiny fp32 shapes on CPU under TRITON_INTERPRET=1 (code paths only)
"""
from __future__ import annotations

import argparse
import gc
import json
import os
import sys
import time
import traceback

if "--smoke-cpu" in sys.argv:
    os.environ.setdefault("TRITON_INTERPRET", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
os.environ.setdefault("TQDM_DISABLE", "1")
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import torch  # noqa: E402
import transformers  # noqa: E402

import routefx  # noqa: E402
from routefx.timing import median_seconds  # noqa: E402
from gpu import batch, eager_graph_logits, json_saver, logits_diff, machine, sync  # noqa: E402

ISSUE = dict(layers=4, hidden=1024, experts=8, expert_width=1408, top_k=2, heads=16, kv_heads=4, vocab=32000,
             batch=4, seq=2048)
SMOKE = dict(layers=2, hidden=64, experts=4, expert_width=48, top_k=2, heads=4, kv_heads=2, vocab=128, batch=2,
             seq=24)


def build(kind: str, s: dict, device, dtype) -> torch.nn.Module:
    common = dict(vocab_size=s["vocab"], hidden_size=s["hidden"], num_hidden_layers=s["layers"],
                  num_attention_heads=s["heads"], num_key_value_heads=s["kv_heads"], max_position_embeddings=4096,
                  bos_token_id=1, eos_token_id=2)
    if kind == "moe":
        cfg = transformers.MixtralConfig(intermediate_size=s["expert_width"], num_local_experts=s["experts"],
                                         num_experts_per_tok=s["top_k"], sliding_window=None, **common)
        cls = transformers.MixtralForCausalLM
    else:
        cfg = transformers.LlamaConfig(intermediate_size=s["top_k"] * s["expert_width"], **common)
        cls = transformers.LlamaForCausalLM
    cfg._attn_implementation = "sdpa"
    torch.manual_seed(0)
    with torch.device(device):
        model = cls(cfg)
    return model.to(dtype).eval()


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", default=None)
    ap.add_argument("--quick", action="store_true", help="1 warm-up + 3 rounds (default 2 + 7)")
    ap.add_argument("--budget", type=float, default=0.5, help="MoEBudget candidate (0: none)")
    ap.add_argument("--time-budget", type=float, default=240.0, help="stop compiling candidates after this many s")
    ap.add_argument("--smoke-cpu", action="store_true")
    for k, v in ISSUE.items():
        ap.add_argument(f"--{k.replace('_', '-')}", type=int, default=None, help=f"default {v}")
    args = ap.parse_args(argv)
    t_start = time.perf_counter()
    device = torch.device("cpu" if args.smoke_cpu else "cuda")
    dtype = torch.float32 if args.smoke_cpu else torch.bfloat16
    s = {k: (getattr(args, k) if getattr(args, k) is not None else v)
         for k, v in (SMOKE if args.smoke_cpu else ISSUE).items()}
    res = {"machine": machine(device), "shape": s, "dtype": str(dtype), "candidates": {}, "errors": {},
           "command": " ".join(sys.argv)}
    c = res["candidates"]

    save = json_saver(args.out, "gpu_moe.json", res)

    gen = torch.Generator().manual_seed(1)
    x = batch(gen, s["batch"], s["seq"], s["vocab"], device)
    cal = [batch(gen, 2, 256 if not args.smoke_cpu else 16, s["vocab"], device) for _ in range(2)]
    moe, dense = build("moe", s, device, dtype), build("dense", s, device, dtype)
    with torch.no_grad():
        refs = {"moe": moe(**x), "dense": dense(**x)}
    fns = {"hf_eager": lambda: moe(**x)}
    todo = [("hf_inductor", moe, None), ("routefx_dense", moe, routefx.policies.Dense()),
            ("dense_eq_hf_inductor", dense, None), ("dense_eq_routefx", dense, routefx.policies.Dense())]
    if args.budget:
        todo.insert(2, (f"routefx_moebudget_{args.budget:g}", moe,
                        routefx.policies.MoEBudget(budget=args.budget, rule="top_p")))
    for key, model, policy in todo:
        if time.perf_counter() - t_start > args.time_budget:
            res["errors"][key] = "skipped: time budget spent"
            continue
        ref = refs["moe" if model is moe else "dense"]
        try:
            t = time.perf_counter()
            if policy is None:
                fn = torch.compile(model)
                with torch.no_grad():
                    out = fn(**x)
                sync(device)()
                c[key] = {"first_call_s": round(time.perf_counter() - t, 2), "max_logit_diff": logits_diff(out, ref)}
                fns[key] = (lambda fn=fn: fn(**x))
            else:
                cm = routefx.compile(model, policy, calibration=cal if policy.needs_calibration else None,
                                     example_inputs=None if policy.needs_calibration else (),
                                     example_kwargs=None if policy.needs_calibration else x, backend="triton")
                with torch.no_grad():
                    out = cm(**x)
                sync(device)()
                dense_policy = isinstance(policy, routefx.policies.Dense)
                c[key] = {"compile_and_first_call_s": round(time.perf_counter() - t, 2), "runner": repr(cm.runner),
                          "flops_per_token_x": cm.flops_per_token([x]),
                          "max_logit_diff": logits_diff(out, ref) if dense_policy else
                          (out.logits.float() - eager_graph_logits(cm, x).logits.float()).abs().max().item(),
                          "check": "hf_eager" if dense_policy else "eager backend, same graph"}
                if not dense_policy:
                    c[key]["budget_x"] = cm.route_stats([x]).budget
                fns[key] = (lambda cm=cm: cm(**x))
            print(f"[gpu_moe] {key}: {c[key]}", flush=True)
        except Exception as e:  # noqa: BLE001 - record and go on
            res["errors"][key] = f"{type(e).__name__}: {str(e)[:300]}"
            traceback.print_exc()
        gc.collect()
        save()
    done = sync(device)
    warmup, reps = (1, 3) if args.quick or args.smoke_cpu else (2, 7)
    med = median_seconds({k: (lambda f=f: (f(), done())) for k, f in fns.items()}, warmup=warmup, reps=reps)
    for k, v in med.items():
        c.setdefault(k, {})["latency_ms"] = v * 1e3
    r = {}
    if "routefx_dense" in med:
        for base in ("hf_eager", "hf_inductor"):
            if base in med:
                r[f"routefx_moe_vs_{base}"] = med[base] / med["routefx_dense"]
        if "dense_eq_routefx" in med:
            r["moe_over_dense_eq_routefx"] = med["dense_eq_routefx"] / med["routefx_dense"]
        key = f"routefx_moebudget_{args.budget:g}"
        if key in med and c[key].get("flops_per_token_x"):
            ideal = c["routefx_dense"]["flops_per_token_x"] / c[key]["flops_per_token_x"]
            r["moebudget_ideal"] = ideal
            r["moebudget_efficiency"] = med["routefx_dense"] / med[key] / ideal
    if "hf_inductor" in med and "dense_eq_hf_inductor" in med:
        r["hf_moe_over_dense_eq_inductor"] = med["dense_eq_hf_inductor"] / med["hf_inductor"]
    res["ratios"] = r
    res["total_seconds"] = round(time.perf_counter() - t_start, 1)
    save()
    print(json.dumps({"ratios": r, "latency_ms": {k: round(v * 1e3, 3) for k, v in med.items()},
                      "errors": res["errors"]}, indent=1))


if __name__ == "__main__":
    main()
