"""The pass contract.

A pass is a small class with a `name`, a docstring stating `Requires:` and `Ensures:`, and
`run(gm, ctx) -> PassResult`. Passes rewrite `gm` in place (the pass manager owns the graph and verifies it
after each pass); they read structure from `ctx.ir` (the `ModelIR` recomputed before the pass) and decisions
from `ctx.plan`, never from raw data.
"""
from __future__ import annotations

import dataclasses
from typing import Any

from torch import fx

from routefx.ir.model_ir import ModelIR

__all__ = ["Pass", "PassContext", "PassResult", "Miss", "planned_ffns"]


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
    ir: ModelIR
    policy: Any = None
    plan: Any = None


class Pass:
    """Base class. Subclasses set `name` and implement `run`."""

    name: str = "pass"

    def run(self, gm: fx.GraphModule, ctx: PassContext) -> PassResult:  # pragma: no cover - interface
        raise NotImplementedError

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
