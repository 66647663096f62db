"""The input guards torch.export leaves with a captured graph, kept so that a graph runs only on sizes it holds for.

A model's code may branch on a length: a chunked scan pads the sequence to its chunk size, a convolution state is
padded to its kernel when the prompt is shorter, a loop runs once per position. Export then records guards on the
inputs' sizes (`ep.module()`'s `_guards_fn`: `64 >= S + (64 - S % 64) % 64`, `S <= 3`, ...). The eager graph
checks them itself (an AssertionError); a lowered graph (ONNX Runtime, Triton, Inductor) does not, and runs on
whatever it gets: an error in some kernel, or other numbers. `InputGuards` keeps the guards of a capture before
any pass rewrites the graph, and `check` says whether inputs are within them, so that the caller captures again
for inputs that are not (`CompiledModel`, `routefx.generate.graphs`).

Export makes the dims it was asked to treat as dynamic range from 2 (its 0/1 specialisation), so a guard fails for
a size of 1 that the graph computes as it always has; `check(..., ones=False)` does not hold that against the
inputs (each such dim is checked as 2). The generation graphs of models with recurrent state check size 1 as it
is (`ones=True`): their code does branch on a batch of one (Mamba-2 hybrids mask padding only when B > 1).
"""
from __future__ import annotations

import dataclasses
from typing import Callable

import torch
from torch import fx

from routefx.ir import graph_utils as gu

__all__ = ["InputGuards", "input_guards"]


@dataclasses.dataclass(frozen=True)
class InputGuards:
    fn: Callable | None                          # export's guard function over the placeholders, or None
    names: tuple[str, ...] = ()                  # the placeholders, in the order `fn` takes them
    dynamic: dict = dataclasses.field(default_factory=dict)   # placeholder -> dims that are symbols in the capture

    def check(self, feeds: dict, *, ones: bool = False) -> str | None:
        """None when `feeds` (placeholder name -> tensor) are within the capture's guards (or it has none, or a
        placeholder is not among `feeds`); else the failed guard's message. `ones`: a dynamic dim of size 1
        is checked as it is (else as 2, see the module docstring)."""
        if self.fn is None or any(n not in feeds for n in self.names):
            return None
        args = []
        for n in self.names:
            t = feeds[n]
            if not ones and isinstance(t, torch.Tensor) and any(
                    d < t.dim() and t.shape[d] == 1 for d in self.dynamic.get(n, ())):
                shape = [2 if d in self.dynamic[n] and s == 1 else s for d, s in enumerate(t.shape)]
                t = torch.empty(shape, dtype=t.dtype, device="meta")   # the guards read sizes only
            args.append(t)
        try:
            self.fn(*args)
        except AssertionError as e:
            return str(e).strip() or "a guard failed"
        except Exception:  # noqa: BLE001 - a guard this check cannot evaluate: run as before guards were read
            return None
        return None


def input_guards(gm: fx.GraphModule) -> InputGuards:
    """The guards of a graph fresh from `ep.module()` (before a pass rewrites it)."""
    from torch.fx.experimental.symbolic_shapes import is_concrete_int
    fn = getattr(gm, "_guards_fn", None)
    names, dynamic = [], {}
    for n in gm.graph.nodes:
        if n.op != "placeholder":
            continue
        names.append(n.target)
        v = gu.val(n)
        if isinstance(v, torch.Tensor):
            dynamic[n.target] = frozenset(d for d, s in enumerate(v.shape) if not is_concrete_int(s))
    return InputGuards(fn, tuple(names), dynamic)
