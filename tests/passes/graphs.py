"""Shared fixtures of the pass tests: a captured zoo model and hand-written plans."""
from __future__ import annotations

import torch

from routefx.compiler.plan import LayerPlan, Plan
from routefx.ir import capture
from routefx.passes.manager import PassManager
from tests.zoo import ZOO, example_inputs

aten = torch.ops.aten
ROUTED = torch.ops.routefx.routed_ffn.default


def captured(name: str, batch: int = 2, seq: int = 7):
    entry = ZOO[name]
    model = entry.build()
    args, kwargs = example_inputs(entry, batch=batch, seq=seq)
    return model, capture(model, args, kwargs), args, kwargs


def plan(layers: dict | None = None, pruned=()) -> Plan:
    return Plan(policy={"policy": "test"}, layers=dict(layers or {}), pruned=list(pruned))


def run(gm, passes, p: Plan | None = None):
    """Run `passes` under the manager (contracts, cleanup, verification); returns (ir, reports)."""
    return PassManager(passes).run(gm, plan=p)


def count(gm, target) -> int:
    return sum(n.op == "call_function" and n.target is target for n in gm.graph.nodes)


def routed_ops(gm) -> list:
    return [n for n in gm.graph.nodes if n.op == "call_function" and n.target is ROUTED]


def layer(F: int, k: int, **kw) -> LayerPlan:
    return LayerPlan(F=F, k=k, **kw)
