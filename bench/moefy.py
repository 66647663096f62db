"""Dense -> MoE (issue 15, part 4): held-out loss against compute for `MoEfy` on the trained quality model, with
the dense model, static layer pruning (`PruneLayers`) and static Duo at equal FLOPs as references. Writes
bench/RESULTS_MOEFY.md and bench/results/moefy.json.

    ROUTEFX_CACHE=/work/quality_model_cache PYTHONPATH=. nice -n 10 python bench/moefy.py --threads 1

The model is the benchmark LM of `bench/quality_model.py`, read from its cache (never trained here: a cold cache is
an error; `--quick` takes its quick stand-in). Quality figures do not depend on machine load; the run time does.

Rows (FLOPs per real token measured by routefx on the held-out batches, with the routes the tokens took):
    dense          Dense()
    MoEfy top-k    MoEfy(experts=E, top_k=k): static k experts of E per token and layer
    MoEfy rule     MoEfy(experts=E, budget=b, rule="top_p"): per-token expert counts, price fitted on calibration
    oracle top-k   the same experts, but each token takes the k experts holding most of its activation mass in the
                   dense FFN (computed from the targets-free dense activations: a bound on what a router can reach
                   with these experts, not an inference path; evaluated on the Hugging Face modules, Llama layout)
    Duo static     Duo(budget=k/E, small_fraction=k/E, router="static", small="nested"): one fixed branch per
                   layer (skip, its k/E most important neurons, or all), the same FFN compute as MoEfy top-k
                   without per-token choice
    PruneLayers    PruneLayers(keep=j/L): whole blocks removed by Block Influence; its loss at a MoEfy row's FLOPs is
                   interpolated linearly in FLOPs between the two pruning levels (dense as keep=1) around it
"""
from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
import platform
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import routefx  # noqa: E402
from routefx.policies import Dense, Duo, MoEfy, PruneLayers  # noqa: E402

HERE = os.path.dirname(os.path.abspath(__file__))


def _measure(cm, held, compile_s: float, fraction: float | None, **extra) -> dict:
    from bench import quality_model as qm
    ppl = qm.perplexity(cm, held)
    return {"loss": math.log(ppl), "ppl": ppl, "flops": cm.flops_per_token(held), "ffn_fraction": fraction,
            "compile_s": round(compile_s, 1), **extra}


def _compile(model, policy, cal):
    t0 = time.perf_counter()
    cm = routefx.compile(model, policy, calibration=cal)
    return cm, time.perf_counter() - t0


@contextlib.contextmanager
def oracle_experts(model, plan, experts: int, k: int):
    """Within the block, each Llama MLP of `model` keeps, per token, only the neurons of the k experts (of the
    MoEfy `plan`) that hold most of its activation mass |h_i|·‖W_down[:, i]‖; its other neurons are zeroed."""
    patched = []
    for i, layer in enumerate(model.model.layers):
        lp = plan.layers.get(f"model.layers.{i}.mlp")
        if lp is None:
            continue
        mlp = layer.mlp
        group = torch.empty(lp.F, dtype=torch.int64)
        group[lp.perm] = torch.arange(lp.F) // lp.k                               # [F] expert of each neuron

        def forward(x, mlp=mlp, group=group):
            h = mlp.act_fn(mlp.gate_proj(x)) * mlp.up_proj(x)                     # [B, S, F]
            contrib = h.abs() * mlp.down_proj.weight.norm(dim=0)
            mass = contrib.new_zeros(*contrib.shape[:-1], experts).index_add_(-1, group, contrib)  # [B, S, E]
            chosen = torch.zeros_like(mass).scatter_(-1, mass.topk(k, -1).indices, 1.0)
            return mlp.down_proj(h * chosen[..., group])                            # neurons of chosen experts
        mlp.forward = forward
        patched.append(mlp)
    try:
        yield model
    finally:
        for mlp in patched:
            del mlp.forward


def _interpolate(points: list[tuple[float, float]], flops: float) -> float | None:
    """Loss at `flops` on the piecewise-linear curve through (flops, loss) points; None outside their range."""
    pts = sorted(points)
    for (f0, l0), (f1, l1) in zip(pts, pts[1:]):
        if f0 <= flops <= f1:
            return l0 if f1 == f0 else l0 + (l1 - l0) * (flops - f0) / (f1 - f0)
    return None


def run(args) -> dict:
    from bench import quality_model as qm
    model, tok, info = qm.load_quality_model(train_if_missing=False, quick=args.quick)
    L, F = model.config.num_hidden_layers, model.config.intermediate_size
    E = args.experts
    cal = qm.calibration_batches(tok, args.cal_batches, args.seq, batch=args.batch)
    held = qm.heldout_batches(tok, args.held_batches, args.seq, batch=args.batch)
    rows = []

    def add(kind, label, cm, secs, fraction, **extra):
        row = {"kind": kind, "label": label, **_measure(cm, held, secs, fraction, **extra)}
        rows.append(row)
        print(f"{label:44s} loss {row['loss']:.4f}  ppl {row['ppl']:8.2f}  FLOPs/token {row['flops']:,.0f}  "
              f"({secs:.0f} s)", flush=True)
        return row

    cm, secs = _compile(model, Dense(), cal)
    dense = add("dense", "dense", cm, secs, 1.0)
    for k in args.top_k:
        cm, secs = _compile(model, MoEfy(experts=E, top_k=k, steps=args.steps), cal)
        s = cm.plan.calibration["moefy"]["layers"]
        add("moefy", f"MoEfy top-{k} of {E}", cm, secs, k / E, top_k=k,
            router_top1_accuracy=sum(v["router_top1_accuracy"] for v in s.values()) / len(s),
            mass_captured_router=sum(v["mass_captured_by_router"][k - 1] for v in s.values()) / len(s),
            mass_captured_best=sum(v["mass_captured_best"][k - 1] for v in s.values()) / len(s))
        if k < E:
            moe_row = rows[-1]
            with oracle_experts(model, cm.plan, E, k):
                ppl = qm.perplexity(model, held)
            rows.append({"kind": "oracle", "label": f"oracle top-{k} of {E} (bound)", "loss": math.log(ppl),
                         "ppl": ppl, "flops": moe_row["flops"], "ffn_fraction": k / E, "top_k": k})
            print(f"{rows[-1]['label']:44s} loss {rows[-1]['loss']:.4f}", flush=True)
            cm, secs = _compile(model, Duo(budget=k / E, small_fraction=k / E, router="static", small="nested"), cal)
            add("duo_static", f"Duo static, budget {k}/{E}", cm, secs, cm.plan.budget.realised,
                routes={key: lp.static_route for key, lp in cm.plan.layers.items()})
    for b in args.budgets:
        cm, secs = _compile(model, MoEfy(experts=E, budget=b, rule="top_p", steps=args.steps), cal)
        add("moefy_rule", f"MoEfy top_p rule, budget {b}", cm, secs, cm.route_stats(held).budget, budget=b,
            calibration_fraction=cm.plan.budget.realised)
    for j in range(L - 1, 0, -1):
        cm, secs = _compile(model, PruneLayers(keep=j / L), cal)
        add("prune", f"PruneLayers keep {j}/{L}", cm, secs, j / L, pruned=cm.plan.pruned)
    prune_pts = [(r["flops"], r["loss"]) for r in rows if r["kind"] == "prune"] + [(dense["flops"], dense["loss"])]
    for r in rows:
        if r["kind"] in ("moefy", "moefy_rule"):
            r["prune_loss_at_equal_flops"] = _interpolate(prune_pts, r["flops"])
    return {"label": info["label"], "experts": E, "layers": L, "ffn": F, "steps": args.steps,
            "tokens": {"calibration": sum(int(b["attention_mask"].sum()) for b in cal),
                       "heldout": sum(int(b["attention_mask"].sum()) for b in held)},
            "shapes": {"cal_batches": args.cal_batches, "held_batches": args.held_batches, "batch": args.batch,
                       "seq": args.seq},
            "versions": {"torch": torch.__version__, "python": platform.python_version()},
            "rows": rows}


def report(res: dict) -> str:
    dense = next(r for r in res["rows"] if r["kind"] == "dense")
    E = res["experts"]
    out = ["# MoEfy: dense -> MoE on the quality model (issue 15, part 4)", "",
           f"Model: {res['label']}. Each FFN (F={res['ffn']}) is split into {E} experts of {res['ffn'] // E} "
           f"neurons by balanced k-means on calibration co-activation; a linear router per layer "
           f"({res['steps']} Adam steps) picks experts per token (gate 1 each). No fine-tuning of any weight.",
           f"Calibration: {res['tokens']['calibration']:,} tokens (train split); held-out: "
           f"{res['tokens']['heldout']:,} tokens ({res['shapes']['held_batches']} batches of "
           f"{res['shapes']['batch']} x {res['shapes']['seq']}). FLOPs per real token are routefx's count on the "
           "held-out batches at the routes taken (attention, FFN, router and LM head included).", "",
           "Generated by `bench/moefy.py`; the numbers below are measured, not edited. How to read them: "
           "*oracle top-k* runs the same experts with the per-token choice by activation mass, so MoEfy - oracle is "
           "the router's loss and oracle - dense the expert split's (no weight is fine-tuned); *Duo static* runs the "
           "same FFN compute on one fixed neuron subset (or branch) per layer, so Duo static - MoEfy is what the "
           "per-token choice of experts buys; PruneLayers removes attention too, so at equal FLOPs it keeps more "
           "FFN compute, and its loss at a MoEfy row's FLOPs is interpolated between pruning levels. MoEfy's FLOPs "
           "include its routers (2·E·d per token and layer).", "",
           "| method | FFN compute | FLOPs/token | vs dense | held-out loss | ppl | Δloss vs dense "
           "| PruneLayers loss at equal FLOPs |",
           "|---|---|---|---|---|---|---|---|"]
    for r in sorted(res["rows"], key=lambda r: -r["flops"]):
        frac = "" if r["ffn_fraction"] is None else f"{r['ffn_fraction']:.3f}"
        if r["kind"] == "prune":
            frac = f"blocks {r['ffn_fraction']:.3f}"
        pl = r.get("prune_loss_at_equal_flops")
        out.append(f"| {r['label']} | {frac} | {r['flops']:,.0f} | {r['flops'] / dense['flops']:.3f} | "
                   f"{r['loss']:.4f} | {r['ppl']:.2f} | {r['loss'] - dense['loss']:+.4f} | "
                   f"{'' if pl is None else f'{pl:.4f}' if r['kind'] != 'prune' else ''} |")
    moe = [r for r in res["rows"] if r["kind"] == "moefy"]
    if moe:
        out += ["", "Router and experts (mean over layers, calibration data): the share of a token's activation mass "
                "|h_i|·‖W_down[:, i]‖ held by the router's top-k experts, against the best k experts for that "
                "token "
                f"(an oracle); chance is k/{E}.", "",
                "| k | router top-1 accuracy | mass in router's top-k | mass in best k | chance |",
                "|---|---|---|---|---|"]
        for r in moe:
            out.append(f"| {r['top_k']} | {r['router_top1_accuracy']:.3f} | {r['mass_captured_router']:.3f} | "
                       f"{r['mass_captured_best']:.3f} | {r['top_k'] / E:.3f} |")
    return "\n".join(out) + "\n"


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="the quality model's quick stand-in (smoke runs)")
    p.add_argument("--experts", type=int, default=8)
    p.add_argument("--top-k", type=int, nargs="+", default=[1, 2, 4, 8])
    p.add_argument("--budgets", type=float, nargs="*", default=[0.25, 0.5], help="per-token rule budgets")
    p.add_argument("--steps", type=int, default=300, help="router training steps")
    p.add_argument("--cal-batches", type=int, default=8)
    p.add_argument("--held-batches", type=int, default=8)
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--seq", type=int, default=128)
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--out", default=os.path.join(HERE, "RESULTS_MOEFY.md"))
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    t0 = time.perf_counter()
    res = run(args)
    res["seconds"] = round(time.perf_counter() - t0, 1)
    os.makedirs(os.path.join(HERE, "results"), exist_ok=True)
    with open(os.path.join(HERE, "results", "moefy.json"), "w") as f:
        json.dump(res, f, indent=1)
    with open(args.out, "w") as f:
        cmd = " ".join(["bench/moefy.py"] + (argv or sys.argv[1:]))
        f.write(report(res) + f"\nRun time {res['seconds']:.0f} s (`{cmd}`).\n")
    print(f"wrote {args.out} in {res['seconds']:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
