"""Cleanup: remove the nodes nothing uses, in place (the pass manager runs it after every pass).

Built on `torch.fx.Graph.eliminate_dead_code` with torch's own purity rule (`Node.is_impure`; random ops such
as attention with its dropout argument count as pure: an inference graph never observes them) plus the one
rule torch lacks: an in-place write into a graph temporary that nothing reads afterwards is unobservable, so
it is dead too (a write into a placeholder, a weight, or a temporary read later is kept).

Requires: nothing.
Ensures:  every node without users is impure by the rule above (placeholders, outputs, side effects).
"""
from __future__ import annotations

import inspect
import operator

import torch
from torch import fx

from routefx.ir import graph_utils as gu
from routefx.passes.base import Pass, PassContext, PassResult

__all__ = ["Cleanup", "is_impure"]

# ops that return (a view of) their first argument: an in-place write through them lands in that argument
_VIEWLIKE = gu.VIEWS | gu.TRANSPOSES | gu.IDENTITY | gu.targets(torch.ops.aten.slice, torch.ops.aten.select,
                                                                 torch.ops.aten.expand, torch.ops.aten.as_strided)


def _dead_temporary_write(n: fx.Node, order: dict | None = None) -> bool:
    """An in-place op writing into a graph temporary that no later node reads. order: node -> position in the
    graph (computed here when not given; `Cleanup.run` computes it once per graph: dead-code elimination only
    removes nodes, so positions stay comparable)."""
    if n.op != "call_function" or not isinstance(n.target, torch._ops.OpOverload):
        return False
    if not n.target._schema.is_mutable or "assert" in n.target._schema.name:
        return False
    buf = n.args[0] if n.args else None
    if not isinstance(buf, fx.Node):
        return False
    base = buf
    while base.op == "call_function" and (base.target in _VIEWLIKE or base.target is operator.getitem):
        base = base.args[0]
    if base.op in ("placeholder", "get_attr"):
        return False
    # every alias of the written memory: views of the base (DeepSeek-V3 writes into slices of a new_empty that
    # attention reads whole); a read of any of them after the write observes it
    aliases, stack = set(), [base]
    while stack:
        a = stack.pop()
        if a not in aliases:
            aliases.add(a)
            stack.extend(u for u in a.users if u.op == "call_function" and u.args and u.args[0] is a
                         and (u.target in _VIEWLIKE or u.target is operator.getitem))
    if order is None:
        order = {m: i for i, m in enumerate(n.graph.nodes)}
    return not any(u is not n and order[u] > order[n] for a in aliases for u in a.users)


# torch releases that tell random ops apart take `impure_random`; older ones count them as pure already
_RANDOM_FLAG = {"impure_random": False} if "impure_random" in inspect.signature(fx.Node.is_impure).parameters \
    else {}


def is_impure(n: fx.Node, order: dict | None = None) -> bool:
    return False if _dead_temporary_write(n, order) else n.is_impure(**_RANDOM_FLAG)


class Cleanup(Pass):
    name = "cleanup"

    def run(self, gm: fx.GraphModule, ctx: PassContext) -> PassResult:
        before = len(gm.graph.nodes)
        order = {m: i for i, m in enumerate(gm.graph.nodes)}
        gm.graph.eliminate_dead_code(is_impure_node=lambda n: is_impure(n, order))
        return PassResult(rewrites=before - len(gm.graph.nodes))

    def ensures(self, gm: fx.GraphModule, ctx: PassContext, after) -> str | None:
        order = {m: i for i, m in enumerate(gm.graph.nodes)}
        dead = [n.name for n in gm.graph.nodes if not n.users and not is_impure(n, order)]
        return f"unused pure nodes remain: {dead[:5]}" if dead else None
