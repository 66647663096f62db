"""ONNX Runtime's profile of the MoE model (routed_ffn lowering) against its dense equivalent, per op type.

    python bench/moe_profile.py [bench/moe.py shape options]     # default: the issue's shape, 1 thread

Both models (bench/moe.py's `build`) are compiled with Dense() once, lowered with the onnx backend's profiler on,
timed interleaved (`--warmup`, `--reps`), then ORT's per-node kernel times are summed per op type (ms per run)
and, for the MoE model, per node (the routed MatMuls are named `<routed_ffn node>/route<r>/<up|gate|down>`).
Output: `--out` if given, else bench/results/moe_profile.json (or /tmp with --smoke).
"""
from __future__ import annotations

import collections
import json
import os
import sys

os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")

import torch  # noqa: E402

import routefx  # noqa: E402
from routefx.backends import onnx as onnx_backend  # noqa: E402
from routefx.timing import CPU_WARM_EACH, median_seconds  # noqa: E402

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import moe  # noqa: E402
from cpu import loadavg  # noqa: E402


def _kernel_times(path: str) -> tuple[dict, dict, int]:
    """({op type: ms per run}, {node: ms per run}, runs) from an ORT profile JSON."""
    with open(path) as f:
        events = json.load(f)
    runs = max(1, sum(1 for e in events if e.get("name") == "model_run"))
    by_type, by_node = collections.Counter(), collections.Counter()
    for e in events:
        if (e.get("cat") == "Node" and e["name"].endswith("_kernel_time")
                and e["args"]["op_name"] not in ("If", "Loop", "Scan")):  # their branches' nodes are listed too
            by_type[e["args"]["op_name"]] += e["dur"] / 1e3 / runs
            by_node[e["name"][:-len("_kernel_time")]] += e["dur"] / 1e3 / runs
    return dict(by_type), dict(by_node), runs


def main(argv=None) -> None:
    argv = list(sys.argv[1:] if argv is None else argv)
    if "--threads" not in argv:
        argv += ["--threads", "1"]
    a = moe.parse_args(argv, name="moe_profile")
    torch.set_num_threads(a.threads)
    g = torch.Generator().manual_seed(0)
    x = {"input_ids": torch.randint(3, a.vocab, (1, a.seq), generator=g),
         "attention_mask": torch.ones(1, a.seq, dtype=torch.long)}
    runners = {}
    for kind in ("moe", "dense"):
        model = moe.build(kind, a)
        cm = routefx.compile(model, routefx.policies.Dense(), example_inputs=(), example_kwargs=x, backend="eager")
        cm(**x)
        gm = cm.graph_module
        kw = {**x, **gm.meta["routefx"].constant_kwargs}
        runners[kind] = (onnx_backend.prepare(gm, kw, profile=True), kw)
        del cm, model
    fns = {k: (lambda r, kw: lambda: r(**kw))(*v) for k, v in runners.items()}
    lat = median_seconds(fns, warmup=a.warmup, reps=a.reps, shuffle_seed=0, warm_each=CPU_WARM_EACH)
    res = {"shape": {k: getattr(a, k) for k in ("layers", "hidden", "experts", "expert_width", "top_k", "seq",
                                                 "threads")}, "load": loadavg(),
           "latency_ms": {k: round(v * 1e3, 2) for k, v in lat.items()},
           "moe_over_dense": round(lat["dense"] / lat["moe"], 3), "op_ms_per_run": {}}
    for kind, (run, _) in runners.items():
        by_type, by_node, runs = _kernel_times(run.end_profiling())
        res["op_ms_per_run"][kind] = {k: round(v, 2) for k, v in sorted(by_type.items(), key=lambda kv: -kv[1])}
        if kind == "moe":
            res["moe_top_nodes_ms"] = {k: round(v, 2) for k, v in sorted(by_node.items(), key=lambda kv: -kv[1])[:20]}
    os.makedirs(os.path.dirname(a.out), exist_ok=True)
    with open(a.out, "w") as f:
        json.dump(res, f, indent=1)
    print(json.dumps({k: res[k] for k in ("latency_ms", "moe_over_dense", "op_ms_per_run")}, indent=1))
    print(f"wrote {a.out}")


if __name__ == "__main__":
    main()
