"""Re-propagate `meta["val"]` (fake tensors with the capture's symbolic batch/sequence sizes) through a graph.

Runs every node on fake tensors in the fake mode the capture created, so a pass that builds a malformed node
(wrong shapes, wrong arguments) fails here, next to the pass, instead of at run time.
"""
from __future__ import annotations

import operator

import torch
from torch import fx
from torch.utils._pytree import tree_map

__all__ = ["propagate_shapes_", "fake_mode_of"]


def fake_mode_of(gm: fx.GraphModule):
    for n in gm.graph.nodes:
        v = n.meta.get("val")
        if isinstance(v, torch.Tensor) and hasattr(v, "fake_mode"):
            return v.fake_mode
    raise RuntimeError("graph carries no fake tensor values (was it captured with routefx.ir.capture?)")


def _fetch(gm, target):
    obj = gm
    for part in target.split("."):
        obj = getattr(obj, part)
    return obj


def propagate_shapes_(gm: fx.GraphModule) -> None:
    """Recompute `meta["val"]` of every call_function / get_attr node in place (placeholders keep theirs)."""
    mode = fake_mode_of(gm)
    env: dict[fx.Node, object] = {}
    consts: dict[int, torch.Tensor] = {}
    with mode:
        for n in gm.graph.nodes:
            if n.op == "placeholder":
                env[n] = n.meta.get("val")
            elif n.op == "get_attr":
                t = _fetch(gm, n.target)
                if isinstance(t, torch.Tensor):
                    key = id(t)
                    if key not in consts:
                        consts[key] = mode.from_tensor(t, static_shapes=True)
                    env[n] = consts[key]
                else:
                    env[n] = t
                n.meta["val"] = env[n]
            elif n.op == "call_function":
                args = tree_map(lambda a: env[a] if isinstance(a, fx.Node) else a, n.args)
                kwargs = tree_map(lambda a: env[a] if isinstance(a, fx.Node) else a, n.kwargs)
                out = n.target(*args, **kwargs)
                env[n] = out
                if out is not None or n.target is operator.getitem:
                    n.meta["val"] = out
            elif n.op == "call_module":
                env[n] = None
            # output: nothing to do
