"""The CPU benchmark's report: the summary printed after a run and bench/RESULTS.md, both generated from the
results JSON (bench/cpu.py measures; this module only reads what it measured). Every sentence that states a
finding is computed from the figures in the JSON; a finding the figures do not support is not printed.

    .venv/bin/python bench/report.py bench/results/cpu.json bench/RESULTS.md     # regenerate RESULTS.md
"""
from __future__ import annotations

import json
import sys

DENSE = "onnx_dense"
TARGETS = {"dense_vs_eager": 1.0, "dense_vs_inductor": 0.9, "duo_efficiency": 0.9, "duo_efficiency_aim": 0.95,
           "dense_mfu": 0.8, "compile_seconds_no_calibration": 30.0}


def _shape(res: dict) -> tuple[int, int, int, int, int]:
    """(layers, hidden, FFN width, batch, sequence length) of the measured run."""
    m, s = res["model"], res["settings"]
    return m["layers"], m["hidden"], m["intermediate"], s["batch"], s["seq"]


def profile_notes(res: dict) -> tuple[list[str], list[dict]]:
    """What the profiles say, computed: GEMM rates, index-op overhead, FLOP-free time and, from the dense
    profile, each Duo candidate's efficiency ceiling if its FFN GEMMs shrank exactly with FLOPs and every other
    kernel kept its dense time (Amdahl: FLOPs do not count norms, softmax, masking, element-wise ops)."""
    prof, c = res.get("profiles") or {}, res["candidates"]
    d = prof.get(DENSE)
    if not d:
        return [], []
    cls_ffn, cls_mm = "FFN MatMul (routed_ffn up/gate/down)", "other MatMul/Gemm (attention proj., scores, LM head, routers)"
    cls_idx = "index/shape ops (TopK, Gather, ScatterND, Equal, ArgMax, Reshape, ...)"
    ffn_d, mm_d = d["by_class_ms"].get(cls_ffn, 0.0), d["by_class_ms"].get(cls_mm, 0.0)
    total_d = d["kernel_ms_per_run"]
    fixed_d = total_d - ffn_d - mm_d
    mask_d = d["by_op_ms"].get("Where", 0.0) + d["by_op_ms"].get("IsNaN", 0.0)
    layers, d_model, ffn, _, _ = _shape(res)
    ffn_dense_fpt = layers * 2.0 * 3 * d_model * ffn
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
             f"{mask_d:.0f} ms ({mask_d / total_d:.0%}) (the exported attention's NaN guard over the softmax)."]
    for k, pr in prof.items():
        if k == DENSE:
            continue
        idx = pr["by_class_ms"].get(cls_idx, 0.0) - d["by_class_ms"].get(cls_idx, 0.0)
        rate, rate_d = pr.get("ffn_matmul_gflops"), d.get("ffn_matmul_gflops")
        per_flop = "" if not rate or not rate_d else (
            f": the per-route GEMMs on gathered rows run at {rate / rate_d:.2f}x the dense GEMM rate per FLOP")
        notes.append(f"{k}: FFN MatMuls run at {fmt(rate, '.0f')} GFLOP/s (dense {fmt(rate_d, '.0f')}){per_flop}; "
                     f"the routing ops (TopK, Gather, ScatterND, Equal, ArgMax, ConstantOfShape, ...) add "
                     f"{idx:.1f} ms per run over dense ({idx / pr['kernel_ms_per_run']:.1%} of its kernel time).")
    if rows:
        below = [r["candidate"].removeprefix("duo_") for r in rows if r["ceiling"] < TARGETS["duo_efficiency"]]
        gaps = [r["measured"] - r["ceiling"] for r in rows]
        notes.append("Efficiency ceiling from the dense profile (FFN GEMM time scaled by the FFN FLOPs realised on "
                     "x, all other kernels at their dense time) vs measured: " + "; ".join(
                         f"{r['candidate'].removeprefix('duo_')} {r['ceiling']:.2f} / {r['measured']:.2f}"
                         for r in rows) + "."
                     + (f" The ceiling alone is below {TARGETS['duo_efficiency']} for {', '.join(below)}." if below
                        else "")
                     + f" Measured minus ceiling: {min(gaps):+.2f} to {max(gaps):+.2f}; the profiles do not "
                     "attribute that remainder.")
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
    _, _, _, batch, seq = _shape(res)
    p = res["peak"]
    print(f"\n== batch {batch} x {seq} tokens, fp32, {res['machine']['torch_threads']} threads; median of "
          f"{res['settings']['reps']} interleaved rounds (order shuffled per round); peak {p['gflops']:.1f} GFLOP/s "
          f"({p['best']}; " + ", ".join(f"{k} {v:.1f}" for k, v in p["rates_gflops"].items()) + ")")
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
    layers, d_model, ffn, batch, seq = _shape(res)
    mod, p = res["model"], res["peak"]
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
         f"Model: Llama-shaped `LlamaForCausalLM` from a config ({layers} layers, hidden {d_model}, FFN {ffn}, "
         f"{mod['heads']}/{mod['kv_heads']} heads, vocab {mod['vocab']}), random weights (seed 0), fp32. Measured "
         f"input: batch {batch} x {seq} random tokens, mask all ones. Duo calibration: {s['cal_batches']} batches of "
         f"[{s['cal_batch']}, {s['cal_seq']}] random tokens (seeded). Latency: median of {s['reps']} interleaved rounds "
         f"after {s['warmup']} warm-up rounds, every candidate (and the peak MatMuls) in the same rounds, in an "
         "order shuffled per round (seeded), one process.",
         "",
         "Speedup is against routefx ONNX dense, measured in the same rounds. FLOP-ideal = dense FLOPs per token / "
         "the candidate's FLOPs per token with the routes it realised on the measured input (1.0 for eager and "
         "inductor). Efficiency = speedup / FLOP-ideal. Budget = realised FFN compute fraction (skip 0, small 0.25, "
         f"big 1). MFU = FLOPs/token x {batch * seq} / latency / peak, peak = the fastest of torch.mm and ONNX "
         f"Runtime MatMul (routefx's session options, weight an initializer), fp32, on {' and on '.join(p['shapes'])}, "
         f"timed in the same rounds: **{p['gflops']:.1f} GFLOP/s** ({p['best']}; "
         + ", ".join(f"{k} {v:.1f}" for k, v in p["rates_gflops"].items()) + "). "
         "Compile = routefx.compile wall time minus `report.calibration_seconds`, the same rule for every routefx "
         "candidate (capture, recognition, passes, FLOP counting, ONNX export, fold, optimize, session); for "
         "inductor, the first call (with an empty inductor cache).", "",
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
          "`report.capture_seconds` covers capture, recognition and FLOP counting of the captured graph; "
          "`calibration_seconds` the calibration stage (statistics, router training) and the budget step (route "
          "statistics and the λ search on the rewritten graph); `compile_seconds` the pass pipeline, FLOP counting "
          "of the result and the FLOPs realised on the calibration data; `runner.timings` the ONNX backend's prepare "
          "(export, fold, optimize, session). 'Without calibration' is the wall time minus `calibration_seconds` "
          "for every candidate.", "",
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
    """What the run covers and does not, with every figure taken from `res`."""
    c, m = res["candidates"], res["machine"]
    _, _, _, batch, seq = _shape(res)
    d = c.get(DENSE, {})
    duo = {k: v for k, v in c.items() if k.startswith("duo_") and v.get("efficiency") is not None}
    eff = ", ".join(f"{k.removeprefix('duo_')} {v['efficiency']:.2f}" for k, v in duo.items())
    drift = [(k.removeprefix("duo_"), v["budget_x"], v["budget_calibration"]) for k, v in duo.items()
             if v.get("budget_calibration") is not None and abs(v["budget_x"] - v["budget_calibration"]) > 0.05]
    share = res.get("timing_conditions", {}).get("cpu_share")
    text = (f"Measured on {m['cpu']} with {m['cpu_count']} cores, in one process with interleaved rounds: routefx's "
            "ONNX backend against the HF model in eager PyTorch"
            + (" and under inductor" if c.get("inductor", {}).get("latency_s") else "")
            + " at equal thread count; the "
            "part of the FLOP reduction promised by Duo's realised routes that turns into wall-clock speedup "
            f"(efficiencies: {eff or 'none measured'}); the dense graph's rate against the peak above (MFU "
            f"{fmt(d.get('mfu'), '.2f')}); and compile times. Not measured: quality (the weights are random, so a "
            "budget says how much compute the routes take, not what it costs in loss), other input lengths than "
            f"{seq} and batch sizes than {batch}, other dtypes than fp32, KV-cache generation.")
    if drift:
        text += (" Budgets are fitted on the calibration data (sequences of "
                 f"{res['settings']['cal_seq']} tokens) and differ by more than 0.05 on the {seq}-token input: "
                 + ", ".join(f"{k} {bx:.2f} on x vs {bc:.2f} on calibration" for k, bx, bc in drift)
                 + "; the FLOP-ideal and efficiency use the routes realised on x.")
    if share is not None:
        text += (f" This process got {share:.2f} of the {m['torch_threads']} cores' CPU time while timing"
                 + (" (below 0.85: the machine was shared and the ratios are disturbed)." if share < 0.85 else "."))
    return text


def main(argv=None) -> None:
    json_path, md_path = (argv or sys.argv[1:])[:2]
    with open(json_path) as f:
        write_markdown(json.load(f), md_path)
    print(f"wrote {md_path} from {json_path}")


if __name__ == "__main__":
    main()
def overall_targets(res): return {}
