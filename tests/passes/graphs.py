"""Shared fixtures of the pass tests: a captured zoo model, hand-written plans, and a routed reference built from
the model's own modules with hooks (so the expected numbers never come from routefx's FFN code)."""
from __future__ import annotations

import contextlib

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


@contextlib.contextmanager
def routed_reference(model, ffns: dict):
    """Make PlainLM's FFN `z.<i>.b` compute a routed FFN from its own modules: `ffns[i] = (routes_fn, neurons)`,
    where routes_fn(x [B, S, d]) -> [B, S] route ids (0 skip, 1 the neuron subset `neurons`, 2 all neurons)."""
    handles, state = [], {}
    for i, (routes_fn, neurons) in ffns.items():
        ffn = model.z[i].b
        mask = torch.zeros(ffn.b.in_features)
        mask[neurons] = 1.0

        def down_pre(mod, inp, mask=mask, i=i):
            return (inp[0] * mask,) if state.get(i) else None

        def ffn_hook(mod, inp, out, i=i, routes_fn=routes_fn):
            if state.get(i):
                return None
            state[i] = True
            try:
                small = mod(*inp)
            finally:
                state[i] = False
            r = routes_fn(inp[0]).unsqueeze(-1)                                   # [B, S, 1]
            return torch.where(r == 2, out, torch.where(r == 1, small, torch.zeros_like(out)))

        handles += [ffn.b.register_forward_pre_hook(down_pre), ffn.register_forward_hook(ffn_hook)]
    try:
        yield model
    finally:
        for h in handles:
            h.remove()


def layer(F: int, k: int, **kw) -> LayerPlan:
    return LayerPlan(F=F, k=k, **kw)
