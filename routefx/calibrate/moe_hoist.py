"""Pre-gating routers for MoE blocks (`MoEBudget(hoist=True)`, Read-ME-style): each MoE block but the first gets
a router that reads the previous MoE block's router input, fitted at calibration to reproduce its own router's
logits there. `passes/hoist_moe_routers.py` wires it into the graph.

The fit, per hoisted block l with previous MoE block p (N real calibration tokens, d hidden, E experts):

    z_l = router_l(x_l) [N, E]       the block's own router logits (the targets)
    [W; b] = argmin ‖[x_p, 1] [W; b] − z_l‖² + s ‖[W; b] − [W_l; b_l]‖²

a ridge regression shrunk towards the block's own router (x_p and x_l are normalised views of nearby residual
streams, so W_l is the natural prior; s = rel · mean diag of the Gram matrix). `rel` is chosen among `SHRINKS` by
the logit error on a held-out fifth of the tokens, then the fit is redone on all of them. Everything the scoring
computes from the logits (softmax or sigmoid, top-k, renormalisation, bias-corrected or group-limited choices) is
the model's own and stays as captured; only the logits' input and weights change.

Recorded in `plan.layers[key]` (router "pregate": weight [E, d], bias [E]; F = E · width, k = width) and
`plan.calibration["moe_hoist"][key]`: the block it reads ("reads"), the chosen shrink, the held-out R² of the logits and the held-out share of
tokens whose top-k expert set (by logit) the pre-gating router reproduces.
"""
from __future__ import annotations

import torch
from torch import fx

from routefx.calibrate.data import token_mask
from routefx.calibrate.duo import shrunk_fit
from routefx.calibrate.record import run_recording
from routefx.compiler.plan import LayerPlan, Plan
from routefx.errors import PolicyError
from routefx.ir import graph_utils as gu
from routefx.ir.model_ir import ModelIR
from routefx.passes.raise_moe import MoEMatch, moe_matches

__all__ = ["calibrate_moe_hoist", "hoistable_moe", "PREGATE"]

PREGATE = "pregate"
SHRINKS = (1e-3, 1e-2, 1e-1, 1.0, 10.0, float("inf"))
aten = torch.ops.aten


def hoistable_moe(gm: fx.GraphModule, ir: ModelIR) -> list[tuple[str, MoEMatch]]:
    """(block key, match) of the MoE blocks RaiseMoE can raise, in block order."""
    return [(b.key, m) for b, m in moe_matches(gm, ir) if not isinstance(m, str)]


def _router_params(router: fx.Node, values: dict) -> tuple[torch.Tensor, torch.Tensor]:
    """The router product's weight [E, d] and bias [E] as the prior of the fit (zeros where its form is not a
    plain linear / mm / matmul of the input)."""
    z = values[router]
    E, d = z.shape[-1], values[router.args[0]].shape[-1]
    w = values.get(router.args[1]) if len(router.args) > 1 and isinstance(router.args[1], fx.Node) else None
    if router.target is aten.linear.default and w is not None and tuple(w.shape) == (E, d):
        b = values.get(router.args[2]) if len(router.args) > 2 and isinstance(router.args[2], fx.Node) else None
        return w.double(), (torch.zeros(E, dtype=torch.float64) if b is None else b.double())
    if router.target in gu.targets(aten.mm, aten.matmul) and w is not None and tuple(w.shape) == (d, E):
        return w.double().T, torch.zeros(E, dtype=torch.float64)
    return torch.zeros(E, d, dtype=torch.float64), torch.zeros(E, dtype=torch.float64)


def _collect(gm: fx.GraphModule, matches: list[MoEMatch], batches: list[dict]):
    """Per match: router input [N, d] and logits [N, E] at real tokens (float64, CPU); the router parameters."""
    xs, zs = [[] for _ in matches], [[] for _ in matches]
    params = None
    want = [n for m in matches for n in (m.x, m.router, *m.router.all_input_nodes)]
    for batch in batches:
        vals = {n: v.detach().cpu() for n, v in run_recording(gm, batch, want).items()
                if isinstance(v, torch.Tensor)}
        keep = token_mask(batch).reshape(-1)
        for i, m in enumerate(matches):
            x, z = vals[m.x].reshape(-1, vals[m.x].shape[-1]), vals[m.router].reshape(-1, vals[m.router].shape[-1])
            if x.shape[0] != keep.numel():
                raise PolicyError(f"MoEBudget(hoist=True): the router input has {x.shape[0]} rows for "
                                  f"{keep.numel()} tokens; pre-gating needs one router row per token")
            xs[i].append(x[keep].double())
            zs[i].append(z[keep].double())
        if params is None:
            params = [_router_params(m.router, vals) for m in matches]
    return [torch.cat(x) for x in xs], [torch.cat(z) for z in zs], params


def _topk_agreement(pred: torch.Tensor, z: torch.Tensor, k: int) -> float:
    a = torch.zeros_like(z, dtype=torch.bool).scatter_(-1, pred.topk(k, -1).indices, True)
    b = torch.zeros_like(z, dtype=torch.bool).scatter_(-1, z.topk(k, -1).indices, True)
    return float((a == b).all(-1).double().mean())


def calibrate_moe_hoist(gm: fx.GraphModule, ir: ModelIR, batches: list[dict], plan: Plan, seed: int = 0) -> None:
    found = hoistable_moe(gm, ir)
    if len(found) < 2:
        raise PolicyError(f"MoEBudget(hoist=True): pre-gating needs at least two MoE blocks routefx can raise; "
                          f"found {len(found)}")
    matches = [m for _, m in found]
    xs, zs, params = _collect(gm, matches, batches)
    gen = torch.Generator().manual_seed(seed)
    record = {}
    for i in range(1, len(found)):
        key, m = found[i]
        ones = torch.ones(xs[i - 1].shape[0], 1, dtype=torch.float64)
        H, T = torch.cat([xs[i - 1], ones], 1), zs[i]
        w0 = torch.cat([params[i][0].T, params[i][1][None]], 0)              # [d + 1, E]
        perm = torch.randperm(H.shape[0], generator=gen)
        n_val = max(1, H.shape[0] // 5)
        val, fit = perm[:n_val], perm[n_val:]
        preds = {rel: H[val] @ shrunk_fit(H[fit], T[fit], w0, rel) for rel in SHRINKS}   # held-out logits
        errs = {rel: float(((p - T[val]) ** 2).sum()) for rel, p in preds.items()}
        rel = min(errs, key=errs.get)
        W = shrunk_fit(H, T, w0, rel)
        k = int(gu.val(m.routes).shape[-1])
        pred = preds[rel]
        var = float(((T[val] - T[val].mean(0)) ** 2).sum())
        record[key] = {"reads": found[i - 1][0], "shrink": rel if rel != float("inf") else "own router", "tokens": int(H.shape[0]),
                       "val_r2": round(1 - errs[rel] / max(var, 1e-30), 4),
                       "val_topk_agreement": round(_topk_agreement(pred, T[val], k), 4),
                       "own_router_topk_agreement": round(_topk_agreement(H[val] @ w0, T[val], k), 4)}
        plan.layers[key] = LayerPlan(F=m.experts * m.width, k=m.width, router=PREGATE,
                                     weight=W[:-1].T.float().contiguous(), bias=W[-1].float().contiguous())
    plan.calibration["moe_hoist"] = record
