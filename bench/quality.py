"""Quality of adaptive models (issue 16): held-out perplexity against FFN compute and FLOPs/token for static
pruning, static Duo, random (best of N), local, oracle-imitation and loss-trained routers and the oracle; the same
routers with fitted separate small branches (`--separate-at`); per-layer small-branch errors; token difficulty;
routing maps; oracle-vs-router agreement; the routing-aware fine-tune of separate small branches, apart. Writes
bench/QUALITY.md (+ bench/quality/notes.md, written by hand, appended) and bench/quality/*.png.

    ROUTEFX_CACHE=... PYTHONPATH=. nice -n 10 python bench/quality.py [--held-batches 2 --cal-batches 2 ...]

Every piece (a router at a budget, the oracle, the fine-tune) is cached as JSON under
$ROUTEFX_CACHE/quality_parts/parts-<hash of the settings>/: a killed run resumes, and a rerun only writes the report.
The model is the benchmark LM of `bench/quality_model.py` (from its cache; `--quick` takes its quick stand-in,
`--tiny` the byte-level Llama of tests/tiny_lm.py), named in the report.
"""
from __future__ import annotations

import argparse
import hashlib
import json
import math
import os
import sys
import time

import torch
from tqdm.auto import tqdm

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import routefx  # noqa: E402
from routefx.analysis.difficulty import token_difficulty  # noqa: E402
from routefx.analysis.forced import ForcedRoutes, routed_layers  # noqa: E402
from routefx.analysis.oracle import IGNORE, fit_oracle, shifted_labels, token_losses  # noqa: E402
from routefx.calibrate.budget import fit_lambda  # noqa: E402
from routefx.calibrate.routers import RandomRouter  # noqa: E402
from routefx.calibrate.trained_routers import router_attrs  # noqa: E402
from routefx.ir.flops import realised_flops  # noqa: E402
from routefx.policies import Duo, PruneLayers  # noqa: E402

HERE = os.path.dirname(os.path.abspath(__file__))
ROUTERS = ("static", "random", "local", "imitation", "loss")
ORACLE_TOL, ORACLE_ITERS = 0.02, 8          # the oracle's ε bisection (a busy 2-core machine: keep it short)


# ---------------------------------------------------------------- model and data

def load(args):
    """(model, calibration batches, held-out batches, decode(ids) -> list[str], label)."""
    try:
        from bench import quality_model as qm
    except ImportError:
        qm = None
    if qm is not None and not args.tiny:
        model, tok, info = qm.load_quality_model(train_if_missing=args.train, quick=args.quick)
        seq = args.seq or min(128, info["settings"]["seq_len"])
        cal = qm.calibration_batches(tok, args.cal_batches, seq, batch=args.batch)
        held = qm.heldout_batches(tok, args.held_batches, seq, batch=args.batch)
        decode = lambda ids: [tok.decode([int(i)]) for i in ids]  # noqa: E731
        return model, cal, held, decode, info["label"]
    from tests.tiny_lm import batches, trained_llama
    model = trained_llama()
    seq = args.seq or 64
    cal = batches(args.cal_batches, args.batch, seq, seed=100)
    held = batches(args.held_batches, args.batch, seq, seed=200, split="held")
    decode = lambda ids: [chr(int(i)) if 32 <= int(i) < 127 else "·" for i in ids]  # noqa: E731
    return model, cal, held, decode, ("STAND-IN: tests/tiny_lm.py byte-level Llama, 4 layers, d=64, FFN 172, 200 "
                                      "steps (bench/quality_model.py not available)")


# ---------------------------------------------------------------- measurements

@torch.no_grad()
def nll(logits_fn, batches) -> tuple[float, int]:
    tot, n = 0.0, 0
    for b in batches:
        lab = shifted_labels(b)
        loss = token_losses(logits_fn(b), lab)
        v = lab != IGNORE
        tot += float(loss[v].sum())
        n += int(v.sum())
    return tot / n, n


def measure(cm, held) -> dict:
    """Held-out perplexity, realised FFN compute fraction and FLOPs/token of a compiled model."""
    mean, _ = nll(lambda b: cm(**b).logits, held)
    out = {"ppl": math.exp(mean), "flops": cm.flops_per_token(held)}
    try:
        out["fraction"] = cm.route_stats(held).budget
    except Exception:                                   # no routed layer with several ranges (Dense, prune)
        out["fraction"] = None
    return out


def _offline_lambda(xs, weights, costs, budget):
    """λ meeting `budget` with every layer routed on its dense-trajectory inputs (no forward pass): a cheap
    approximation used only to rank random routers."""
    from routefx.calibrate.search import bisect_decreasing
    logits = [xs[k] @ w.T + b for k, (w, b) in weights.items()]              # per layer [N, 3]

    def frac(lam):
        return sum(float(c[(lg - lam * c.float()).argmax(-1)].mean()) for lg, c in zip(logits, costs)) / len(costs)
    return bisect_decreasing(frac, budget, -1e4, 1e4, 60, key=lambda f: f, tol=0.005).best_x


def best_of_random(model, cal, budget, n, seed0=1000, small="nested"):
    """Best of `n` seeded random routers, ranked by next-token loss on the first calibration batch with λ set
    offline (`_offline_lambda`); the winner's λ is then fitted on the calibration data by the budget step."""
    from routefx.ir.price import set_price_
    cm = routefx.compile(model, Duo(budget=budget, router="random", small=small), calibration=cal)
    forced, fcal = ForcedRoutes.from_compiled(cm, cal[:1])
    entry = cm._last
    gm, ir = entry.gm, entry.ir
    raw = forced.inputs(fcal[0], forced.all_big(fcal[0]["input_ids"].shape))
    xs = {k: v.reshape(-1, v.shape[-1]).float() for k, v in raw.items()}
    ops = dict(routed_layers(gm, ir))
    attrs = {k: router_attrs(gm, ops[k]) for k in forced.keys}
    costs = [forced.costs[i] for i in range(forced.num_layers)]
    best = (float("inf"), None, None)
    for s in tqdm(range(n), desc=f"best of {n} random routers @ {budget}", leave=False):
        gen = torch.Generator().manual_seed(seed0 + s)
        weights = {k: RandomRouter().fit(xs[k], None, gen) for k in forced.keys}
        lam = _offline_lambda(xs, weights, costs, budget)
        for k, (w, b) in weights.items():
            getattr(gm, attrs[k][0]).copy_(w)
            getattr(gm, attrs[k][1]).copy_(b)
        set_price_(gm, lam)
        loss, _ = nll(lambda b: gm(**b).logits, fcal)
        if loss < best[0]:
            best = (loss, weights, s)
    for k, (w, b) in best[1].items():
        getattr(gm, attrs[k][0]).copy_(w)
        getattr(gm, attrs[k][1]).copy_(b)
    _, cal_c = cm._batch_entry(cal)
    lam, _ = fit_lambda(gm, ir, cal_c, budget)
    cm.plan.lam = lam
    return cm, best[2]


def oracle_on(cm, held, budget, beam):
    """The oracle at `budget` on the held-out batches themselves (it sees the targets: a bound, not a router)."""
    forced, hb = ForcedRoutes.from_compiled(cm, held)
    eps, res = fit_oracle(forced, hb, budget, beam=beam, progress=True, tol=ORACLE_TOL, iters=ORACLE_ITERS)
    loss = sum(float(r.loss[r.valid].sum()) for r in res) / sum(int(r.valid.sum()) for r in res)
    entry = cm._last
    nodes = [n for k, n in routed_layers(entry.gm, entry.ir)]
    flops = realised_flops(entry.flops, ((r.valid | True, {n: r.routes[i].unsqueeze(-1) for i, n in
                                                          enumerate(nodes)}) for r in res))
    frac = float(torch.cat([r.cost[r.valid] for r in res]).mean())
    return {"ppl": math.exp(loss), "flops": flops, "fraction": frac, "eps": eps,
            "violations": sum(r.violations for r in res) / len(res)}, forced, hb, res


def router_routes(cm, batches):
    """[L, B, S] routes the compiled model's routers take on each batch."""
    entry, bs = cm._batch_entry(batches)
    from routefx.calibrate.record import run_recording
    nodes = [n for _, n in routed_layers(entry.gm, entry.ir)]
    out = []
    for b in bs:
        vals = run_recording(entry.gm, b, [n.args[1] for n in nodes])
        out.append(torch.stack([vals[n.args[1]][..., 0] for n in nodes]))
    return out


SEPARATE_ROUTERS = ("static", "random", "local", "loss")   # small="separate" variants (`--separate-at`)


class Parts:
    """Intermediate results, one JSON file per piece under `dir` (a killed run resumes where it stopped)."""

    def __init__(self, path):
        self.path = path
        os.makedirs(path, exist_ok=True)

    def total_seconds(self) -> float:
        tot = 0.0
        for f in os.listdir(self.path):
            if f.endswith(".json"):
                with open(os.path.join(self.path, f)) as fh:
                    tot += json.load(fh).get("seconds", 0.0)
        return tot

    def get(self, name, fn):
        f = os.path.join(self.path, name + ".json")
        if os.path.exists(f):
            with open(f) as fh:
                return json.load(fh)
        t0 = time.perf_counter()
        val = fn()
        val["seconds"] = time.perf_counter() - t0
        with open(f + ".tmp", "w") as fh:
            json.dump(_keys(val), fh)
        os.replace(f + ".tmp", f)
        return json.loads(json.dumps(_keys(val)))


def _compile_router(model, cal, budget, router, small, n_random):
    if router == "random":
        cm, winner = best_of_random(model, cal, budget, n_random, small=small)
        return cm, {"n": n_random, "winner": winner}
    return routefx.compile(model, Duo(budget=budget, router=router, small=small), calibration=cal), {}


def _oracle_part(model, cal, held, budget, beam, decode):
    cm = routefx.compile(model, Duo(budget=budget, router="local", small="nested"), calibration=cal)
    orc, forced, hb, res = oracle_on(cm, held, budget, beam)
    d = token_difficulty(forced, hb, res)
    orc["difficulty"] = {"budget": budget, "correlations": d.correlations, "shares": d.shares.tolist(),
                         "compute": d.compute.tolist(), "dense_loss": d.dense_loss.tolist(),
                         "entropy": d.entropy.tolist()}
    orc["routes"] = [r.routes.tolist() for r in res]
    orc["valid"] = [r.valid.tolist() for r in res]
    orc["sample"] = {"oracle": res[0].routes[:, 0].tolist(), "tokens": decode(held[0]["input_ids"][0].tolist()),
                     "budget": budget}
    return orc


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="the quality model's quick stand-in")
    p.add_argument("--tiny", action="store_true", help="tests/tiny_lm.py's byte-level Llama (seconds)")
    p.add_argument("--train", action="store_true", help="train the quality model when its cache is cold")
    p.add_argument("--budgets", type=float, nargs="+", default=[0.5, 0.75, 0.25], help="measured in this order")
    p.add_argument("--random-n", type=int, default=100, help="best of N random routers (every budget)")
    p.add_argument("--separate-at", type=float, nargs="*", default=[0.5],
                   help="budgets at which static/random/local/loss also run with small='separate'")
    p.add_argument("--loss-steps", type=int, default=150)
    p.add_argument("--finetune-steps", type=int, default=100,
                   help="routing-aware fine-tune of separate small branches at the --separate-at budgets (0: off)")
    p.add_argument("--finetune-batches", type=int, default=8, help="train-split batches for the fine-tune")
    p.add_argument("--finetune-lrs", type=float, nargs="+", default=[3e-4],
                   help="learning rates of the fine-tune of the local router's separate branches (on-policy; "
                        "random routes too for lr other than 3e-4, which runs with random routes for local and "
                        "loss anyway)")
    p.add_argument("--beam", type=int, default=1)
    p.add_argument("--cal-batches", type=int, default=4)
    p.add_argument("--held-batches", type=int, default=4)
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--seq", type=int, default=0)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--out", default=HERE)
    p.add_argument("--parts", default=None,
                   help="folder of intermediate results (default $ROUTEFX_CACHE/quality_parts/parts-<hash of the "
                        "settings>, outside the repository); a rerun with the same settings resumes from it")
    p.add_argument("--no-prune", action="store_true", help="skip the PruneLayers levels (a partial run to --merge)")
    p.add_argument("--merge", nargs="+", metavar="RESULTS_JSON",
                   help="write the report from partial runs' results.json (e.g. budgets run in parallel)")
    args = p.parse_args(argv)
    if args.merge:
        return _merge(args.merge, args.out)
    torch.set_num_threads(args.threads)
    from routefx.calibrate import loss_router
    loss_router.LOSS_ROUTER_DEFAULTS["steps"] = args.loss_steps
    from routefx.calibrate import trained_routers
    trained_routers.IMITATION_ORACLE.update(tol=ORACLE_TOL, iters=ORACLE_ITERS)
    torch.manual_seed(0)
    t0 = time.perf_counter()
    model, cal, held, decode, label = load(args)
    sizes = {"cal_batches": args.cal_batches, "held_batches": args.held_batches, "batch": args.batch,
             "seq": int(held[0]["input_ids"].shape[1]), "threads": args.threads, "oracle_tol": ORACLE_TOL,
             "oracle_iters": ORACLE_ITERS, "loss_steps": args.loss_steps, "random_n": args.random_n,
             "beam": args.beam, "label": label}
    tag = hashlib.sha256(json.dumps(sizes, sort_keys=True).encode()).hexdigest()[:8]
    root = os.environ.get("ROUTEFX_CACHE") or os.path.join(os.path.expanduser("~"), ".cache", "routefx")
    parts = Parts(args.parts or os.path.join(root, "quality_parts", f"parts-{tag}"))   # one folder per setting
    L = model.config.num_hidden_layers
    rows = {"dense": {}, "prune": {}, **{r: {} for r in ROUTERS}, "oracle": {},
            **{"separate:" + r: {} for r in SEPARATE_ROUTERS}}

    def baseline():
        dense = routefx.compile(model, routefx.policies.Dense(), calibration=cal)
        out = {"dense": {**measure(dense, held), "fraction": 1.0}, "prune": {}}
        for j in tqdm(range(1, L) if not args.no_prune else [], desc="PruneLayers keep j/L"):
            cm = routefx.compile(model, PruneLayers(keep=j / L), calibration=cal)
            out["prune"][j / L] = {**measure(cm, held), "fraction": j / L, "pruned": cm.plan.pruned}
        return out
    base = parts.get("baseline", baseline)
    rows["dense"]["1.0"] = base["dense"]
    rows["prune"].update(base["prune"])
    maps, agree, difficulty, timings = {}, {}, None, {"baseline": base["seconds"]}
    for budget in tqdm(args.budgets, desc="budgets"):
        orc = parts.get(f"oracle-{budget}", lambda: _oracle_part(model, cal, held, budget, args.beam, decode))
        timings[f"oracle@{budget}"] = orc["seconds"]
        rows["oracle"][str(budget)] = {k: v for k, v in orc.items() if k not in ("routes", "valid", "difficulty",
                                                                                 "sample")}
        if difficulty is None or budget == 0.5:
            difficulty, maps = orc["difficulty"], dict(orc["sample"])
        o_routes = [torch.tensor(r) for r in orc["routes"]]
        o_valid = [torch.tensor(v) for v in orc["valid"]]
        agree[str(budget)] = {}
        variants = [(r, "nested") for r in ROUTERS]
        if any(abs(budget - b) < 1e-9 for b in args.separate_at):
            variants += [(r, "separate") for r in SEPARATE_ROUTERS]
        for router, small in tqdm(variants, desc=f"routers @ {budget}", leave=False):
            name = router if small == "nested" else "separate:" + router

            def one():
                cm, extra = _compile_router(model, cal, budget, router, small, args.random_n)
                out = {**measure(cm, held), **extra, "calibration_fraction": cm.route_stats(cal).budget}
                if small == "nested" and router != "static":
                    rr = router_routes(cm, held)
                    out["agreement"] = _agreement(rr, o_routes, o_valid)
                    if router == "loss":
                        out["sample"] = rr[0][:, 0].tolist()
                return out
            part = parts.get(f"{name.replace(':', '-')}-{budget}", one)
            timings[f"{name}@{budget}"] = part["seconds"]
            rows[name][str(budget)] = {k: v for k, v in part.items() if k not in ("agreement", "sample")}
            if "agreement" in part:
                agree[str(budget)][router] = part["agreement"]
            if router == "loss" and small == "nested" and maps.get("budget") == budget:
                maps["loss"] = part["sample"]
    results = {"label": label, "layers": L, "random_n": args.random_n, "beam": args.beam,
               "loss_steps": args.loss_steps, "seconds": time.perf_counter() - t0, "timings": timings,
               "rows": _keys(rows), "agreement": _keys(agree), "difficulty": difficulty, "map": maps,
               "tokens": {"calibration": sum(int(b["attention_mask"].sum()) for b in cal),
                          "heldout": sum(int(b["attention_mask"].sum()) for b in held)},
               "sizes": sizes, "finetune": {}}
    results["branch_errors"] = parts.get("branch-errors", lambda: _branch_errors(model, cal, held))["layers"]
    for budget in (b for b in args.budgets if args.finetune_steps and any(abs(b - s) < 1e-9 for s in
                                                                          args.separate_at)):
        results["finetune"][str(budget)] = parts.get(
            f"finetune-{args.finetune_steps}x{args.finetune_batches}-{budget}",
            lambda: _finetune_part(model, cal, held, budget, args))
        for lr in args.finetune_lrs:
            tail = "" if lr == 3e-4 else f"-lr{lr:g}"
            results["finetune"][str(budget)][f"on-policy lr {lr:g} local"] = parts.get(
                f"finetune-router-local-{args.finetune_steps}x{args.finetune_batches}-{budget}{tail}",
                lambda: _finetune_part(model, cal, held, budget, args, ("local",), "router", lr))["local"]
            if lr != 3e-4:                                  # 3e-4 with random routes: the first part above
                results["finetune"][str(budget)][f"random lr {lr:g} local"] = parts.get(
                    f"finetune-random-local-{args.finetune_steps}x{args.finetune_batches}-{budget}{tail}",
                    lambda: _finetune_part(model, cal, held, budget, args, ("local",), "random", lr))["local"]
    results["seconds"] = parts.total_seconds()          # compute spent on every piece, over resumed runs too
    os.makedirs(os.path.join(args.out, "quality"), exist_ok=True)
    with open(os.path.join(args.out, "quality", "results.json"), "w") as f:
        json.dump(results, f, indent=1)
    from bench.quality_report import write_report
    write_report(results, args.out)
    print(f"wrote {os.path.join(args.out, 'QUALITY.md')} in {results['seconds']:.0f} s")
    return 0


def _finetune_part(model, cal, held, budget, args, routers=("local", "loss"), routes="random", lr=3e-4):
    """Duo(local, small='separate') at `budget`, before and after the routing-aware fine-tune of its small
    branches on `--finetune-batches` train-split batches (held-out text never seen)."""
    from routefx.calibrate.finetune import finetune_compiled_
    seq = int(cal[0]["input_ids"].shape[1])
    if args.tiny:
        from tests.tiny_lm import batches
        train = batches(args.finetune_batches, args.batch, seq, seed=4321)
    else:
        from bench import quality_model as qm
        _, tok, _ = qm.load_quality_model(train_if_missing=False, quick=args.quick)
        train = qm.calibration_batches(tok, args.finetune_batches, seq, batch=args.batch, seed=4321)
    out = {}
    for router in routers:
        cm = routefx.compile(model, Duo(budget=budget, router=router, small="separate"), calibration=cal)
        before = measure(cm, held)
        info = finetune_compiled_(cm, train, steps=args.finetune_steps, budget_batches=cal, routes=routes, lr=lr)
        out[router] = {"before": before, "after": measure(cm, held), "info": info,
                       "calibration_fraction": cm.route_stats(cal).budget}
    return out


def _branch_errors(model, cal, held, small_fraction=0.25):
    """Per routed layer, the mean relative error ‖y − y_big‖/‖stream‖ on held-out tokens of skip, the nested small
    branch (top-k neurons by importance) and the separate small branch (top-k neurons with the down projection
    refitted by least squares on the calibration tokens), as `calibrate/duo.py` builds them."""
    import torch.nn.functional as F

    from routefx.calibrate import duo
    from routefx.compiler.plan import LayerPlan
    from routefx.ir.activations import get_activation
    cm = routefx.compile(model, routefx.policies.Dense(), calibration=cal)
    entry, calc = cm._batch_entry(cal)
    _, heldc = cm._batch_entry(held)
    blocks = duo.routed_blocks(Duo(), entry.ir)
    xc, _ = duo._collect(entry.gm, blocks, calc)
    xh, nh = duo._collect(entry.gm, blocks, heldc)
    out = []
    for b in blocks:
        w, act, n = duo._weights(entry.gm, b), get_activation(b.ffn.activation), b.ffn.intermediate_size
        k = max(1, min(n - 1, math.floor(small_fraction * n + 0.5)))
        with torch.no_grad():
            hc, hh = duo._hidden(xc[b.index], w, act), duo._hidden(xh[b.index], w, act)     # [N, F]
            top = torch.argsort(hc.abs().mean(0) * w["down"].norm(dim=0), descending=True, stable=True)[:k]
            y_big = F.linear(hh, w["down"], w["b_down"])
            nested = F.linear(hh[:, top], w["down"][:, top], w["b_down"])
            lp = LayerPlan(F=n, k=k, perm=torch.arange(n), router="local", small="separate")
            duo.fit_separate_branch(lp, w, hc[:, top], F.linear(hc, w["down"], w["b_down"]), top)
            sep = F.linear(hh[:, top], lp.small_down, w["b_down"])
        s = nh[b.index].clamp_min(1e-12)
        err = lambda y: float(((y - y_big).norm(dim=-1) / s).mean())  # noqa: E731
        out.append({"layer": b.index, "skip": float((y_big.norm(dim=-1) / s).mean()), "nested": err(nested),
                    "separate": err(sep)})
    return {"layers": out}


def _agreement(router_r, o_routes, o_valid) -> list[float]:
    """Per layer: share of valid held-out tokens where the router's route equals the oracle's."""
    num, den = None, 0
    for rr, orr, v in zip(router_r, o_routes, o_valid):
        eq = (rr == orr)[:, v].double().sum(1)
        num = eq if num is None else num + eq
        den += int(v.sum())
    return (num / den).tolist()


def _merge(paths, out) -> int:
    """One report from partial runs: rows and agreement are united; difficulty and the routing map come from the
    run that measured budget 0.5 (else the first)."""
    parts = [json.load(open(p)) for p in paths]
    res = dict(parts[0])
    res["rows"] = {k: {} for k in parts[0]["rows"]}
    res["agreement"], res["seconds"] = {}, max(p["seconds"] for p in parts)
    for part in parts:
        for k, v in part["rows"].items():
            res["rows"][k].update(v)
        res["agreement"].update(part["agreement"])
        if part["difficulty"] and str(part["difficulty"]["budget"]) == "0.5":
            res["difficulty"], res["map"] = part["difficulty"], part["map"]
    res["random_n"] = max(p["random_n"] for p in parts)
    os.makedirs(os.path.join(out, "quality"), exist_ok=True)
    with open(os.path.join(out, "quality", "results.json"), "w") as f:
        json.dump(res, f, indent=1)
    from bench.quality_report import write_report
    write_report(res, out)
    print(f"wrote {os.path.join(out, 'QUALITY.md')} from {len(parts)} partial runs")
    return 0


def _keys(d):
    return {str(k): (_keys(v) if isinstance(v, dict) else v) for k, v in d.items()}


if __name__ == "__main__":
    sys.exit(main())
