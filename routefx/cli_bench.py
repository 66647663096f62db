"""`routefx bench` and `routefx analyze`: timing of dense against policies, and where a router sends tokens.

bench: every policy compiled on one backend; median of interleaved runs in one process (`routefx.timing`), each
policy's measured speedup over dense next to its FLOP-ideal (dense FLOPs per token / the policy's, with the routes
realised on the benchmark input) and their ratio (efficiency); the CPU's name and thread count are printed.

analyze: the policy compiled on the eager backend; per routed layer the fraction of tokens sent to each route,
and a token x layer map of the routes taken on one sequence, drawn with matplotlib (`--plot out.png`).

Hook for the quality study: `COMPARISONS` maps a name to `fn(cm, loaded, batch) -> RouteMap`, a routing to draw
and tabulate beside the router's (an oracle, a trained router); `routefx analyze --compare NAME` runs it. A
`--compare package.module:function` is imported on demand, so nothing has to register at import time.
"""
from __future__ import annotations

import dataclasses
import importlib
import os
import platform
import re
from typing import Callable

__all__ = ["add_commands", "compile_policies", "bench_policies", "bench_compiled", "format_bench", "busy_note", "cpu_name", "RouteMap", "route_map", "COMPARISONS", "plot_routes"]


def cpu_name() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine() or "unknown CPU"


def compile_policies(model, policies: dict, calibration, x: dict, backend: str) -> dict:
    """{"dense": Dense compiled, label: `model` compiled by each of `policies` ({label: Policy})}, on `backend`,
    each already compiled for the input form of `x`."""
    import routefx
    compiled = {"dense": routefx.compile(model, routefx.policies.Dense(), backend=backend, example_inputs=(),
                                         example_kwargs=x)}
    for label, policy in policies.items():
        compiled[label] = routefx.compile(model, policy, backend=backend, calibration=calibration)
        compiled[label](**x)
    return compiled


def _busy_jiffies() -> int | None:
    """CPU time all processes spent busy since boot, in clock ticks (/proc/stat), or None off Linux."""
    try:
        with open("/proc/stat") as f:
            fields = [int(v) for v in f.readline().split()[1:]]
    except (OSError, ValueError):
        return None
    return sum(fields) - fields[3] - (fields[4] if len(fields) > 4 else 0)  # all but idle and iowait


class _OthersWatch:
    """How many cores' worth of CPU time other processes used while a block ran (the machine's busy time from
    /proc/stat minus this process's own; None where /proc/stat is missing)."""

    def __enter__(self):
        self._busy, self._own = _busy_jiffies(), os.times()
        return self

    def __exit__(self, *exc):
        busy, own = _busy_jiffies(), os.times()
        wall = own.elapsed - self._own.elapsed
        self.others_cores = None
        if busy is not None and self._busy is not None and wall > 0:
            mine = (own.user - self._own.user) + (own.system - self._own.system)
            self.others_cores = max(0.0, (busy - self._busy) / os.sysconf("SC_CLK_TCK") - mine) / wall
        return False


def busy_note(rows: list[dict] | None = None) -> str:
    """A warning when other processes loaded the machine (then ratios of times are not trustworthy), else "".
    With `rows` from `bench_compiled`: the CPU time other processes used while those were timed; without: the
    load average (which counts this process too)."""
    others = rows[0].get("others_cores") if rows else None
    if others is not None:
        if others <= 0.25:
            return ""
        return (f"WARNING: other processes used {others:.1f} cores on average while these were timed: these times "
                "(and their ratios) are unreliable; rerun on an idle machine")
    try:
        load, cores = os.getloadavg()[0], os.cpu_count() or 1
    except OSError:
        return ""
    if load <= 0.5 * cores:
        return ""
    return (f"WARNING: load average {load:.1f} on {cores} cores: other processes share the CPU, so these times "
            "(and their ratios) are unreliable; rerun on an idle machine")


def bench_policies(model, policies: dict, calibration, x: dict, backend: str, reps: int = 9) -> list[dict]:
    """Compile `model` by each of `policies` (`compile_policies`) and time them (`bench_compiled`)."""
    return bench_compiled(compile_policies(model, policies, calibration, x, backend), x, reps)


def bench_compiled(compiled: dict, x: dict, reps: int = 9, baselines: dict | None = None) -> list[dict]:
    """Time `compiled` ({label: CompiledModel}, "dense" among them) on `x` (interleaved, median) and count FLOPs
    per token with the routes taken on `x`. Rows: label, ms, speedup (over dense), ideal (FLOP-ideal speedup),
    efficiency, flops, budget (realised, routed policies only). `baselines` ({label: fn()}, e.g. the uncompiled
    model) are timed in the same rounds and listed first, with dense's FLOPs (the same function computed
    another way)."""
    from routefx.timing import CPU_WARM_EACH, median_seconds
    baselines = dict(baselines or {})
    clash = set(baselines) & set(compiled)
    if clash:
        raise ValueError(f"baseline labels {sorted(clash)} are also compiled models' labels")
    fns = {**baselines, **{k: (lambda cm=cm: cm(**x)) for k, cm in compiled.items()}}
    with _OthersWatch() as watch:
        times = median_seconds(fns, reps=reps, shuffle_seed=0, warm_each=CPU_WARM_EACH)
    flops = {k: cm.flops_per_token([x]) for k, cm in compiled.items()}
    rows = []
    for k in fns:
        cm = compiled.get(k)
        budget = cm.route_stats([x]).budget if cm is not None and getattr(cm.policy, "budget", None) is not None \
            else None
        f = flops[k] if cm is not None else flops["dense"]
        speed, ideal = times["dense"] / times[k], flops["dense"] / f
        rows.append({"label": k, "ms": times[k] * 1e3, "speedup": speed, "ideal": ideal, "efficiency": speed / ideal,
                     "flops": f, "budget": budget, "others_cores": watch.others_cores})
    return rows


def format_bench(rows: list[dict]) -> str:
    width = max([14] + [len(r["label"]) + 2 for r in rows])
    lines = [f"{'policy':<{width}}{'ms':>9}{'speedup':>9}{'FLOP-ideal':>12}{'efficiency':>12}{'FLOPs/token':>15}"
             f"{'budget':>8}"]
    for r in rows:
        budget = "" if r["budget"] is None else f"{r['budget']:.3f}"
        lines.append(f"{r['label']:<{width}}{r['ms']:9.2f}{r['speedup']:8.2f}x{r['ideal']:11.2f}x"
                     f"{r['efficiency']:12.2f}{r['flops']:15,.0f}{budget:>8}")
    return "\n".join(lines)


# ---------------------------------------------------------------- routing maps

@dataclasses.dataclass
class RouteMap:
    """Routes taken on one sequence. routes: [S, L] route ids (-1 at padding); layers: L layer keys;
    names: route names (skip/small/big); costs: compute fraction per route; tokens: S strings or None."""
    name: str
    routes: object
    layers: list[str]
    names: list[str]
    costs: list[float]
    tokens: list[str] | None = None

    def fractions(self):
        """[L, R] fraction of real tokens per route at each layer."""
        import numpy as np
        r = np.asarray(self.routes)
        real = r[:, 0] >= 0
        return np.stack([np.bincount(r[real, j], minlength=len(self.names)) / max(real.sum(), 1)
                         for j in range(r.shape[1])])

    def budget(self) -> float:
        import numpy as np
        return float((self.fractions() * np.asarray(self.costs)).sum(-1).mean())


# name -> fn(cm, loaded, batch) -> RouteMap   (the quality study registers e.g. "oracle"; see the module doc)
COMPARISONS: dict[str, Callable] = {}


def route_map(cm, batch: dict, tokens: list[str] | None = None, name: str = "router") -> RouteMap:
    """The routes `cm` (a compiled routed model) takes on row 0 of `batch`, read from its graph."""
    import numpy as np
    from routefx.calibrate.budget import _costs, _routed_ops
    from routefx.calibrate.record import run_recording
    entry, (full,) = cm._batch_entry([batch])               # the graph for this input form, canonical kwargs
    ops = _routed_ops(entry.gm, entry.ir)
    if not ops:
        raise _cli_error(f"the policy {cm.policy!r} leaves no routed FFN: nothing to map")
    vals = run_recording(entry.gm, full, [n.args[1] for _, n in ops])
    B, S = batch["input_ids"].shape
    cols = [vals[n.args[1]].reshape(B, S)[0].cpu().numpy() for _, n in ops]      # L x [S]
    routes = np.stack(cols, axis=1).astype(np.int64)                            # [S, L]
    if "attention_mask" in batch:
        routes[batch["attention_mask"][0].cpu().numpy() == 0] = -1
    width = len(ops[0][1].args[9]) // 2
    names = ["skip", "small", "big"] if width == 3 else [f"route{i}" for i in range(width)]
    return RouteMap(name, routes, [k for k, _ in ops], names, _costs(ops[0][1]).tolist(), tokens)


def _cli_error(msg: str):
    from routefx.cli_inputs import CliError
    return CliError(msg)


def plot_routes(maps: list[RouteMap], path: str, title: str = "") -> str:
    """Draw, per map, the token x layer routing map and the per-layer route mix; write a PNG to `path`."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
        from matplotlib.colors import ListedColormap
    except ImportError:
        raise _cli_error("--plot needs matplotlib: pip install 'routefx[plots]'") from None
    import numpy as np
    palette = ["#d9d9d9", "#9ecae1", "#08519c", "#fd8d3c", "#31a354", "#756bb1"]
    fig, axes = plt.subplots(len(maps), 2, figsize=(14, 2.6 + 1.2 * len(maps) + 0.18 * len(maps[0].layers)),
                             gridspec_kw={"width_ratios": [4, 1]}, squeeze=False)
    for (ax_map, ax_bar), m in zip(axes, maps):
        r = np.asarray(m.routes).T.astype(float)                                  # [L, S]
        r[r < 0] = np.nan
        cmap = ListedColormap(palette[:len(m.names)]).with_extremes(bad="white")
        ax_map.imshow(r, aspect="auto", interpolation="nearest", cmap=cmap, vmin=-0.5, vmax=len(m.names) - 0.5)
        ax_map.set_yticks(range(len(m.layers)), [_short(k) for k in m.layers], fontsize=7)
        ax_map.set_ylabel("layer")
        ax_map.set_title(f"{m.name}: routes per token (budget {m.budget():.2f})", fontsize=9)
        if m.tokens is not None and len(m.tokens) <= 96:
            ax_map.set_xticks(range(len(m.tokens)), [repr(t)[1:-1][:8] for t in m.tokens], rotation=90,
                              fontsize=6)
        else:
            ax_map.set_xlabel("token position")
        frac = m.fractions()                                                     # [L, R]
        left = np.zeros(len(m.layers))
        for j, n in enumerate(m.names):
            ax_bar.barh(range(len(m.layers)), frac[:, j], left=left, color=palette[j], label=n)
            left += frac[:, j]
        ax_bar.set_ylim(len(m.layers) - 0.5, -0.5)
        ax_bar.set_yticks([])
        ax_bar.set_xlim(0, 1)
        ax_bar.set_xlabel("fraction of tokens")
        ax_bar.legend(fontsize=7, loc="lower right")
    if title:
        fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def _short(key: str) -> str:
    """'model.layers.3.mlp' -> '3' (the first number in a layer key), else the key itself."""
    found = re.search(r"\d+", key)
    return found.group(0) if found else key


def _comparison(name: str) -> Callable:
    if name in COMPARISONS:
        return COMPARISONS[name]
    if ":" in name:
        module, _, attr = name.partition(":")
        try:
            fn = getattr(importlib.import_module(module), attr, None)
        except ImportError as e:
            raise _cli_error(f"--compare {name!r}: cannot import {module!r} ({e})") from None
        if callable(fn):
            return fn
    raise _cli_error(f"--compare {name!r}: not a registered comparison ({', '.join(sorted(COMPARISONS)) or 'none'}"
                     " registered) nor an importable package.module:function")


# ---------------------------------------------------------------- commands

def add_commands(sub, add_model_args) -> None:
    p = sub.add_parser("bench", help="time dense against policies (measured speedup next to FLOP-ideal)")
    add_model_args(p)
    p.add_argument("--policy", action="append", required=True, help="a policy spec; repeat for several")
    p.add_argument("--backend", choices=("onnx", "eager", "inductor"), default="onnx")
    p.add_argument("--input", metavar="FILE", help="benchmark tokens (default: the first calibration batch)")
    p.add_argument("--reps", type=int, default=9, help="timed rounds (median)")
    p.set_defaults(func=cmd_bench)

    p = sub.add_parser("analyze", help="per-layer route fractions and a token x layer routing map")
    add_model_args(p)
    p.add_argument("--policy", required=True, help="a routing policy spec, e.g. duo:0.5")
    p.add_argument("--input", metavar="FILE", help="tokens to analyse (default: the first calibration batch)")
    p.add_argument("--text", help="text to map (tokenised with the model's tokenizer)")
    p.add_argument("--plot", metavar="PNG", help="write the routing map here")
    p.add_argument("--compare", action="append", default=[], metavar="NAME",
                   help="another routing to show beside the router's (a registered name or package.module:fn)")
    p.set_defaults(func=cmd_analyze)


def _eval_batch(args, loaded, calibration):
    from routefx.cli_inputs import read_token_file
    if getattr(args, "text", None):
        import torch
        from routefx.cli_inputs import _encode
        if loaded.tokenizer is None:
            raise _cli_error("--text needs a model with a tokenizer; give --input FILE (.safetensors ids)")
        ids = torch.tensor([_encode(loaded.tokenizer, args.text)], dtype=torch.long)
        return {"input_ids": ids, "attention_mask": torch.ones_like(ids)}
    if args.input:
        return read_token_file(args.input, loaded.tokenizer, args.seq, args.batch, 1)[0]
    if calibration:
        return calibration[0]
    raise _cli_error("no input to run: pass --calibration FILE or --input FILE")


def cmd_bench(args) -> int:
    import torch
    from routefx.cli import calibration_of, policy_of
    from routefx.cli_inputs import load_model
    loaded = load_model(args.model)
    policies = {spec: policy_of(args, spec) for spec in args.policy}
    needs = [spec for spec, p in policies.items() if p.needs_calibration]
    args.policy = needs[0] if needs else args.policy[0]
    calibration = calibration_of(args, loaded, policies[args.policy])
    x = _eval_batch(args, loaded, calibration)
    x = {k: v[:1] for k, v in x.items()} if args.input is None else x
    rows = bench_policies(loaded.model, {k: p for k, p in policies.items() if k != "dense"}, calibration, x,
                          args.backend, args.reps)
    print(f"CPU: {cpu_name()}; {torch.get_num_threads()} torch threads; backend {args.backend}; input "
          f"{list(x['input_ids'].shape)}; median of {args.reps} interleaved runs (one process)")
    print(format_bench(rows))
    note = busy_note(rows)
    if note:
        print(note)
    return 0


def cmd_analyze(args) -> int:
    from routefx.cli import calibration_of, policy_of
    from routefx.cli_inputs import load_model
    import routefx
    loaded = load_model(args.model)
    policy = policy_of(args)
    calibration = calibration_of(args, loaded, policy)
    x = _eval_batch(args, loaded, calibration)
    cm = routefx.compile(loaded.model, policy, backend="eager", calibration=calibration, example_inputs=(),
                         example_kwargs=x)
    cm(**x)
    print(cm.route_stats([x]))
    tokens = None
    if loaded.tokenizer is not None:
        tok = loaded.tokenizer
        ids = x["input_ids"][0].tolist()
        tokens = [tok.decode([i]) for i in ids]
    maps = [route_map(cm, x, tokens, name=f"{args.policy} ({getattr(policy, 'router', '')} router)")]
    for name in args.compare:
        maps.append(_comparison(name)(cm, loaded, x))
    for m in maps[1:]:
        agree = (maps[0].routes == m.routes)[maps[0].routes[:, 0] >= 0].mean(0)
        print(f"{m.name}: budget {m.budget():.3f}; agreement with the router per layer "
              + " ".join(f"{a:.2f}" for a in agree))
    if args.plot:
        print(f"routing map written to {plot_routes(maps, args.plot, title=str(loaded.source))}")
    return 0
