"""The CPU benchmark's report: the summary printed after a run and bench/RESULTS.md, both generated from the
results JSON (bench/cpu.py measures; this module only reads what it measured). Every sentence that states a
finding is computed from the figures in the JSON; a finding the figures do not support is not printed.

    .venv/bin/python bench/report.py bench/results/cpu.json bench/RESULTS.md     # regenerate RESULTS.md
"""
from __future__ import annotations

import json
import sys

DENSE = "onnx_dense"
TORCH = ("eager", "inductor")
ROUTEFX_DENSE = (DENSE, "inductor_dense")
# issue 14's targets
TARGETS = {"routefx_dense_vs_best_torch": 1.05, "duo_efficiency": {0.75: 0.92, 0.5: 0.92, 0.25: 0.88},
           "static_efficiency": 0.95, "onnx_dense_vs_eager": 1.2, "compile_seconds": 15.0, "rss_over_weights": 1.5,
           "max_logit_diff": 1e-4}
_CLS_FFN = "FFN MatMul (routed_ffn up/gate/down)"
_CLS_MM = "other MatMul/Gemm (attention proj., scores, LM head, routers)"


def fmt(v, spec_=".2f", none="–"):
    return none if v is None else format(v, spec_)


def _lat(c: dict, k: str):
    return (c.get(k) or {}).get("latency_s")


def assess(sr: dict) -> dict:
    """One shape's figures against issue 14's targets."""
    c, out = sr["candidates"], {}
    rfx = {k: _lat(c, k) for k in ROUTEFX_DENSE if _lat(c, k)}
    tch = {k: _lat(c, k) for k in TORCH if _lat(c, k)}
    if rfx and tch:
        kr, kt = min(rfx, key=rfx.get), min(tch, key=tch.get)
        v = tch[kt] / rfx[kr]
        out["routefx_dense_vs_best_torch"] = {"target": f">= {TARGETS['routefx_dense_vs_best_torch']}x",
                                              "value": round(v, 3), "detail": f"{kr} vs {kt}",
                                              "met": v >= TARGETS["routefx_dense_vs_best_torch"]}
    misses, worst = [], None
    for k, v in c.items():
        if not k.startswith("duo_") or v.get("efficiency_vs_best_dense") is None:
            continue
        b = v["policy"].get("budget")
        need = TARGETS["static_efficiency"] if k.startswith("duo_static") else TARGETS["duo_efficiency"].get(b)
        if need is None:
            continue
        e = v["efficiency_vs_best_dense"]
        worst = k if worst is None or e < c[worst]["efficiency_vs_best_dense"] else worst
        if e < need:
            misses.append(f"{k} {e:.3f} < {need}")
    if worst is not None:
        out["duo_efficiency_vs_best_dense"] = {"target": ">= 0.92 at 0.75/0.5, >= 0.88 at 0.25, static >= 0.95",
                                               "value": round(c[worst]["efficiency_vs_best_dense"], 3),
                                               "detail": f"worst {worst}; misses: {', '.join(misses) or 'none'}",
                                               "met": not misses}
    e, d = _lat(c, "eager"), _lat(c, DENSE)
    if e and d:
        ratio = sr.get("peak", {}).get("ffn_onnx_over_torch")
        out["onnx_dense_vs_eager"] = {"target": f">= {TARGETS['onnx_dense_vs_eager']}x where ORT's GEMMs match "
                                                "torch's", "value": round(e / d, 3),
                                      "detail": f"ORT/torch GEMM rate on the FFN shape {fmt(ratio, '.2f')}",
                                      "met": e / d >= TARGETS["onnx_dense_vs_eager"]}
    comp = {k: v["compile"]["without_calibration_s"] for k, v in c.items()
            if v.get("compile") and (k == DENSE or k.startswith("duo_"))}
    if comp:
        k = max(comp, key=comp.get)
        out["compile_without_calibration"] = {"target": f"<= {TARGETS['compile_seconds']:g} s (ONNX dense and Duo)",
                                              "value": comp[k], "detail": f"worst {k}; ONNX dense {comp.get(DENSE)}",
                                              "met": comp[k] <= TARGETS["compile_seconds"]}
    fp = (sr.get("fresh_process") or {}).get(DENSE)
    if fp and "peak_over_weights" in fp:
        out["fresh_process_rss"] = {"target": f"<= {TARGETS['rss_over_weights']}x weight bytes",
                                    "value": round(fp["peak_over_weights"], 3),
                                    "detail": f"peak {fp['peak_gib']:.2f} GiB, weights {fp['weight_bytes'] / 2**30:.2f}"
                                              f" GiB, empty process {fp['baseline_gib']:.2f} GiB",
                                    "met": fp["peak_over_weights"] <= TARGETS["rss_over_weights"]}
    checks = sr.get("checks") or {}
    if checks:
        k = max(checks, key=checks.get)
        out["max_logit_diff"] = {"target": f"<= {TARGETS['max_logit_diff']:g}", "value": checks[k],
                                 "detail": k, "met": checks[k] <= TARGETS["max_logit_diff"]}
    return out


def overall_targets(res: dict) -> dict:
    return {name: sr.get("targets", {}) for name, sr in res["shapes"].items()}


def _shape_title(name: str, sr: dict) -> str:
    m, s = sr["model"], sr["settings"]
    return (f"shape {name}: {m['layers']} layers, hidden {m['hidden']}, FFN {m['intermediate']}, {m['heads']}/"
            f"{m['kv_heads']} heads, vocab {m['vocab']}; batch {s['batch']} x {s['seq']} tokens")


def print_summary(res: dict) -> None:
    for name, sr in res["shapes"].items():
        p = sr["peak"]
        print(f"\n== {_shape_title(name, sr)}; best dense engine {sr.get('best_dense')}; GEMM GFLOP/s "
              + ", ".join(f"{k} {v:.1f}" for k, v in p["rates_gflops"].items()))
        print(f"{'candidate':34s} {'ms':>8s} {'vs ONNXd':>8s} {'vs best':>8s} {'ideal':>6s} {'eff':>5s} "
              f"{'eff*':>5s} {'ceil':>5s} {'bud(x)':>6s} {'compile':>8s}")
        for k, v in sr["candidates"].items():
            if v.get("latency_s") is None:
                print(f"{v['label']:34s} error: {str(v.get('error'))[:90]}")
                continue
            comp = v.get("compile") or {}
            print(f"{v['label']:34s} {v['latency_s'] * 1e3:8.1f} {v['speedup']:7.3f}x "
                  f"{v['speedup_vs_best_dense']:7.3f}x {v['ideal']:6.3f} {v['efficiency']:5.3f} "
                  f"{v['efficiency_vs_best_dense']:5.3f} {fmt(v.get('ceiling_efficiency'), '5.3f'):>5s} "
                  f"{fmt(v.get('budget_x'), '6.3f'):>6s} {fmt(comp.get('without_calibration_s'), '7.1f'):>7s}s")
        print("  targets:")
        for k, a in sr.get("targets", {}).items():
            met = {True: "MET", False: "NOT MET", None: "n/a"}[a["met"]]
            print(f"    {k:30s} {a['target']:45s} {a['value']}  {met}  {a.get('detail', '')}")


def _machine_lines(res: dict) -> list[str]:
    m, tc = res["machine"], res.get("timing_conditions", {})
    return [f"Command: `{res['command']}` (from the repository root)  ",
            f"Date: {res['date']}  ",
            f"Machine: **{m['cpu']}**, {m['cpu_count']} cores, ISA flags: {', '.join(m['simd']) or 'none found'}; "
            f"{m['mem_total_gib']} GiB; torch {m['versions']['torch']} ({m['torch_threads']} threads), onnxruntime "
            f"{m['versions']['onnxruntime']} ({m['ort_intra_op_threads']} intra-op threads), transformers "
            f"{m['versions']['transformers']}, Python {m['python']}  ",
            f"Total run time: {res['total_seconds'] / 60:.1f} min; while timing, load average "
            f"{tc.get('loadavg_before')} -> {tc.get('loadavg_after')}, CPU share of this process {tc.get('cpu_share')} "
            f"(1.0 = all {m['torch_threads']} threads' cores were this process's)"]


def _shape_section(name: str, sr: dict, res: dict) -> list[str]:
    s, p = res["settings"], sr["peak"]
    c = sr["candidates"]
    L = [f"## {_shape_title(name, sr)}", "",
         f"Best dense engine in these rounds: **{c[sr['best_dense']]['label']}**. GEMM rates measured in the same "
         "rounds (fp32, GFLOP/s; ONNX Runtime MatMul with the weight an initializer and routefx's session options, "
         f"torch.mm): " + ", ".join(f"{k} {v:.1f}" for k, v in p["rates_gflops"].items())
         + f"; on the FFN shape {p['shapes'][0]} ONNX Runtime runs at **{p['ffn_onnx_over_torch']:.2f}x** torch's "
         "rate.", "",
         "| candidate | ms | vs ONNX dense | vs best dense | FLOP-ideal | efficiency (vs ONNX dense) | efficiency (vs "
         "best dense) | ceiling | budget (x) | budget (cal) | MFU | compile s | calibration s |",
         "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for k, v in c.items():
        comp = v.get("compile") or {}
        if v.get("latency_s") is None:
            L.append(f"| {v['label']} | error: {v.get('error')} |" + " |" * 11)
            continue
        L.append(f"| {v['label']} | {v['latency_s'] * 1e3:.1f} | {v['speedup']:.3f} | "
                 f"{v['speedup_vs_best_dense']:.3f} | {v['ideal']:.3f} | {v['efficiency']:.3f} | "
                 f"{v['efficiency_vs_best_dense']:.3f} | {fmt(v.get('ceiling_efficiency'), '.3f')} | "
                 f"{fmt(v.get('budget_x'), '.3f')} | {fmt(v.get('budget_calibration'), '.3f')} | {v['mfu']:.3f} | "
                 f"{fmt(comp.get('without_calibration_s'), '.1f')} | {fmt(comp.get('calibration_s'), '.1f')} |")
    ceil = sr.get("ceiling")
    prof = sr.get("profile_dense") or {}
    if ceil:
        L += ["", f"Efficiency ceiling (from the ONNX dense profile, {prof.get('runs')} profiled runs): FFN GEMMs "
              f"take **{ceil['ffn_time_fraction']:.0%}** of dense kernel time (other MatMuls "
              f"{prof['by_class_ms'].get(_CLS_MM, 0.0) / prof['kernel_ms_per_run']:.0%}, everything else "
              f"{prof.get('non_matmul_ms', 0.0) / prof['kernel_ms_per_run']:.0%}). If only FFN time shrank with the "
              "FFN FLOPs, the best attainable speedup at FFN fraction b would be 1 / (1 - f + f b): "
              + ", ".join(f"b={b} {v:.2f}x" for b, v in ceil["by_budget"].items() if b != "1")
              + ". The 'ceiling' column is that bound at each candidate's realised FFN fraction, divided by its "
              "FLOP-ideal (the FLOP-ideal also counts attention FLOPs, which do not shrink); top op types: "
              + ", ".join(f"{o} {v:.1f} ms" for o, v in list(prof.get("by_op_ms", {}).items())[:6]) + "."]
    elif prof.get("error"):
        L += ["", f"Dense profile failed: {prof['error']}"]
    L += ["", "Compile phases (wall seconds; capture = capture + recognition + FLOPs; passes = `compile_seconds`; "
          "then the ONNX backend's prepare: export from the captured graph, weight-slice fold, optimizer, fusions "
          "to ONNX Runtime's fused kernels, weights handed to ONNX Runtime, session creation; CPU = process CPU "
          "seconds of the whole compile and of prepare's phases):", "",
          "| candidate | wall | CPU | capture | calibration | passes | export (path) | fold | optimize | fuse | "
          "serialize | session | prepare CPU | without calibration | weights MiB |",
          "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    fusions = {}
    for k, v in c.items():
        comp = v.get("compile")
        if not comp:
            continue
        pp = comp.get("onnx_prepare_s", {})
        pc = comp.get("onnx_prepare_cpu_s") or {}
        fusions.update({k: comp["onnx_fusions"]} if comp.get("onnx_fusions") is not None else {})
        L.append(f"| {v['label']} | {comp['wall_s']:.1f} | {fmt(comp.get('cpu_s'), '.1f')} | "
                 f"{fmt(comp.get('capture_s'), '.1f')} | "
                 f"{fmt(comp.get('calibration_s'), '.1f')} | {fmt(comp.get('compile_s'), '.1f')} | "
                 f"{fmt(pp.get('export'), '.1f')} ({comp.get('export_path') or '–'}) | {fmt(pp.get('fold'), '.1f')} | "
                 f"{fmt(pp.get('optimize'), '.1f')} | {fmt(pp.get('fuse'), '.2f')} | {fmt(pp.get('serialize'), '.1f')} | "
                 f"{fmt(pp.get('session'), '.1f')} | {fmt(sum(pc.values()) if pc else None, '.1f')} | "
                 f"{comp['without_calibration_s']:.1f} | {fmt(comp.get('onnx_model_mib'), '.0f')} |")
    if DENSE in fusions:
        L += ["", "Fused-kernel rewrites in ONNX dense: " + (", ".join(f"{n} x{m}" for n, m in fusions[DENSE].items())
                                                          or "none") + "."]
    fp = sr.get("fresh_process") or {}
    if fp:
        L += ["", "Memory of a fresh process (numpy + onnxruntime only) that loads the saved model (external data) "
              "and runs it once on the measured input:", "",
              "| model | weights MiB | files MiB | empty process GiB | after load GiB | peak GiB | peak / weights | "
              "(peak - empty) / weights |", "|---|---:|---:|---:|---:|---:|---:|---:|"]
        for k, r in fp.items():
            if "error" in r:
                L.append(f"| {k} | error: {r['error']} |" + " |" * 6)
                continue
            L.append(f"| {k} | {r['weight_bytes'] / 2**20:.0f} | {sum(r['file_bytes'].values()) / 2**20:.0f} | "
                     f"{r['baseline_gib']:.2f} | {r['after_load_gib']:.2f} | {r['peak_gib']:.2f} | "
                     f"{r['peak_over_weights']:.2f} | {r['peak_minus_baseline_over_weights']:.2f} |")
    checks = sr.get("checks") or {}
    if checks:
        L += ["", "Numerical checks (max |logits - HF eager logits| on the measured input): "
              + ", ".join(f"{k} {v:.2e}" for k, v in checks.items()) + "."]
    L += ["", "Targets (issue 14):", "", "| target | required | measured | met |", "|---|---|---|---|"]
    for k, a in sr.get("targets", {}).items():
        met = {True: "yes", False: "**no**", None: "n/a"}[a["met"]]
        L.append(f"| {k} | {a['target']} | {a['value']} ({a.get('detail', '')}) | {met} |")
    return L


def write_markdown(res: dict, path: str) -> None:
    s = res["settings"]
    L = ["# CPU benchmark results", ""] + _machine_lines(res) + [
        "",
        f"Models: Llama-shaped `LlamaForCausalLM` from configs, random weights (seed 0), fp32, two shapes ("
        + "; ".join(_shape_title(n, sr) for n, sr in res["shapes"].items()) + "), random token ids, mask all ones. "
        f"Duo calibration: {s['cal_batches']} batches of [{s['cal_batch']}, min({s['cal_seq']}, seq)] random tokens "
        f"(seeded). Latency: median of {s['reps']} rounds after {s['warmup']} warm-up rounds; every candidate of "
        "both shapes and the GEMM probes run in the same rounds, in an order shuffled per round (seeded), in one "
        "process" + (f", each timed call right after {s['warm_each']} untimed calls of the same candidate (none timed "
                     "while another one's threads spin or caches hold another model: routefx.timing)."
                     if s.get("warm_each") else "."),
        "",
        "FLOP-ideal = dense FLOPs per token / the candidate's FLOPs per token with the routes it realised on the "
        "measured input. Efficiency = speedup / FLOP-ideal, against routefx ONNX dense and against the fastest dense "
        "engine of the same rounds (torch eager, torch.compile inductor, routefx ONNX or inductor dense). Budget = "
        "realised FFN compute fraction. MFU = FLOPs/token x tokens / latency / the fastest GEMM rate measured. "
        "Compile = routefx.compile wall time minus `report.calibration_seconds`; for inductor, its first call "
        "(empty inductor cache)."]
    for name, sr in res["shapes"].items():
        L += [""] + _shape_section(name, sr, res)
    L += ["", "## What this shows / what it does not", "", discussion(res)]
    with open(path, "w") as f:
        f.write("\n".join(L).rstrip() + "\n")


def discussion(res: dict) -> str:
    m, tc = res["machine"], res.get("timing_conditions", {})
    share = tc.get("cpu_share")
    text = (f"Measured on {m['cpu']} ({m['cpu_count']} cores), both shapes in one process with interleaved rounds. "
            "Not measured: quality (random weights: a budget says how much compute the routes take, not what it "
            "costs in loss), other batch sizes and lengths, other dtypes than fp32, KV-cache generation. The "
            "ceiling assumes every non-FFN kernel keeps its dense time; it comes from ONNX Runtime's profiler, "
            "whose per-node timing adds overhead, so it is a share, not a latency.")
    for name, sr in res["shapes"].items():
        drift = [(k.removeprefix("duo_"), v["budget_x"], v["budget_calibration"]) for k, v in
                 sr["candidates"].items() if k.startswith("duo_") and v.get("budget_calibration") is not None
                 and v.get("budget_x") is not None and abs(v["budget_x"] - v["budget_calibration"]) > 0.05]
        if drift:
            text += (f" Shape {name}: budgets fitted on calibration data differ by more than 0.05 on the measured "
                     "input (" + ", ".join(f"{k} {bx:.2f} vs {bc:.2f}" for k, bx, bc in drift)
                     + "); FLOP-ideal and efficiency use the routes realised on the measured input.")
    if share is not None:
        text += (f" This process got {share:.2f} of its {m['torch_threads']} threads' CPU time while timing"
                 + (" (below 0.85: the machine was shared with other work; absolute times are inflated and ratios "
                    "disturbed)." if share < 0.85 else "."))
    return text


def main(argv=None) -> None:
    json_path, md_path = (argv or sys.argv[1:])[:2]
    with open(json_path) as f:
        write_markdown(json.load(f), md_path)
    print(f"wrote {md_path} from {json_path}")


if __name__ == "__main__":
    main()
