"""Batched-experts MoE on CPU: a Llama-4-shaped text model, whose MoE layers run every expert on every token as
Hugging Face writes them (two batched products over stacked expert weights, the unchosen experts' inputs weighted
0), against the same model compiled by routefx (Dense: RaiseMoE runs each token's chosen experts only), in one
process with interleaved, shuffled timing rounds (routefx.timing.median_seconds).

Model: Llama4ForCausalLM (text), 4 layers, hidden 512, MoE in every layer: 16 experts of width 1024, top-1 (Llama 4
Scout's routing), a shared expert of width 1024; 8 query / 2 key-value heads of 64; vocab 32000; random weights
(seed 0, experts and router re-drawn with std 0.02), fp32. Input: batch 1 x 256 random tokens. Threads: 2.

Reported per candidate: median latency, speedup over Hugging Face eager, and the FLOP-ideal speedup (FLOPs per
token of the captured model / the compiled one, from routefx's FLOP count), with max |logits - HF|.

    python bench/moe_batched.py                 # -> bench/results/moe_batched.json, a table on stdout
    python bench/moe_batched.py --smoke         # 2 layers, 64 tokens, 1 + 2 rounds (checks the script)
"""
from __future__ import annotations

import argparse
import json
import os
import sys

os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")

import torch  # noqa: E402
import transformers  # noqa: E402

import routefx  # noqa: E402
from routefx.timing import CPU_WARM_EACH, median_seconds  # noqa: E402

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from cpu import loadavg, machine  # noqa: E402

HERE = os.path.dirname(os.path.abspath(__file__))


def build(a) -> torch.nn.Module:
    cfg = transformers.Llama4TextConfig(
        vocab_size=a.vocab, hidden_size=a.hidden, intermediate_size=a.expert, intermediate_size_mlp=4 * a.expert,
        num_hidden_layers=a.layers, num_attention_heads=a.hidden // 64, num_key_value_heads=a.hidden // 256,
        head_dim=64, num_local_experts=a.experts, num_experts_per_tok=a.top_k, interleave_moe_layer_step=1,
        max_position_embeddings=4096)
    cfg._attn_implementation = "sdpa"
    torch.manual_seed(0)
    model = transformers.Llama4ForCausalLM(cfg).eval()
    with torch.no_grad():   # Llama 4 initialises the stacked experts to zeros; draw them like the other weights
        for name, p in model.named_parameters():
            if "experts." in name or "router" in name:
                p.normal_(0.0, 0.02)
    return model


def main(argv=None) -> None:
    run(argv, __doc__, build, dict(hidden=512, experts=16, expert=1024, top_k=1), "moe_batched.json",
        lambda a: f"Llama 4 text {a.layers} layers d={a.hidden}, {a.experts} experts x {a.expert} top-{a.top_k} + "
                  f"shared (width {a.expert}), {a.tokens} tokens")


def run(argv, doc: str, build, defaults: dict, out_name: str, title, budgets=False) -> None:
    """The command line of a MoE-family benchmark: its shape arguments (`defaults` for hidden, experts, expert,
    top_k), build the model, time it (`measure`), write bench/results/`out_name` unless --smoke."""
    ap = argparse.ArgumentParser(description=doc, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--hidden", type=int, default=defaults["hidden"])
    ap.add_argument("--experts", type=int, default=defaults["experts"])
    ap.add_argument("--expert", type=int, default=defaults["expert"], help="expert width")
    ap.add_argument("--top-k", type=int, default=defaults["top_k"])
    ap.add_argument("--vocab", type=int, default=32000)
    ap.add_argument("--tokens", type=int, default=256)
    if budgets:
        ap.add_argument("--budget", type=float, default=0.5, help="MoEBudget(top_p) candidate on onnx (0: none)")
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--reps", type=int, default=7)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--smoke", action="store_true")
    ap.add_argument("--out", default=os.path.join(HERE, "results", out_name))
    a = ap.parse_args(argv)
    if a.smoke:
        a.layers, a.tokens, a.warmup, a.reps, a.vocab = 2, 64, 1, 2, 4096
    torch.set_num_threads(a.threads)
    model = build(a)
    x = torch.randint(0, a.vocab, (1, a.tokens), generator=torch.Generator().manual_seed(1))
    shape = {"class": type(model).__name__, "layers": a.layers, "hidden": a.hidden, "experts": a.experts,
             "expert_width": a.expert, "top_k": a.top_k, "vocab": a.vocab, "tokens": a.tokens}
    res = measure(model, x, a, shape, title(a), budgets=(a.budget,) if budgets and a.budget else ())
    if not a.smoke:
        with open(a.out, "w") as f:
            json.dump(res, f, indent=1)
        print("wrote", a.out)


def measure(model, x, a, shape: dict, title: str, budgets=()) -> dict:
    """Hugging Face eager against routefx Dense on eager and onnx (and MoEBudget(b) on onnx for each of `budgets`,
    calibrated on two random batches), in one process with interleaved, shuffled rounds; prints a table and returns
    the results. FLOP-ideal: FLOPs per token of the captured model / the candidate's."""
    with torch.no_grad():
        ref = model(input_ids=x).logits
    cm = routefx.compile(model, routefx.policies.Dense(), example_inputs=(x,), backend="eager")
    flops = {"hf_eager": cm.report.flops_per_token["before"]}     # the captured model's count at x's length
    fns = {"hf_eager": lambda: model(input_ids=x), "routefx_eager": lambda: cm(x)}
    onnx = routefx.compile(model, routefx.policies.Dense(), example_inputs=(x,), backend="onnx")
    fns["routefx_onnx"] = lambda: onnx(x)
    flops["routefx_eager"] = flops["routefx_onnx"] = cm.flops_per_token([{"input_ids": x}])
    gen = torch.Generator().manual_seed(2)
    cal = [{"input_ids": torch.randint(0, a.vocab, x.shape, generator=gen)} for _ in range(2)]
    for b in budgets:
        mb = routefx.compile(model, routefx.policies.MoEBudget(b, rule="top_p"), calibration=cal,
                             example_inputs=(x,), backend="onnx")
        fns[f"moe_budget_{b}_onnx"] = lambda mb=mb: mb(x)
        flops[f"moe_budget_{b}_onnx"] = mb.flops_per_token([{"input_ids": x}])   # the routes realised on x
    err = {}
    for name, fn in fns.items():
        with torch.no_grad():
            out = fn()
        out = out.logits if hasattr(out, "logits") else out[0] if isinstance(out, (tuple, list)) else out
        err[name] = float((out - ref).abs().max())
    load = loadavg()
    t = median_seconds(fns, warmup=a.warmup, reps=a.reps, shuffle_seed=0, warm_each=CPU_WARM_EACH)
    rows = [{"candidate": k, "ms": 1e3 * v, "speedup_vs_hf": t["hf_eager"] / v,
             "flop_ideal": flops["hf_eager"] / flops[k], "max_abs_vs_hf": err[k]} for k, v in t.items()]
    res = {"machine": machine(), "loadavg_before": load, "threads": a.threads, "model": shape,
           "flops_per_token": {"captured": flops["hf_eager"], "compiled": flops["routefx_eager"]},
           "raise_moe": cm.report.pass_report("raise_moe").notes, "rows": rows}
    print(f"{res['machine']['cpu']}, {a.threads} threads; {title}")
    print(f"{'candidate':22} {'ms':>9} {'vs HF':>7} {'FLOP-ideal':>10} {'max|diff|':>10}")
    for r in rows:
        print(f"{r['candidate']:22} {r['ms']:9.1f} {r['speedup_vs_hf']:7.2f} {r['flop_ideal']:10.2f} "
              f"{r['max_abs_vs_hf']:10.2e}")
    return res

if __name__ == "__main__":
    main()
