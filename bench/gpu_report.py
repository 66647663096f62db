"""Markdown report of bench/gpu.py's results (gpu.json): the whole-model table, then gpu_ffn.run()'s FFN table and
decode steps. `python bench/gpu.py --report gpu.json` prints it again."""
from __future__ import annotations

__all__ = ["report", "ffn_tables"]


def _f(v, spec=".2f"):
    return "–" if v is None else format(v, spec)


def _row_order(key: str):
    fixed = ["hf_eager", "hf_inductor", "hf_inductor_cg", "routefx_dense", "routefx_dense_flex",
             "routefx_dense_causal", "routefx_dense_static", "routefx_dense_cg"]
    if key in fixed:
        return (0, fixed.index(key), 0.0, "")
    base = key.removesuffix("_static").removesuffix("_cg").removesuffix("_flex").removesuffix("_causal")
    try:
        budget = -float(base.rsplit("_", 1)[-1])
    except ValueError:
        budget = 0.0
    return (1, budget, 0.0, key)


def report(res: dict) -> str:
    m = res.get("machine", {})
    v = m.get("versions", {})
    lines = [f"## GPU: whole model, routefx backend `triton` ({m.get('device', '?')})", "",
             f"torch {v.get('torch')}, triton {v.get('triton')}, transformers {v.get('transformers')}, CUDA "
             f"{v.get('cuda')}; {res.get('mode', '')}; command `{res.get('command', '')}`; total "
             f"{_f(res.get('total_seconds'), '.0f')} s.", ""]
    wm = res.get("whole_model")
    if wm:
        s = wm["shape"]
        lines += [f"LlamaForCausalLM, {s['layers']} layers, d={s['d']}, F={s['ffn']}, {s['heads']}/{s['kv_heads']} "
                  f"heads, vocab {s['vocab']}, {wm['dtype']}, batch {s['batch']} x {s['seq']} tokens, random "
                  f"weights; Duo router `{wm['router']}` calibrated on {wm['calibration'][0]} batches of "
                  f"[{wm['calibration'][1]}, {wm['calibration'][2]}]. Medians of {wm.get('timing', {}).get('reps')} "
                  "interleaved rounds in one process. Peak GEMM (torch.mm, FFN up shape): "
                  f"{_f(wm.get('peak_tflops'), '.4g')} TFLOP/s.", "",
                  "| candidate | ms | × inductor | × inductor cg | × routefx dense | FLOP-ideal | efficiency | "
                  "TFLOP/s | MFU | budget on x | compile s (+ first call) | max logit diff |",
                  "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
        for k, c in sorted(wm["candidates"].items(), key=lambda kv: _row_order(kv[0])):
            comp = (f"{_f(c.get('routefx_compile_s'), '.1f')} (+{_f(c.get('first_call_s'), '.1f')})"
                    if "routefx_compile_s" in c else f"(+{_f(c.get('first_call_s'), '.1f')})" if "first_call_s" in c
                    else "–")
            lines.append(f"| {k} | {_f(c.get('latency_ms'))} | {_f(c.get('speedup_vs_hf_inductor'))} | "
                         f"{_f(c.get('speedup_vs_hf_inductor_cg'))} | "
                         f"{_f(c.get('speedup_vs_routefx_dense'))} | {_f(c.get('ideal'))} | {_f(c.get('efficiency'))} | "
                         f"{_f(c.get('tflops'), '.4g')} | {_f(c.get('mfu'))} | {_f(c.get('budget_x'), '.3f')} | {comp} | "
                         f"{_f(c.get('max_logit_diff'), '.3g')} |")
        for k, e in wm.get("errors", {}).items():
            lines.append(f"\n**{k} failed:** `{e}`")
        if wm.get("skipped_for_time"):
            lines.append(f"\nNot compiled (time budget spent): {', '.join(wm['skipped_for_time'])}.")
        if wm.get("targets"):
            lines += ["", "Targets: " + "; ".join(f"{k} {t['target']}: {t['value']} ({'met' if t['met'] else 'NOT met'})"
                                                   for k, t in wm["targets"].items()) + "."]
    if res.get("errors"):
        lines += [""] + [f"**{k} failed:** `{e}`" for k, e in res["errors"].items()]
    ffn = res.get("ffn")
    if ffn is not None:
        lines += ["", "### FFN kernels and decode steps (bench/gpu_ffn.py)", ""]
        if "skipped" in ffn:
            lines.append("skipped: " + ffn["skipped"])
        else:
            lines.append(f"`run({res.get('ffn_run')})`, {res.get('ffn_seconds')} s. Full results: `ffn` in gpu.json.")
            lines += [""] + ffn_tables(ffn)
    return "\n".join(lines) + "\n"



def ffn_tables(ffn: dict) -> list[str]:
    """Markdown of gpu_ffn.run()'s results (FFN table, decode steps), as far as they are there."""
    lines = [f"{ffn.get('device', '?')}, d={ffn.get('d')}, F={ffn.get('F')}, {ffn.get('dtype')}; cuBLAS peak "
             f"{_f(ffn.get('ceilings', {}).get('gemm_tflops'), '.0f')} TFLOP/s.", "",
             "| T | budget | FLOP-ideal | dense ms | reference ms | sorted ms | triton ms | triton × dense | "
             "efficiency ref / sorted / triton | triton TFLOP/s | rel. err |",
             "|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for r in ffn.get("ffn", []):
        ms, ef = r.get("ms", {}), r.get("efficiency", {})
        if not ms:
            lines.append(f"| {r.get('T')} | {r.get('budget')} | error: {r.get('error', '?')[:120]} |")
            continue
        eff = " / ".join(_f(ef.get(k)) for k in ("reference", "sorted", "triton"))
        lines.append(f"| {r['T']} | {r['budget']:g} | {_f(r.get('flop_ideal'))} | {_f(ms.get('dense'), '.3f')} | "
                     f"{_f(ms.get('reference'), '.3f')} | {_f(ms.get('sorted'), '.3f')} | {_f(ms.get('triton'), '.3f')} | "
                     f"{_f(r.get('speedup', {}).get('triton'))} | {eff} | {_f(r.get('tflops', {}).get('triton'), '.0f')} | "
                     f"{_f(r.get('rel_err_vs_ref'), '.1e')} |")
    if ffn.get("decode"):
        cols = list(dict.fromkeys(k for r in ffn["decode"] for k in r.get("ms", {})))  # as gpu_ffn names them
        lines += ["", "Decode-sized steps (ms; `*graph` = CUDA-graph replay, whose capture shows no host sync):", "",
                  "| T | budget | " + " | ".join(cols) + " |", "|---:|---:|" + "---:|" * len(cols)]
        for r in ffn["decode"]:
            ms = r.get("ms", {})
            lines.append(f"| {r['T']} | {r['budget']:g} | " + " | ".join(_f(ms.get(k), '.4f') for k in cols) + " |"
                         + (f" error: {r['error'][:120]}" if "error" in r else ""))
    for e in ffn.get("errors", [])[:5]:
        lines.append(f"\nerror: `{str(e).splitlines()[-1][:200] if str(e).strip() else e}`")
    return lines
