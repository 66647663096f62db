"""The pass contract.

A pass is a small class with a `name`, a docstring stating `Requires:` and `Ensures:`, the same two as checks
(`requires(gm, ctx)` before the pass and `ensures(gm, ctx, after)` after it, each returning None when it holds
or the reason it does not), and `run(gm, ctx) -> PassResult`. Passes rewrite `gm` in place (the pass manager
owns the graph, runs the checks, removes dead code, and verifies the graph after each pass); they read structure
from `ctx.ir` (the `ModelIR` recomputed before the pass) and decisions from `ctx.plan`, never from raw data.
"""
from __future__ import annotations

import dataclasses
from typing import Any

from torch import fx

from routefx.ir.model_ir import ModelIR

__all__ = ["Pass", "PassContext", "PassResult", "Miss", "planned_ffns", "routed_op", "missing_routed", "plan_layers",
           "layers_ready"]


@dataclasses.dataclass(frozen=True)
class Miss:
    """A place the pass was asked to rewrite and did not, with the reason."""

    where: str
    reason: str


@dataclasses.dataclass
class PassResult:
    rewrites: int = 0
    misses: list[Miss] = dataclasses.field(default_factory=list)
    notes: list[str] = dataclasses.field(default_factory=list)


@dataclasses.dataclass
class PassContext:
    ir: ModelIR          # recognised on the graph the pass receives
    plan: Any = None     # the Plan: the decisions the pass applies


class Pass:
    """Base class. Subclasses set `name`, implement `run`, and state their contract in `requires`/`ensures`."""

    name: str = "pass"

    def requires(self, gm: fx.GraphModule, ctx: PassContext) -> str | None:
        """None when the pass can run on `gm`, else the reason it cannot."""
        return None

    def run(self, gm: fx.GraphModule, ctx: PassContext) -> PassResult:  # pragma: no cover - interface
        raise NotImplementedError

    def ensures(self, gm: fx.GraphModule, ctx: PassContext, after: ModelIR) -> str | None:
        """None when the rewritten `gm` (recognised as `after`) keeps the promise, else what is wrong.
        `ctx` is the context the pass ran with (`ctx.ir` is the structure before it)."""
        return None

    def __repr__(self) -> str:
        return self.name


def planned_ffns(ctx: PassContext, res: PassResult):
    """(key, layer plan, routed_ffn node) for each FFN in `ctx.plan.layers` that the graph holds as a routed
    FFN; a planned FFN the graph does not hold is recorded as a miss in `res`."""
    layers = ctx.plan.layers if ctx.plan is not None else {}
    blocks = {b.key: b for b in ctx.ir.blocks}
    for key, lp in layers.items():
        b = blocks.get(key)
        if b is None or b.ffn is None or b.ffn.routed is None:
            res.misses.append(Miss(key, "no routed FFN with this key in the graph"))
            continue
        yield key, lp, b.ffn.match.out


def routed_op(ir: ModelIR, key: str):
    """The routed_ffn node of the FFN `key`, or None."""
    b = next((b for b in ir.blocks if b.key == key), None)
    return None if b is None or b.ffn is None or b.ffn.routed is None else b.ffn.match.out


def missing_routed(ir: ModelIR, keys) -> str | None:
    """The reason some of `keys` have no routed FFN in `ir`, or None."""
    missing = [k for k in keys if routed_op(ir, k) is None]
    return f"no routed FFN for planned layer(s) {missing} (run raise_ffn first)" if missing else None


def plan_layers(ctx: PassContext, keep=lambda lp: True) -> dict:
    """{key: LayerPlan} of the planned layers for which `keep(lp)` holds."""
    return {k: lp for k, lp in (ctx.plan.layers if ctx.plan is not None else {}).items() if keep(lp)}


def layers_ready(ctx: PassContext, layers: dict, broken, what: str) -> str | None:
    """A `requires` check: None when no layer of `layers` is `broken(lp)` and each has a routed FFN; else the
    reason, naming the layers and `what` is wrong with them."""
    bad = [k for k, lp in layers.items() if broken(lp)]
    return f"layer(s) {bad} {what}" if bad else missing_routed(ctx.ir, layers)
