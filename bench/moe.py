"""MoE CPU benchmark: a Mixtral-shaped model compiled with Dense (MoE blocks as routed_ffn) against Hugging Face
eager, and the dense-equivalent Llama (FFN width = top_k x expert width: the same active FFN FLOPs per token) on the
same backends, all in one process with interleaved, shuffled timing rounds (routefx.timing.median_seconds).

Model (issue 15): MixtralForCausalLM, 4 layers, hidden 1024, 8 experts of width 1408, top-2, 16 query / 4 key-value
heads, vocab 32000, random weights (torch.manual_seed(0)), fp32; dense equivalent: LlamaForCausalLM of the same
shape with FFN 2816. Input: batch 1 x 512 random tokens, attention mask all ones. Threads: 2 (torch and ONNX
Runtime's intra-op pool).

Reported, per backend B in (eager, onnx, inductor):
  speedup vs HF   t(HF MoE eager) / t(routefx MoE on B)           target >= 1.25 for the fastest B
  MoE / dense     t(routefx dense-equivalent on B) / t(routefx MoE on B): the fraction of the FLOP-ideal (equal
                  active FLOPs) the MoE reaches on B                target >= 0.95
  max |logits - HF| of every routefx candidate against its Hugging Face model

Each model is captured and rewritten once (`routefx.compile(..., backend="eager")`); the onnx and inductor
candidates are prepared from that same rewritten graph (`routefx.backends.get_backend(b).prepare`), so the
experts' concatenated weights exist once per model, not once per backend. Memory at the issue's shape: the
previous version (one capture per backend) reached 6.6 GiB resident during timing; this one holds two fewer
copies of the MoE experts (0.55 GiB each). Measured with this version at 2 layers (d=1024, vocab 32000, eager +
onnx): peak 4.55 GiB (the ONNX export's transients), 3.6 GiB resident while timing; at 4 layers with inductor
expect a peak of ~6.5-7 GiB. HF MoE 0.9 GiB,
its routed copy 0.55 GiB, ONNX Runtime's folded and pre-packed expert weights ~1.1 GiB, the dense-equivalent
models and sessions ~1.5 GiB, export transients on top. `--max-rss-gib` (default 7.5) stops preparing further
candidates once the resident memory passes it (reported in "notes"), so the run cannot grow past it by more than
one candidate's preparation; the peak is reported as "peak_rss_gib".

    python bench/moe.py                     # the issue's shape, 2 warm-up + 7 timed rounds -> bench/results/moe.json
    python bench/moe.py --smoke             # a 2-layer hidden-256 model, 128 tokens, 1 + 2 rounds (checks the script)
    python bench/moe.py --layer             # one MoE layer: HF's experts (grouped_mm) vs routed_ffn vs the per-route
                                            # reference vs the dense-equivalent FFN, T = 1, 16, 512 (seconds)
"""
from __future__ import annotations

import argparse
import gc
import json
import os
import sys
import time

os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
os.environ.setdefault("TORCHINDUCTOR_CACHE_DIR", __import__("tempfile").mkdtemp(prefix="routefx_bench_moe_"))

import torch  # noqa: E402
import transformers  # noqa: E402

import routefx  # noqa: E402
from routefx.backends import get_backend  # noqa: E402
from routefx.timing import CPU_WARM_EACH, median_seconds  # noqa: E402

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from cpu import loadavg, machine, rss_gib  # noqa: E402

HERE = os.path.dirname(os.path.abspath(__file__))
BACKENDS = ("eager", "onnx", "inductor")


def build(kind: str, a) -> torch.nn.Module:
    common = dict(vocab_size=a.vocab, hidden_size=a.hidden, num_hidden_layers=a.layers, num_attention_heads=a.heads,
                  num_key_value_heads=a.kv_heads, max_position_embeddings=2048, bos_token_id=1, eos_token_id=2)
    if kind == "moe":
        cfg = transformers.MixtralConfig(intermediate_size=a.expert_width, num_local_experts=a.experts,
                                         num_experts_per_tok=a.top_k, sliding_window=None, **common)
        cls = transformers.MixtralForCausalLM
    else:
        cfg = transformers.LlamaConfig(intermediate_size=a.top_k * a.expert_width, **common)
        cls = transformers.LlamaForCausalLM
    cfg._attn_implementation = "sdpa"
    torch.manual_seed(0)
    return cls(cfg).to(torch.float32).eval()


def parse_args(argv=None, name: str = "moe"):
    """bench/moe.py's options (other MoE scripts share them); `--out` defaults to bench/results/{name}.json, or
    /tmp/routefx_bench_{name}_smoke.json under --smoke."""
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--hidden", type=int, default=1024)
    p.add_argument("--experts", type=int, default=8)
    p.add_argument("--expert-width", type=int, default=1408)
    p.add_argument("--top-k", type=int, default=2)
    p.add_argument("--heads", type=int, default=16)
    p.add_argument("--kv-heads", type=int, default=4)
    p.add_argument("--vocab", type=int, default=32000)
    p.add_argument("--seq", type=int, default=512)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--reps", type=int, default=7)
    p.add_argument("--backends", default=",".join(BACKENDS))
    p.add_argument("--out", default=None, help=f"results JSON (default bench/results/{name}.json)")
    p.add_argument("--smoke", action="store_true")
    p.add_argument("--layer", action="store_true", help="micro-benchmark one MoE layer's experts (bench/moe_layer.py)")
    p.add_argument("--max-rss-gib", type=float, default=7.5)
    p.add_argument("--budget", type=float, default=0.5, help="MoEBudget candidate on onnx (0: none)")
    a = p.parse_args(argv)
    if a.smoke:
        a.layers, a.hidden, a.expert_width, a.heads, a.kv_heads, a.vocab, a.seq = 2, 256, 352, 4, 2, 1000, 128
        a.warmup, a.reps = 1, 2
    if a.out is None:
        a.out = f"/tmp/routefx_bench_{name}_smoke.json" if a.smoke else os.path.join(HERE, "results", f"{name}.json")
    return a


def peak_rss_gib() -> float:
    """This process's peak resident memory (VmHWM)."""
    with open("/proc/self/status") as f:
        return int(next(line for line in f if line.startswith("VmHWM")).split()[1]) / 2**20


def budget_candidate(model, a, x, ref, fns, res) -> None:
    """MoEBudget(a.budget, rule="top_p") on the ONNX backend, calibrated on 2 batches of [2, 256] random tokens;
    its FLOP-ideal over the Dense MoE from routefx's FLOP count with the routes realised on the timed input."""
    name = f"routefx_moebudget_{a.budget:g}_onnx"
    if rss_gib() > a.max_rss_gib:
        res["notes"].append(f"{name}: not prepared, resident memory {rss_gib():.1f} GiB > --max-rss-gib")
        return
    g = torch.Generator().manual_seed(1)
    cal = [{"input_ids": torch.randint(3, a.vocab, (2, min(256, a.seq)), generator=g),
            "attention_mask": torch.ones(2, min(256, a.seq), dtype=torch.long)} for _ in range(2)]
    t = time.perf_counter()
    cm = routefx.compile(model, routefx.policies.MoEBudget(budget=a.budget, rule="top_p"), calibration=cal,
                         backend="onnx")
    with torch.no_grad():
        out = cm(**x).logits
    res["compile_s"][name] = round(time.perf_counter() - t, 2)
    res["max_abs_vs_hf"][name] = float((out - ref).abs().max())   # not a bound: experts are dropped on purpose
    res["flops_per_token_x"][name] = cm.flops_per_token([x])
    res["moebudget_realised_x"] = cm.route_stats([x]).budget
    fns[name] = (lambda m: lambda: m(**x))(cm)
    print(f"prepared {name} in {res['compile_s'][name]} s, realised {res['moebudget_realised_x']:.3f} on x, "
          f"rss {rss_gib():.1f} GiB", flush=True)


def main(argv=None) -> None:
    a = parse_args(argv)
    if a.layer:
        from moe_layer import main as layer_main
        return layer_main(a)
    torch.set_num_threads(a.threads)
    os.environ.setdefault("OMP_NUM_THREADS", str(a.threads))
    backends = [b for b in a.backends.split(",") if b]
    g = torch.Generator().manual_seed(0)
    x = {"input_ids": torch.randint(3, a.vocab, (1, a.seq), generator=g),
         "attention_mask": torch.ones(1, a.seq, dtype=torch.long)}
    res = {"command": " ".join([os.path.basename(sys.executable)] + sys.argv), "machine": machine(),
           "shape": {k: getattr(a, k) for k in ("layers", "hidden", "experts", "expert_width", "top_k", "heads",
                                                 "kv_heads", "vocab", "seq", "threads")},
           "load_before": loadavg(), "compile_s": {}, "max_abs_vs_hf": {}, "notes": []}
    fns, refs = {}, {}
    for kind in ("moe", "dense"):
        model = build(kind, a)
        with torch.no_grad():
            refs[kind] = model(**x).logits
        fns[f"hf_{kind}_eager"] = (lambda m: lambda: m(**x))(model)
        t = time.perf_counter()
        cm = routefx.compile(model, routefx.policies.Dense(), example_inputs=(), example_kwargs=x, backend="eager")
        cm(**x)
        gm = cm.graph_module  # captured and rewritten once; every backend runs this graph
        base_s = time.perf_counter() - t
        if kind == "moe":
            rm = next(p for p in cm.report.passes if p.name == "raise_moe")
            res["raise_moe"] = {"rewrites": rm.rewrites, "misses": rm.misses}
            res["flops_per_token_x"] = {"routefx_moe": cm.flops_per_token([x])}
            moe_model = model
        kw = {**x, **gm.meta["routefx"].constant_kwargs}
        for b in backends:
            name = f"routefx_{kind}_{b}"
            if rss_gib() > a.max_rss_gib:
                res["notes"].append(f"{name}: not prepared, resident memory {rss_gib():.1f} GiB > --max-rss-gib")
                continue
            t = time.perf_counter()
            try:
                run = cm if b == "eager" else get_backend(b).prepare(gm, kw)
                with torch.no_grad():
                    out = run(**x) if b == "eager" else run(**kw)
                out = out.logits if hasattr(out, "logits") else out[0]
            except Exception as e:  # noqa: BLE001 - a backend that fails is reported, the others still run
                res["notes"].append(f"{name}: {type(e).__name__}: {str(e).splitlines()[0][:300]}")
                continue
            res["compile_s"][name] = round(time.perf_counter() - t + base_s, 2)
            res["max_abs_vs_hf"][name] = float((out - refs[kind]).abs().max())
            if b == "onnx" and getattr(run, "onnx_model", None) is not None:
                run.onnx_model = None  # only runner.save() needs the serialized bytes
            fns[name] = (lambda r, k: lambda: r(**k))(run, x if b == "eager" else kw)
            del out
            gc.collect()
            print(f"prepared {name} in {res['compile_s'][name]} s, max |diff| vs HF "
                  f"{res['max_abs_vs_hf'][name]:.2e}, rss {rss_gib():.1f} GiB", flush=True)
        del cm, gm
        gc.collect()
    if a.budget and "onnx" in backends:
        budget_candidate(moe_model, a, x, refs["moe"], fns, res)
    lat = median_seconds(fns, warmup=a.warmup, reps=a.reps, shuffle_seed=0, warm_each=CPU_WARM_EACH)
    res["latency_ms"] = {k: round(v * 1e3, 2) for k, v in lat.items()}
    res["load_after"] = loadavg()
    res["peak_rss_gib"] = round(peak_rss_gib(), 2)
    hf = lat["hf_moe_eager"]
    res["speedup_vs_hf_eager"] = {b: round(hf / lat[f"routefx_moe_{b}"], 3) for b in backends
                                  if f"routefx_moe_{b}" in lat}
    res["moe_over_dense"] = {b: round(lat[f"routefx_dense_{b}"] / lat[f"routefx_moe_{b}"], 3) for b in backends
                             if f"routefx_moe_{b}" in lat and f"routefx_dense_{b}" in lat}
    res["moe_over_dense"]["hf_eager"] = round(lat["hf_dense_eager"] / hf, 3)
    if res["speedup_vs_hf_eager"]:
        best = max(res["speedup_vs_hf_eager"], key=res["speedup_vs_hf_eager"].get)
        res["fastest"] = {"backend": best, "speedup_vs_hf_eager": res["speedup_vs_hf_eager"][best],
                          "moe_over_dense": res["moe_over_dense"].get(best),
                          "targets_met": {"speedup>=1.25": res["speedup_vs_hf_eager"][best] >= 1.25,
                                          "moe/dense>=0.95": (res["moe_over_dense"].get(best) or 0) >= 0.95}}
    name = f"routefx_moebudget_{a.budget:g}_onnx"
    if name in lat and "routefx_moe_onnx" in lat:
        ideal = res["flops_per_token_x"]["routefx_moe"] / res["flops_per_token_x"][name]
        speed = lat["routefx_moe_onnx"] / lat[name]
        res["moebudget"] = {"budget": a.budget, "speedup_vs_moe_onnx": round(speed, 3), "flop_ideal": round(ideal, 3),
                            "efficiency": round(speed / ideal, 3), "target_efficiency>=0.9": speed / ideal >= 0.9}
    os.makedirs(os.path.dirname(a.out), exist_ok=True)
    with open(a.out, "w") as f:
        json.dump(res, f, indent=1)
    print(json.dumps({k: res.get(k) for k in ("latency_ms", "speedup_vs_hf_eager", "moe_over_dense", "max_abs_vs_hf",
                                               "moebudget", "peak_rss_gib", "notes")}, indent=1))
    print(f"cpu: {res['machine']['cpu']}  load {res['load_before']} -> {res['load_after']}  wrote {a.out}")


if __name__ == "__main__":
    main()
