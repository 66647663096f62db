"""Re-propagate `meta["val"]` (fake tensors with the capture's symbolic batch/sequence sizes) through a graph.

torch's `FakeTensorProp`, run in the fake mode the capture created, with the graph's weights and buffers read as
static-shape fakes: a pass that builds a malformed node (wrong shapes, wrong arguments) fails here, next to the
pass, instead of at run time.
"""
from __future__ import annotations

import contextlib

import torch
from torch import fx
from torch.fx.passes.fake_tensor_prop import FakeTensorProp

__all__ = ["propagate_shapes_", "propagate_changed_", "fake_mode_of"]


def fake_mode_of(gm: fx.GraphModule):
    for n in gm.graph.nodes:
        v = n.meta.get("val")
        if isinstance(v, torch.Tensor) and hasattr(v, "fake_mode"):
            return v.fake_mode
    raise RuntimeError("graph carries no fake tensor values (was it captured with routefx.ir.capture?)")


class _CapturedFakeProp(FakeTensorProp):
    """FakeTensorProp whose `get_attr` hands out one static-shape fake per stored tensor."""

    def __init__(self, gm: fx.GraphModule, mode):
        super().__init__(gm, mode)
        self._fakes: dict[int, torch.Tensor] = {}

    def call_function(self, target, args, kwargs):
        if target is torch.ops.aten.linear.default:
            # [..., d_in] x [d_out, d_in] -> [..., d_out], by its definition: torch 2.11's fake linear flattens and
            # re-views a symbolic [B, S, d] input by its size hints, which reads [B, S] back as [2, (B*S)//2]
            x, w = args[0], args[1]
            return x.new_empty((*x.shape[:-1], w.shape[0]))
        return super().call_function(target, args, kwargs)

    def get_attr(self, target, args, kwargs):
        t = super().get_attr(target, args, kwargs)
        if not isinstance(t, torch.Tensor):
            return t
        if id(t) not in self._fakes:
            self._fakes[id(t)] = self._mode.from_tensor(t, static_shapes=True)
        return self._fakes[id(t)]


def propagate_shapes_(gm: fx.GraphModule) -> None:
    """Recompute `meta["val"]` of every node in place, from the placeholders' own fake values.

    Guards are suppressed: the capture decided which dims are dynamic, and re-propagation must not specialise
    them (torch 2.11's fake matmul guards `S == 6` when a static dim of the other operand, e.g. the rotary
    frequencies' d/2, equals the example's length, and the whole graph's sizes then read as constants)."""
    mode = fake_mode_of(gm)
    inputs = [n.meta.get("val") for n in gm.graph.nodes if n.op == "placeholder"]
    quiet = mode.shape_env.suppress_guards() if mode.shape_env is not None else contextlib.nullcontext()
    with quiet:
        _CapturedFakeProp(gm, mode).propagate_dont_convert_inputs(*inputs)


def _shape_key(v) -> object:
    """What a node's value says about shapes: per tensor its (shape, dtype); other values as text."""
    if isinstance(v, torch.Tensor):
        return tuple(str(s) for s in v.shape), v.dtype
    if isinstance(v, (list, tuple)):
        return tuple(_shape_key(x) for x in v)
    return str(v)


def propagate_changed_(gm: fx.GraphModule, changed: set[str]) -> int:
    """Incremental `propagate_shapes_` after a pass; returns how many nodes it recomputed.

    Recomputes `meta["val"]` of the nodes named in `changed` (new nodes and nodes whose target or arguments a
    pass changed), of every get_attr node (a pass may put another tensor behind an unchanged name), and,
    transitively, of the users of every node whose value changed shape or dtype. Every other node keeps its value:
    a node's value depends only on its inputs' values, so this computes what a full propagation would."""
    mode = fake_mode_of(gm)
    prop = _CapturedFakeProp(gm, mode)
    dirty = set(changed)
    done = 0
    quiet = mode.shape_env.suppress_guards() if mode.shape_env is not None else contextlib.nullcontext()
    with quiet, mode:
        for n in gm.graph.nodes:
            old = n.meta.get("val")
            if n.op == "placeholder" or (n.name not in dirty and n.op != "get_attr" and old is not None):
                prop.env[n] = old
                continue
            prop.env[n] = prop.run_node(n)
            done += 1
            if _shape_key(old) != _shape_key(n.meta.get("val")):
                dirty.update(u.name for u in n.users)
    return done
