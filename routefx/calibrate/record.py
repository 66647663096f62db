"""Run a captured graph and keep the values of chosen nodes (calibration statistics, route accounting)."""
from __future__ import annotations

from typing import Callable

import sympy
import torch
from torch import fx
from torch.fx import _pytree as fx_pytree
from torch.utils import _pytree as pytree

from routefx.calibrate.data import token_mask
from routefx.ir.flops import data_dependent_symbols, dim_expr

__all__ = ["run_recording", "observe_routes", "data_dependent_sizes"]


class _Recorder(fx.Interpreter):
    def __init__(self, gm, wanted: set, on_value: Callable | None):
        super().__init__(gm)
        self.wanted, self.values, self.on_value = wanted, {}, on_value

    def run_node(self, n):
        out = super().run_node(n)
        if n in self.wanted:
            if self.on_value is not None:
                self.on_value(n, out)
            else:
                self.values[n] = out
        return out


def run_recording(gm: fx.GraphModule, kwargs: dict, nodes, on_value: Callable | None = None) -> dict:
    """Run `gm(**kwargs)`; return {node: value} for `nodes` (or pass each to `on_value(node, value)`)."""
    flat = fx_pytree.tree_flatten_spec(([], kwargs), gm._in_spec)
    rec = _Recorder(gm, set(nodes), on_value)
    with torch.no_grad():
        rec.run(*flat)
    return rec.values


def observe_routes(gm: fx.GraphModule, nodes: list[fx.Node], batches: list[dict]):
    """Per batch: (real-token mask [B, S], {routed node: its route ids}), for `routefx.ir.flops.realised_flops`."""
    for batch in batches:
        values = run_recording(gm, batch, [n.args[1] for n in nodes]) if nodes else {}
        yield token_mask(batch), {n: values[n.args[1]] for n in nodes}


def data_dependent_sizes(gm: fx.GraphModule, kwargs: dict) -> dict | None:
    """{shape symbol: size} of one run of `gm(**kwargs)`, for FLOP counts that depend on the data (a MoE that
    splits its rows by expert: `routefx.ir.flops.data_dependent_symbols`); None, and no run, where none does."""
    wanted = data_dependent_symbols(gm)
    if not wanted:
        return None
    sizes: dict = {}

    def record(n, out):
        for fake, real in zip(pytree.tree_leaves(n.meta.get("val")), pytree.tree_leaves(out)):
            if isinstance(fake, torch.Tensor) and isinstance(real, torch.Tensor):
                for dim, size in zip(fake.shape, real.shape):
                    if not isinstance(dim, int) and isinstance(e := dim_expr(dim), sympy.Symbol):
                        sizes.setdefault(e, int(size))

    run_recording(gm, kwargs, [n for n in gm.graph.nodes if n.op != "output"], on_value=record)
    return sizes
