"""Router hoisting on CPU: Duo(budget, router="local") with and without `hoist=True`, one process, interleaved;
with --moe, MoEBudget(--budget) with and without pre-gating (`hoist=True`) on the Mixtral-shaped MoE model.

Model: the dense Llama of bench/moe.py (the issue-15 dense equivalent: 4 layers, d=1024, F=2816, 16/4 heads,
vocab 32000, random weights, fp32), calibrated on 4 random batches of 1 x 256; timed on 1 x --seq tokens, on
eager and onnx. Reported per backend: latency with and without hoisting and their ratio (> 1: hoisting pays),
the realised budget of each plan on the calibration data and its compute fraction on the timed input (the two
plans route differently, so compare the latency ratio with the ratio of fractions), and the held-out mean KL to
the dense model (hoisted routers see one layer less). With --moe the model is bench/moe.py's MoE, "kl_vs_dense"
is to that model's own (un-hoisted) output, and "pregate_fit" holds the calibration record of each pre-gating
router (held-out logit R², top-k agreement with the block's own router, and the same for the own router applied
to the previous block's input, unfitted).

    python bench/hoist.py            # the issue's dense-equivalent shape -> bench/results/hoist.json
    python bench/hoist.py --smoke    # 2 layers, d=256, 128 tokens (checks the script)
    python bench/hoist.py --moe --budget 1.0    # MoE pre-gating at full top-k -> bench/results/hoist_moe.json
"""
from __future__ import annotations

import json
import os
import sys
import time

os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

import routefx  # noqa: E402
from routefx.policies import Duo, MoEBudget  # noqa: E402
from routefx.timing import CPU_WARM_EACH, median_seconds  # noqa: E402

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import moe  # noqa: E402
from cpu import loadavg, machine  # noqa: E402


def _kl(ref, out) -> float:
    p, q = F.log_softmax(ref.double(), -1), F.log_softmax(out.double(), -1)
    return float((p.exp() * (p - q)).sum(-1).mean())


def main(argv=None) -> None:
    argv = list(sys.argv[1:] if argv is None else argv)
    moe_model = "--moe" in argv
    a = moe.parse_args([v for v in argv if v != "--moe"], name="hoist_moe" if moe_model else "hoist")
    torch.set_num_threads(a.threads)
    backends = [b for b in a.backends.split(",") if b in ("eager", "onnx")] or ["eager", "onnx"]
    g = torch.Generator().manual_seed(0)
    mk = lambda s: {"input_ids": torch.randint(3, a.vocab, (1, s), generator=g),  # noqa: E731
                    "attention_mask": torch.ones(1, s, dtype=torch.long)}
    cal = [mk(min(256, a.seq)) for _ in range(4)]
    x = mk(a.seq)
    model = moe.build("moe" if moe_model else "dense", a)
    with torch.no_grad():
        ref = model(**x).logits
    res = {"machine": machine(), "load_before": loadavg(), "shape": {k: getattr(a, k) for k in (
        "layers", "hidden", "expert_width", "top_k", "seq", "threads")}, "budget": {}, "kl_vs_dense": {},
        "compile_s": {}}
    fns = {}
    plans = {}
    for hoist in (False, True):
        tag = "hoist" if hoist else "local"
        t = time.perf_counter()
        policy = MoEBudget(budget=a.budget, hoist=hoist) if moe_model else Duo(budget=0.5, router="local",
                                                                                 hoist=hoist)
        cm = routefx.compile(model, policy, calibration=cal, backend="eager")
        plans[tag] = cm.plan
        if hoist and moe_model:
            res["pregate_fit"] = cm.plan.calibration["moe_hoist"]
        res["budget"][tag] = cm.report.plan["budget"]["realised"]
        res.setdefault("fraction_on_timed_input", {})[tag] = round(cm.route_stats([x]).budget, 4)
        for b in backends:
            run = cm if b == "eager" else routefx.compile(model, cm.plan, backend=b)
            with torch.no_grad():
                out = run(**x).logits
            res["kl_vs_dense"][f"{tag}_{b}"] = _kl(ref, out)
            fns[f"{tag}_{b}"] = (lambda r: lambda: r(**x))(run)
        res["compile_s"][tag] = round(time.perf_counter() - t, 1)
        print(f"compiled {tag} in {res['compile_s'][tag]} s, budget {res['budget'][tag]:.3f}", flush=True)
    lat = median_seconds(fns, warmup=a.warmup, reps=a.reps, shuffle_seed=0, warm_each=CPU_WARM_EACH)
    res["latency_ms"] = {k: round(v * 1e3, 2) for k, v in lat.items()}
    res["hoist_speedup"] = {b: round(lat[f"local_{b}"] / lat[f"hoist_{b}"], 3) for b in backends}
    res["load_after"] = loadavg()
    os.makedirs(os.path.dirname(a.out), exist_ok=True)
    with open(a.out, "w") as f:
        json.dump(res, f, indent=1)
    print(json.dumps({k: res[k] for k in ("latency_ms", "hoist_speedup", "budget", "fraction_on_timed_input",
                                           "kl_vs_dense", "pregate_fit") if k in res}, indent=1))
    print(f"load {res['load_before']} -> {res['load_after']}  wrote {a.out}")


if __name__ == "__main__":
    main()
