"""Routers trained on the rewritten graph (a tune step, run before the budget step fits λ):

  imitation  a linear router per layer fitted (LocalRouter's logistic regression) to oracle labels: the oracle
             (`routefx/analysis/oracle.py`, beam 1) at the policy's budget on the calibration data, features the
             FFN inputs under the oracle's own routes.
  loss       end-to-end on the frozen model: next-token loss plus a compute price, through straight-through
             Gumbel-softmax gates (`loss_router.py`), started from the local router.

Both write router weights into the graph and the plan; `FitBudget` then fits the global price λ as for any router.
"""
from __future__ import annotations

import torch
from torch import fx

from routefx.compiler.plan import Plan
from routefx.errors import CalibrationError
from routefx.ir.model_ir import ModelIR

__all__ = ["TRAINED_ROUTERS", "TrainRouters", "router_attrs"]

TRAINED_ROUTERS = ("imitation", "loss")
IMITATION_ORACLE = {"tol": 0.01, "iters": 12}      # the oracle's ε bisection for imitation labels
aten = torch.ops.aten


def router_attrs(gm: fx.GraphModule, op: fx.Node) -> tuple[str, str] | None:
    """(weight, bias) attribute names of the linear router choosing `op`'s routes (argmax(linear(x) − price)),
    or None when its routes come from elsewhere."""
    r = op.args[1]
    if not (isinstance(r, fx.Node) and r.target is aten.argmax.default):
        return None
    sub = r.args[0]
    lin = sub.args[0] if isinstance(sub, fx.Node) and sub.target is aten.sub.Tensor else None
    if lin is None or lin.target is not aten.linear.default or len(lin.args) < 3:
        return None
    w, b = lin.args[1], lin.args[2]
    if w.op != "get_attr" or b.op != "get_attr":
        return None
    return w.target, b.target


class TrainRouters:
    """Requires: every layer planned with a trained router kind is a routed FFN chosen by a linear router whose
              weight and bias are graph tensors.
    Ensures:  the plan's router weights equal the graph's (the trained ones); `plan.calibration["router_training"]`
              says what was trained on what."""

    name = "train_routers"

    def _layers(self, gm, ir, plan):
        from routefx.analysis.forced import routed_layers
        ops = dict(routed_layers(gm, ir))
        return {k: ops.get(k) for k, lp in plan.layers.items() if lp.router in TRAINED_ROUTERS}

    def requires(self, gm, ir, plan) -> str | None:
        bad = [k for k, op in self._layers(gm, ir, plan).items() if op is None or router_attrs(gm, op) is None]
        return f"layer(s) {bad} have no linear router in the graph" if bad else None

    def ensures(self, gm, ir, plan) -> str | None:
        for k, op in self._layers(gm, ir, plan).items():
            w, b = router_attrs(gm, op)
            lp = plan.layers[k]
            if not (torch.equal(getattr(gm, w).cpu(), lp.weight.to(getattr(gm, w).dtype))
                    and torch.equal(getattr(gm, b).cpu(), lp.bias.to(getattr(gm, b).dtype))):
                return f"layer {k}: the graph's router is not the plan's"
        return None

    def __call__(self, gm: fx.GraphModule, ir: ModelIR, plan: Plan, batches: list[dict], target: float) -> list[str]:
        for which, reason in (("requires", self.requires(gm, ir, plan)),):
            if reason is not None:
                raise CalibrationError(f"calibration step '{self.name}': contract broken ({which}): {reason}")
        notes = self.run(gm, ir, plan, batches, target)
        reason = self.ensures(gm, ir, plan)
        if reason is not None:
            raise CalibrationError(f"calibration step '{self.name}': contract broken (ensures): {reason}")
        return notes

    def run(self, gm, ir, plan, batches, target) -> list[str]:
        layers = self._layers(gm, ir, plan)
        if not layers:
            return []
        kinds = {plan.layers[k].router for k in layers}
        if len(kinds) != 1:
            raise CalibrationError(f"one trained router kind per plan, found {sorted(kinds)}")
        kind = kinds.pop()
        if target >= 1.0:
            return [f"{kind} routers: budget 1.0 takes every big branch; routers left as initialised"]
        if kind == "imitation":
            weights, info = _imitation(gm, ir, batches, target)
        else:
            from routefx.calibrate.loss_router import train_loss_routers
            start = {k: (plan.layers[k].weight, plan.layers[k].bias) for k in layers}
            weights, info = train_loss_routers(gm, ir, batches, target, start)
        for k, op in layers.items():
            w_name, b_name = router_attrs(gm, op)
            wt, bt = weights[k]
            getattr(gm, w_name).copy_(wt.to(getattr(gm, w_name).dtype))
            getattr(gm, b_name).copy_(bt.to(getattr(gm, b_name).dtype))
            plan.layers[k].weight = getattr(gm, w_name).detach().cpu().clone()
            plan.layers[k].bias = getattr(gm, b_name).detach().cpu().clone()
        plan.calibration["router_training"] = info
        return [f"{kind} routers trained: " + ", ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}"
                                                        for k, v in info.items() if k != "kind")]


def _imitation(gm, ir, batches, target):
    from routefx.analysis.forced import ForcedRoutes
    from routefx.analysis.oracle import fit_oracle
    from routefx.calibrate.routers import LocalRouter

    forced = ForcedRoutes(gm, ir)
    eps, results = fit_oracle(forced, batches, target, beam=1, tol=IMITATION_ORACLE["tol"],
                              iters=IMITATION_ORACLE["iters"])
    xs = {k: [] for k in forced.keys}
    labels = {k: [] for k in forced.keys}
    for batch, res in zip(batches, results):
        inputs = forced.inputs(batch, res.routes)
        for i, k in enumerate(forced.keys):
            xs[k].append(inputs[k][res.valid].float().cpu())
            labels[k].append(res.routes[i][res.valid])
    gen = torch.Generator().manual_seed(0)
    out, agree = {}, []
    trainer = LocalRouter()
    for k in forced.keys:
        x, y = torch.cat(xs[k]), torch.cat(labels[k])
        w, b = trainer.fit(x, y, gen)
        out[k] = (w, b)
        agree.append(float(((x @ w.T + b).argmax(-1) == y).double().mean()))
    oracle_frac = float(torch.cat([r.cost[r.valid] for r in results]).mean())
    return out, {"kind": "imitation", "oracle_eps": float(eps), "oracle_fraction": oracle_frac,
                 "label_tokens": int(sum(len(v) for v in labels[forced.keys[0]])),
                 "fit_agreement": sum(agree) / len(agree)}
