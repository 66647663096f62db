"""Route statistics and the global price λ that brings the realised compute fraction to the budget.

The realised budget is measured on the compiled graph itself (routing at one layer changes the inputs of the
next), over routed layers and real tokens: cost of route r = |range_r| / max_r |range_r|.
"""
from __future__ import annotations

import dataclasses

import torch
from torch import fx

from routefx.compiler.calibration import token_mask
from routefx.compiler.observe import run_recording
from routefx.ir import graph_utils as gu
from routefx.ir.model_ir import ModelIR
from routefx.passes.insert_routers import BIG_LAMBDA, LAMBDA_ATTR

__all__ = ["RouteStats", "route_stats", "fit_lambda"]


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
    ops = [n for n in gm.graph.nodes if gu.is_routed(n)]
    multi = [n for n in ops if len(n.args[9]) > 2]
    return [(keys.get(n, n.name), n) for n in (multi or ops)]


def _costs(n: fx.Node) -> torch.Tensor:
    r = n.args[9]
    lens = torch.tensor([r[i + 1] - r[i] for i in range(0, len(r), 2)], dtype=torch.float64)
    return lens / lens.max()


def route_stats(gm: fx.GraphModule, ir: ModelIR, batches: list[dict]) -> RouteStats:
    ops = _routed_ops(gm, ir)
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


def _set_lambda(gm: fx.GraphModule, lam: float) -> None:
    getattr(gm, LAMBDA_ATTR).fill_(lam)


def fit_lambda(gm: fx.GraphModule, ir: ModelIR, batches: list[dict], budget: float, tol: float = 0.005,
               iters: int = 40) -> tuple[float, RouteStats]:
    """Bisection on λ (realised fraction falls as λ rises) until within `tol` of `budget`."""
    if budget >= 1.0:
        _set_lambda(gm, BIG_LAMBDA)
        return BIG_LAMBDA, route_stats(gm, ir, batches)
    lo, hi = -1.0, 1.0

    def at(lam):
        _set_lambda(gm, lam)
        return route_stats(gm, ir, batches)

    while at(lo).budget < budget and lo > -1e6:
        lo *= 4
    while at(hi).budget > budget and hi < 1e6:
        hi *= 4
    best = None
    for _ in range(iters):
        mid = (lo + hi) / 2
        st = at(mid)
        if best is None or abs(st.budget - budget) < abs(best[1].budget - budget):
            best = (mid, st)
        if abs(st.budget - budget) <= tol:
            break
        if st.budget > budget:
            lo = mid
        else:
            hi = mid
    _set_lambda(gm, best[0])
    return best
