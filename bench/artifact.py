"""Artifact figures on the CPU benchmark model: size on disk, load time and peak memory of a fresh process.

Model: bench/cpu.py's (a Llama-shaped `LlamaForCausalLM`, 8 layers, hidden 1024, FFN 2816, 16 / 4 heads, vocab
32000, random weights, fp32), built by its `build_model`. Dense and Duo(0.5, local router, nested small branch;
calibrated on 2 batches of [2, 256] random tokens) are compiled with backend="onnx" and exported with
`routefx.export`. Each artifact is then measured in fresh subprocesses (`python -c`, nothing imported before):

  size            bytes per file, against the model's fp32 parameter bytes (the "weight bytes")
  load            seconds for `routefx.runtime.load(path)` (manifest and checksums verified, ONNX Runtime session
                  created on the optimized model), and for `import routefx.runtime` before it
  forward         seconds of the first call on [1, 512] tokens (attention mask all ones)
  peak RSS        the child's own high-water mark (VmHWM) after load + one forward (targets: load <= 3 s, peak
                  RSS <= 1.5 x weight bytes), and of a child that only imports numpy, onnxruntime and
                  routefx.runtime (the interpreter's own share); `ru_maxrss` is recorded too (see `child`)
  variants        (--diagnose) the same child opening the optimized model with plain onnxruntime under other
                  session options, to see where memory goes: ORT's defaults, routefx.runtime's options, the CPU
                  arena off, weight prepacking off, initializers through the device allocator

Prints the CPU model name and a table; writes bench/results/artifact.json and the "Artifacts" section at the end of
bench/RESULTS.md (replaced on every run; bench/report.py regenerating RESULTS.md drops it: rerun with
--report-only to put it back).

    .venv/bin/python bench/artifact.py                # the real run (~5 min on 2 cores, ~6 GiB RSS at most)
    .venv/bin/python bench/artifact.py --smoke        # a 2-layer hidden-256 model, results to /tmp
    .venv/bin/python bench/artifact.py --diagnose     # also the session-option variants
    .venv/bin/python bench/artifact.py --report-only  # RESULTS.md's section from bench/results/artifact.json
    .venv/bin/python bench/artifact.py --keep DIR     # keep the artifacts; --reuse DIR measures them again
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
MARK = "<!-- bench/artifact.py -->"

# One fresh interpreter per measurement: argv = [mode, artifact path, options JSON]
_CHILD = r"""
import json, resource, sys, time
t0, c0 = time.perf_counter(), time.process_time()
import numpy as np
import onnxruntime as ort
import routefx.runtime
mode, path, opts = sys.argv[1], sys.argv[2], json.loads(sys.argv[3])
t1, c1 = time.perf_counter(), time.process_time()
rec = {"import_s": t1 - t0}
if mode != "import":
    if mode == "session":
        sess = routefx.runtime.load(path)
        run = lambda feed: sess(**feed)
    else:                                              # plain onnxruntime with the given options
        so = ort.SessionOptions()
        for k, v in opts.get("attrs", {}).items():
            setattr(so, k, getattr(ort.GraphOptimizationLevel, v) if k == "graph_optimization_level" else v)
        for k, v in opts.get("config", {}).items():
            so.add_session_config_entry(k, v)
        s = ort.InferenceSession(f"{path}/model.opt.onnx", sess_options=so, providers=["CPUExecutionProvider"])
        run = lambda feed: s.run(None, feed)
    t2, c2 = time.perf_counter(), time.process_time()
    rec["load_s"] = t2 - t1
    rec["load_cpu_s"] = c2 - c1
    with open("/proc/self/status") as f:
        rec["rss_after_load"] = int(next(l for l in f if l.startswith("VmHWM")).split()[1]) * 1024
    rng = np.random.default_rng(0)
    ids = rng.integers(3, opts["vocab"], (1, opts["seq"]))
    run({"input_ids": ids, "attention_mask": np.ones_like(ids)})
    t3, c3 = time.perf_counter(), time.process_time()
    rec["forward_s"], rec["forward_cpu_s"] = t3 - t2, c3 - c2
    run({"input_ids": ids, "attention_mask": np.ones_like(ids)})
    rec["forward2_s"], rec["forward2_cpu_s"] = time.perf_counter() - t3, time.process_time() - c3
def hwm():                                             # this process image's own peak (see `child`)
    with open("/proc/self/status") as f:
        return int(next(l for l in f if l.startswith("VmHWM")).split()[1]) * 1024
rec["peak_rss"] = hwm()
rec["ru_maxrss"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024     # Linux: KiB
print("RESULT " + json.dumps(rec))
"""

# (name, mode, options) of --diagnose; DISABLE_ALL as routefx.runtime opens the optimized model
_OFF = {"graph_optimization_level": "ORT_DISABLE_ALL"}
VARIANTS = [
    ("ort defaults (opt level all)", "plain", {}),
    ("routefx options: opt off", "plain", {"attrs": dict(_OFF)}),
    ("opt off, CPU arena off", "plain", {"attrs": {**_OFF, "enable_cpu_mem_arena": False}}),
    ("opt off, prepacking off", "plain", {"attrs": dict(_OFF), "config": {"session.disable_prepacking": "1"}}),
    ("opt off, initializers via device allocator", "plain",
     {"attrs": dict(_OFF), "config": {"session.use_device_allocator_for_initializers": "1"}}),
]


def child(mode: str, path: str, opts: dict, repeat: int = 1) -> dict:
    """The measurement in a fresh interpreter (the fastest of `repeat` runs for times, the largest peak RSS).

    Peak RSS is the child's VmHWM (/proc/self/status: the high-water mark of its own address space).
    `getrusage(RUSAGE_SELF).ru_maxrss` is reported too, but Linux carries the parent's resident size at fork
    into it across exec, so in a child of this (torch-holding) process it reads at least the parent's RSS."""
    recs = []
    for _ in range(repeat):
        proc = subprocess.run([sys.executable, "-c", _CHILD, mode, path, json.dumps(opts)], capture_output=True,
                              text=True, env={**os.environ, "PYTHONPATH": ROOT}, timeout=600)
        if proc.returncode != 0:
            raise RuntimeError(f"child {mode} {path} failed:\n{proc.stderr[-3000:]}")
        recs.append(json.loads(proc.stdout.split("RESULT ", 1)[1]))
    out = {k: min(r[k] for r in recs) for k in recs[0] if k.endswith("_s")}
    out.update({k: max(r[k] for r in recs) for k in recs[0] if "rss" in k})
    return out


def cpu_name() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            return next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        import platform
        return platform.processor() or "unknown"


def build_and_export(shape, out_dir: str) -> dict:
    import torch

    import routefx
    sys.path.insert(0, HERE)
    from cpu import batch, build_model
    model = build_model(shape)
    weight_bytes = sum(p.numel() * p.element_size() for p in model.parameters())
    gen = torch.Generator().manual_seed(1)
    cal = [batch(gen, 2, min(256, shape.seq), shape.vocab) for _ in range(2)]
    arts = {}
    for name, policy in [("dense", routefx.policies.Dense()),
                         ("duo_0.5_nested", routefx.policies.Duo(budget=0.5, router="local", small="nested"))]:
        t = time.perf_counter()
        cm = routefx.compile(model, policy, calibration=cal, backend="onnx")
        compile_s = time.perf_counter() - t
        t = time.perf_counter()
        path = routefx.export(cm, os.path.join(out_dir, name), overwrite=True)
        arts[name] = {"path": path, "compile_s": round(compile_s, 2), "export_s": round(time.perf_counter() - t, 2)}
        arts[name]["files"] = {os.path.relpath(os.path.join(d, f), path): os.path.getsize(os.path.join(d, f))
                               for d, _, fs in os.walk(path) for f in fs}
        del cm
    return {"weight_bytes": weight_bytes, "artifacts": arts}


def measure(res: dict, shape, diagnose: bool, repeat: int) -> None:
    opts = {"vocab": shape.vocab, "seq": shape.seq}
    res["loadavg_before"] = os.getloadavg()
    res["import_only"] = child("import", "-", opts, repeat)
    for name, art in res["artifacts"].items():
        art["session"] = child("session", art["path"], opts, repeat)
        if diagnose:
            art["variants"] = {v: child(mode, art["path"], {**opts, **o}) for v, mode, o in VARIANTS}
    res["loadavg_after"] = os.getloadavg()


def _t(rec: dict, what: str) -> str:
    cpu = rec.get(f"{what}_cpu_s")
    return f"{rec[f'{what}_s']:.2f}" + (f" [{cpu:.2f}]" if cpu is not None else "")


def _mib(n: float) -> str:
    return f"{n / 2**20:,.1f}"


def _load(res: dict) -> str:
    if "loadavg_before" not in res:
        return "not recorded"
    return f"{res['loadavg_before'][0]:.2f} / {res['loadavg_after'][0]:.2f}"


def markdown(res: dict) -> str:
    w = res["weight_bytes"]
    L = [MARK, "## Artifacts (`routefx.export` / `routefx.load`)", "",
         f"Command: `{res['command']}`  ", f"Date: {res['date']}  ",
         f"CPU: {res['cpu']} ({res['cpu_count']} logical CPUs); onnxruntime {res['versions']['onnxruntime']}, "
         f"torch {res['versions']['torch']}  ",
         f"Model: bench/cpu.py's Llama shape {res['shape']}, fp32 weight bytes {_mib(w)} MiB; input [1, "
         f"{res['shape']['seq']}]. Each figure from fresh subprocesses (best of {res['repeat']} for times, "
         "largest peak RSS).", "",
         "Times are wall seconds, with the child's CPU seconds (user + system, all threads) in brackets (wall "
         "times are inflated when other jobs share the cores; 1-minute load average before / after the "
         f"measurements: {_load(res)}); the second forward is the steady state.", "",
         "| artifact | files (MiB) | total / weights | import s | load s | first forward s | second forward s "
         "| peak RSS MiB | peak RSS / weights |", "|---|---|---|---|---|---|---|---|---|"]
    for name, a in res["artifacts"].items():
        total = sum(a["files"].values())
        files = ", ".join(f"{f} {_mib(b)}" for f, b in sorted(a["files"].items()))
        s = a["session"]
        L.append(f"| {name} | {files} | {total / w:.3f} | {s['import_s']:.2f} | {_t(s, 'load')} | "
                 f"{_t(s, 'forward')} | {_t(s, 'forward2')} | {_mib(s['peak_rss'])} | {s['peak_rss'] / w:.2f} |")
    imp = res["import_only"]
    L += ["", f"A child that only imports numpy, onnxruntime and routefx.runtime peaks at {_mib(imp['peak_rss'])} MiB "
          f"({imp['import_s']:.2f} s).  ",
          "Targets: load <= 3 s; peak RSS of a fresh process that loads and runs one forward <= 1.5 x weight bytes."]
    for name, a in res["artifacts"].items():
        s = a["session"]
        L.append(f"- {name}: load {'meets' if s['load_s'] <= 3 else 'misses'} the target ({s['load_s']:.2f} s); "
                 f"peak RSS {'meets' if s['peak_rss'] <= 1.5 * w else 'misses'} it ({s['peak_rss'] / w:.2f} x).")
    if any("variants" in a for a in res["artifacts"].values()):
        L += ["", "Where the memory and load time go (plain onnxruntime on model.opt.onnx in a fresh process: peak "
              "RSS MiB after session creation / after two forwards; load, first and second forward s [CPU s]):", "",
              "| options | " + " | ".join(res["artifacts"]) + " |", "|---|" + "---|" * len(res["artifacts"])]
        for v, _, _ in VARIANTS:
            cells = []
            for a in res["artifacts"].values():
                r = a.get("variants", {}).get(v)
                cells.append(f"{_mib(r['rss_after_load'])} / {_mib(r['peak_rss'])} MiB; load {_t(r, 'load')}, "
                             f"fwd {_t(r, 'forward')}, {_t(r, 'forward2')}" if r else "")
            L.append(f"| {v} | " + " | ".join(cells) + " |")
    if res.get("notes"):
        L += [""] + [f"- {n}" for n in res["notes"]]
    return "\n".join(L) + "\n"


END = "<!-- end bench/artifact.py -->"


def write_section(res: dict, path: str) -> None:
    """Replace this script's section of RESULTS.md (from MARK to END; a section written before END existed runs to
    the next level-2 heading), keeping what follows it (e.g. bench/generate.py's section)."""
    text = open(path).read() if os.path.exists(path) else ""
    tail = ""
    if MARK in text:
        head, rest = text[:text.index(MARK)], text[text.index(MARK) + len(MARK):]
        if END in rest:
            tail = rest[rest.index(END) + len(END):]
        else:
            start = rest.find("## Artifacts") + 1
            found = [i for i in (rest.find("\n## ", start), rest.find("\n<!-- ", start)) if i >= 0]
            tail = rest[min(found):] if found else ""
        text = head.rstrip("\n") + "\n\n"
    with open(path, "w") as f:
        f.write(text + markdown(res) + END + "\n" + tail)


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--smoke", action="store_true", help="a small model, results to /tmp")
    p.add_argument("--diagnose", action="store_true", help="also session-option variants")
    p.add_argument("--repeat", type=int, default=3, help="fresh processes per measurement")
    p.add_argument("--report-only", action="store_true")
    p.add_argument("--note", action="append", default=[], help="a line for the RESULTS.md section")
    p.add_argument("--keep", help="write the artifacts (and build.json) to this directory and keep them")
    p.add_argument("--reuse", help="measure the artifacts a --keep run left in this directory (no compile)")
    a = p.parse_args(argv)
    out_json = os.path.join(tempfile.gettempdir() if a.smoke else os.path.join(HERE, "results"), "artifact.json")
    results_md = os.path.join(tempfile.gettempdir(), "RESULTS_artifact.md") if a.smoke else \
        os.path.join(HERE, "RESULTS.md")
    if a.report_only:
        with open(out_json) as f:
            write_section(json.load(f), results_md)
        return
    import dataclasses

    import onnxruntime as ort
    import torch
    sys.path.insert(0, HERE)
    from cpu import FULL, SMOKE
    shape = SMOKE if a.smoke else FULL
    print("CPU:", cpu_name(), flush=True)
    if a.reuse:
        with open(os.path.join(a.reuse, "build.json")) as f:
            res = json.load(f)
        measure(res, shape, a.diagnose, a.repeat)
    elif a.keep:
        os.makedirs(a.keep, exist_ok=True)
        res = build_and_export(shape, a.keep)
        with open(os.path.join(a.keep, "build.json"), "w") as f:
            json.dump(res, f)
        measure(res, shape, a.diagnose, a.repeat)
    else:
        with tempfile.TemporaryDirectory(prefix="routefx_artifacts_") as tmp:
            res = build_and_export(shape, tmp)
            measure(res, shape, a.diagnose, a.repeat)
    res.update({"command": "python bench/artifact.py " + " ".join(argv if argv is not None else sys.argv[1:]),
                "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), "cpu": cpu_name(),
                "cpu_count": os.cpu_count(), "repeat": a.repeat, "shape": dataclasses.asdict(shape),
                "versions": {"onnxruntime": ort.__version__, "torch": torch.__version__}, "notes": a.note})
    for art in res["artifacts"].values():
        art.pop("path")
    os.makedirs(os.path.dirname(out_json), exist_ok=True)
    with open(out_json, "w") as f:
        json.dump(res, f, indent=1)
    write_section(res, results_md)
    print(markdown(res))


if __name__ == "__main__":
    main()
