"""The budget step: route statistics, and the global price λ that brings the realised compute fraction to the
budget. It runs after the rewrite, as the pipeline declares (`compiler/pipeline.py`).

The realised budget is measured on the compiled graph itself (routing at one layer changes the inputs of the
next), over routed layers and real tokens: cost of route r = |range_r| / max_r |range_r|.
"""
from __future__ import annotations

import dataclasses

import torch
from torch import fx

from routefx.calibrate.data import token_mask
from routefx.calibrate.record import run_recording
from routefx.calibrate.search import bisect_decreasing
from routefx.compiler.plan import BudgetRecord, LayerBudget, Plan
from routefx.errors import CalibrationError
from routefx.ir import graph_utils as gu
from routefx.ir.model_ir import ModelIR
from routefx.ir.price import ALL_BIG, get_price, has_price, set_price_

__all__ = ["RouteStats", "route_stats", "fit_lambda", "FitBudget"]


@dataclasses.dataclass
class RouteStats:
    budget: float                         # realised mean compute fraction over routed layers and real tokens
    tokens: int                           # real tokens seen
    layers: list[dict]                    # per routed layer: key, route fractions, compute fraction

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    def __str__(self) -> str:
        lines = [f"realised budget {self.budget:.4f} over {self.tokens} tokens"]
        for l in self.layers:
            mix = " ".join(f"{n}={f:.2f}" for n, f in zip(l["names"], l["mix"]))
            lines.append(f"  {l['key']}: {mix}  (compute {l['fraction']:.3f})")
        return "\n".join(lines)


def _routed_ops(gm: fx.GraphModule, ir: ModelIR) -> list[tuple[str, fx.Node]]:
    keys = {b.ffn.match.out: b.key for b in ir.blocks if b.ffn is not None and b.ffn.routed is not None}
    # a MoE dispatch with gates and no empty range runs the captured top-k: no budget decision to measure
    ops = [n for n in gm.graph.nodes if gu.is_routed(n) and not (n.args[2] is not None and all(
        n.args[9][i] < n.args[9][i + 1] for i in range(0, len(n.args[9]), 2)))]
    multi = [n for n in ops if len(n.args[9]) > 2]
    return [(keys.get(n, n.name), n) for n in (multi or ops)]


def _costs(n: fx.Node) -> torch.Tensor:
    r = n.args[9]
    lens = torch.tensor([r[i + 1] - r[i] for i in range(0, len(r), 2)], dtype=torch.float64)
    return lens / lens.max()


def route_stats(gm: fx.GraphModule, ir: ModelIR, batches: list[dict]) -> RouteStats:
    ops = _routed_ops(gm, ir)
    # host-side counters: route ids are copied to CPU (one read per batch), whatever the model's device
    counts = {key: torch.zeros(len(n.args[9]) // 2, dtype=torch.float64) for key, n in ops}
    tokens = 0
    for batch in batches:
        vals = run_recording(gm, batch, [n.args[1] for _, n in ops])
        keep = token_mask(batch).reshape(-1)
        tokens += int(keep.sum())
        for key, n in ops:
            r = vals[n.args[1]].cpu()
            r = r.reshape(-1, r.shape[-1])[keep].reshape(-1)
            counts[key] += torch.bincount(r, minlength=len(counts[key])).double()
    layers, total, n_all = [], 0.0, 0.0
    for key, n in ops:
        c = counts[key]
        cost = _costs(n)
        frac = float((c * cost).sum() / c.sum().clamp_min(1))
        names = ["skip", "small", "big"] if len(c) == 3 else [f"route{i}" for i in range(len(c))]
        layers.append({"key": key, "names": names, "mix": (c / c.sum().clamp_min(1)).tolist(), "fraction": frac})
        total += float((c * cost).sum())
        n_all += float(c.sum())
    return RouteStats(total / max(n_all, 1.0), tokens, layers)


def fit_lambda(gm: fx.GraphModule, ir: ModelIR, batches: list[dict], budget: float, tol: float = 0.005,
               iters: int = 40) -> tuple[float, RouteStats]:
    """Bisection on λ (realised fraction falls as λ rises) until within `tol` of `budget`; leaves the graph's
    λ at the result."""
    def at(lam):
        set_price_(gm, lam)
        return route_stats(gm, ir, batches)

    if budget >= 1.0:
        return ALL_BIG, at(ALL_BIG)
    lo, hi = -1.0, 1.0
    while at(lo).budget < budget and lo > -1e6:
        lo *= 4
    while at(hi).budget > budget and hi < 1e6:
        hi *= 4
    found = bisect_decreasing(at, budget, lo, hi, iters, key=lambda st: st.budget, tol=tol)
    set_price_(gm, found.best_x)
    return found.best_x, found.best


class FitBudget:
    """The budget step, on the rewritten graph and the calibration batches.

    Requires: every planned layer is a routed_ffn with its planned ranges (InsertRouters ran); when a layer has
              a per-token router, the graph holds the λ buffer.
    Ensures:  `plan.budget` records the realised compute fraction on the calibration data; with per-token
              routers `plan.lam` is the fitted price and the graph's λ buffer holds it.
    """

    name = "fit_budget"

    def requires(self, gm: fx.GraphModule, ir: ModelIR, plan: Plan) -> str | None:
        ops = {key: n for key, n in _routed_ops(gm, ir)}
        wrong = [k for k, lp in plan.layers.items() if k not in ops or ops[k].args[9] != lp.ranges]
        if wrong:
            return f"layer(s) {wrong} are not routed with their planned ranges"
        if _dynamic(plan) and not has_price(gm):
            return "per-token routers but no λ buffer in the graph"
        return None

    def ensures(self, gm: fx.GraphModule, ir: ModelIR, plan: Plan) -> str | None:
        if plan.budget is None:
            return "no budget record in the plan"
        if _dynamic(plan) and (plan.lam is None or get_price(gm) != float(torch.tensor(plan.lam).float())):
            return f"the graph's λ {get_price(gm)} is not the plan's {plan.lam}"
        return None

    def __call__(self, gm: fx.GraphModule, ir: ModelIR, plan: Plan, batches: list[dict], target: float) -> list[str]:
        """Run the step with its contract checked; returns notes for the compile report."""
        self._check("requires", self.requires(gm, ir, plan))
        notes = self.run(gm, ir, plan, batches, target)
        self._check("ensures", self.ensures(gm, ir, plan))
        return notes

    def _check(self, which: str, reason: str | None) -> None:
        if reason is not None:
            raise CalibrationError(f"calibration step '{self.name}': contract broken ({which}): {reason}")

    def run(self, gm: fx.GraphModule, ir: ModelIR, plan: Plan, batches: list[dict], target: float) -> list[str]:
        if not plan.layers:
            return []
        if not _dynamic(plan):
            st = route_stats(gm, ir, batches)
            plan.budget = BudgetRecord(target, st.budget, layers=[LayerBudget(a["key"], a["mix"], a["fraction"])
                                                                  for a in st.layers])
            return [f"static routes: realised budget {st.budget:.3f} (target {target}; one branch per layer)"]
        set_price_(gm, 0.0)
        lam0 = route_stats(gm, ir, batches)
        plan.lam, stats = fit_lambda(gm, ir, batches, target)
        plan.budget = BudgetRecord(target, stats.budget, plan.lam, lam0.budget,
                                   [LayerBudget(b["key"], b["mix"], b["fraction"], a["fraction"])
                                    for a, b in zip(lam0.layers, stats.layers)])
        return [f"global price λ={plan.lam:.4g} brings the realised budget on calibration data from "
                f"{lam0.budget:.3f} (λ=0) to {stats.budget:.3f} (target {target})"]


def _dynamic(plan: Plan) -> bool:
    return any(lp.static_route is None for lp in plan.layers.values())
