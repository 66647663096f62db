"""Forced routes: a copy of a compiled Duo graph whose routed FFNs take their route ids from tensors you set.

The hook for analysis (the oracle, router agreement, routing maps), never an inference path: each routed
`routed_ffn` with more than one range reads `routes` from a buffer of the copy instead of its router, so a caller
can run any per-token assignment. The copy shares weights with the compiled graph (nothing is duplicated); its
routers are left as dead code and removed.

Shapes: L = routed layers, B = batch, S = sequence, V = vocabulary; routes [L, B, S] int64, values in
[0, R) (0 skip, 1 small, 2 big for Duo).
"""
from __future__ import annotations

import copy

import torch
from torch import fx

from routefx.calibrate.record import run_recording
from routefx.errors import PolicyError
from routefx.ir import graph_utils as gu
from routefx.ir.model_ir import ModelIR

__all__ = ["ForcedRoutes", "routed_layers"]

_ATTR = "routefx_forced_routes_{}"


def routed_layers(gm: fx.GraphModule, ir: ModelIR) -> list[tuple[str, fx.Node]]:
    """(layer key, routed_ffn node) of every per-token routed FFN (more than one range), in graph order."""
    keys = {b.ffn.match.out: b.key for b in ir.blocks if b.ffn is not None and b.ffn.routed is not None}
    return [(keys.get(n, n.name), n) for n in gm.graph.nodes if gu.is_routed(n) and len(n.args[9]) > 2]


class ForcedRoutes:
    """Runs a compiled model's graph with routes chosen by the caller.

    `forced(batch, routes)` returns the output logits [B, S, V]; `forced.inputs(batch, routes)` the FFN inputs
    of every routed layer ({key: [B, S, d]}) as well. `costs` [L, R] is each route's compute fraction
    (|range| / max |range|), `keys` the layer keys.
    """

    def __init__(self, gm: fx.GraphModule, ir: ModelIR):
        layers = routed_layers(gm, ir)
        if not layers:
            raise PolicyError("forced routes need a graph with routed FFNs of several ranges (a Duo policy with a "
                              "per-token or static router); this graph has none")
        graph = copy.deepcopy(gm.graph)
        self.gm = fx.GraphModule(gm, graph)                # shares gm's tensors
        self.gm._in_spec, self.gm._out_spec = gm._in_spec, gm._out_spec
        self.gm.graph._codegen = copy.deepcopy(gm.graph._codegen)
        self.gm.recompile()
        names = {n.name: n for n in graph.nodes}
        self.keys, self._ops = [], []
        ranges = []
        for i, (key, op) in enumerate(layers):
            node = names[op.name]
            self.gm.register_buffer(_ATTR.format(i), torch.zeros(1, 1, 1, dtype=torch.int64))
            with graph.inserting_before(node):
                node.update_arg(1, graph.get_attr(_ATTR.format(i)))
            self.keys.append(key)
            self._ops.append(node)
            ranges.append(node.args[9])
        graph.eliminate_dead_code()
        self.gm.recompile()
        R = max(len(r) for r in ranges) // 2
        lens = torch.zeros(len(ranges), R, dtype=torch.float64)
        for i, r in enumerate(ranges):
            lens[i, :len(r) // 2] = torch.tensor([r[j + 1] - r[j] for j in range(0, len(r), 2)], dtype=torch.float64)
        self.costs = lens / lens.max(dim=1, keepdim=True).values      # [L, R]
        self.big = self.costs.argmax(dim=1)                             # [L] the full route of each layer

    @classmethod
    def from_compiled(cls, cm, batches) -> tuple["ForcedRoutes", list[dict]]:
        """The forced-route copy of compiled model `cm`'s graph for the input form of `batches`, and the batches
        as that graph takes them (all keyword arguments, e.g. `use_cache=False` added for HF models)."""
        entry, batches = cm._batch_entry(batches)
        return cls(entry.gm, entry.ir), batches

    @property
    def num_layers(self) -> int:
        return len(self.keys)

    def _set(self, routes: torch.Tensor) -> None:
        if routes.dim() != 3 or routes.shape[0] != self.num_layers:
            raise ValueError(f"routes must be [L={self.num_layers}, B, S], got {list(routes.shape)}")
        for i in range(self.num_layers):
            setattr(self.gm, _ATTR.format(i), routes[i].unsqueeze(-1).to(torch.int64).contiguous())

    def all_big(self, shape) -> torch.Tensor:
        """[L, B, S] routes taking every layer's full range."""
        return self.big.view(-1, 1, 1).expand(self.num_layers, *shape).clone()

    def __call__(self, batch: dict, routes: torch.Tensor) -> torch.Tensor:
        self._set(routes)
        with torch.no_grad():
            return _logits(self.gm(**batch))

    def inputs(self, batch: dict, routes: torch.Tensor) -> dict:
        """{layer key: FFN input [B, S, d]} with these routes."""
        self._set(routes)
        vals = run_recording(self.gm, batch, [op.args[0] for op in self._ops])
        return {key: vals[op.args[0]] for key, op in zip(self.keys, self._ops)}


def _logits(out) -> torch.Tensor:
    if isinstance(out, torch.Tensor):
        return out
    if hasattr(out, "logits"):
        return out.logits
    if isinstance(out, (tuple, list)):
        return out[0]
    return out["logits"]
