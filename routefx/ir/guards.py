"""The input guards torch.export leaves with a captured graph, kept so that a graph runs only on sizes it holds for.

A model's code may branch on a length: a chunked scan pads the sequence to its chunk size, a convolution state is
padded to its kernel when the prompt is shorter, a loop runs once per position. Export then records guards on the
inputs' sizes (`ep.module()`'s `_guards_fn`: `64 >= S + (64 - S % 64) % 64`, `S <= 3`, ...). The eager graph
checks them itself (an AssertionError); a lowered graph (ONNX Runtime, Triton, Inductor) does not, and runs on
whatever it gets: an error in some kernel, or other numbers. `InputGuards` keeps the guards of a capture before
any pass rewrites the graph, and `check` says whether inputs are within them, so that the caller captures again
for inputs that are not (`CompiledModel`, `routefx.generate.graphs`).

Sizes are checked as they are, 1 included: export makes the dims it was asked to treat as dynamic range from 2
(its 0/1 specialisation), and a guard that does fail at 1 is one the model's code depends on (XLNet's relative
positions `(2S - 1) % S != 0`: the eager graph asserts; Mamba-2 hybrids mask padding only when B > 1); the caller
captures again for that size (`routefx.ir.capture` exports a size of 1 as given where the graph exported at 2 does
not hold for it). A graph's guard function is export's guards on the model's code (`S <= 2048`, `P + S >= 30`)
and the value ranges of the input sizes, which hold those guards again and the ranges from 2: a size bound to
others by a guard gets a lower bound from them (a decode step's mask of P + S columns: `>= 4`) that fails for a
one-token prompt, which the graph serves as it serves S = 1. `module` makes the graph without those lower bounds
(every bound the model's code sets is among export's own guards); upper bounds are kept.
"""
from __future__ import annotations

import dataclasses
from typing import Callable

import sympy
import torch
from torch import fx

__all__ = ["InputGuards", "input_guards", "module", "serves"]


@dataclasses.dataclass(frozen=True)
class InputGuards:
    fn: Callable | None                          # export's guard function over the placeholders, or None
    names: tuple[str, ...] = ()                  # the placeholders, in the order `fn` takes them
    code: tuple[str, ...] | None = ()            # its guards as Python source over `L['name'].size()[dim]`
    #                                              (None: a guard function whose source this torch did not give)

    def check(self, feeds: dict) -> str | None:
        """None when `feeds` (placeholder name -> tensor) are within the capture's guards (or it has none, or a
        placeholder is not among `feeds`); else the failed guard's message."""
        if self.fn is None or any(n not in feeds for n in self.names):
            return None
        try:
            self.fn(*(feeds[n] for n in self.names))
        except AssertionError as e:
            return str(e).strip() or "a guard failed"
        except Exception:  # noqa: BLE001 - a guard this check cannot evaluate: run as before guards were read
            return None
        return None


def module(ep) -> fx.GraphModule:
    """`ep.module()` whose guard function keeps export's guards and the upper bounds of the input sizes, without
    their lower bounds past 2 (see above). Where this torch makes the guard function otherwise: `ep.module()`."""
    try:
        from torch.export import _unlift
        from torch.utils._sympy.value_ranges import ValueRanges
        make, convert = _unlift._get_input_guards_for_graph, _unlift._convert_guards_code_to_fn
    except (ImportError, AttributeError):  # pragma: no cover - another torch release
        return ep.module()

    def ranges_from_2(placeholders, ranges, paths):
        loose = {}
        for expr, vr in ranges.items():
            try:
                loose[expr] = ValueRanges(min(vr.lower, 2), vr.upper)
            except Exception:  # noqa: BLE001 - a range this cannot loosen: kept as it is
                loose[expr] = vr
        return make(placeholders, loose, paths)

    def keeping_code(code, paths):
        fn = convert(code, paths)
        fn.routefx_code = tuple(code)     # `L['input_ids'].size()[1] <= 2048`, ...: for an artifact's runtime
        return fn

    _unlift._get_input_guards_for_graph, _unlift._convert_guards_code_to_fn = ranges_from_2, keeping_code
    try:
        return ep.module()
    finally:
        _unlift._get_input_guards_for_graph, _unlift._convert_guards_code_to_fn = make, convert


def input_guards(gm: fx.GraphModule) -> InputGuards:
    """The guards of a graph fresh from `ep.module()` (before a pass rewrites it)."""
    names = tuple(n.target for n in gm.graph.nodes if n.op == "placeholder")
    fn = getattr(gm, "_guards_fn", None)
    code = getattr(fn, "routefx_code", None) if fn is not None else ()
    return InputGuards(fn, names, code)


def serves(gm: fx.GraphModule, feeds: dict) -> bool:
    """Whether a graph fresh from `ep.module()` serves `feeds` (input name -> value) by their sizes: every tensor
    input is a placeholder of that name and rank whose constant sizes equal the input's, whose symbolic sizes take
    one value per symbol (and a compound size, e.g. `2*s0`, the value it evaluates to), and export's guards hold.
    Conservative: a tensor input it cannot place, or a size it cannot evaluate, is a no."""
    vals = {n.target: n.meta.get("val") for n in gm.graph.nodes if n.op == "placeholder"}
    bound: dict = {}
    compound = []
    for name, x in feeds.items():
        if not isinstance(x, torch.Tensor):
            continue
        v = vals.get(name)
        if not isinstance(v, torch.Tensor) or v.dim() != x.dim():
            return False
        for want, got in zip(v.shape, x.shape):
            if isinstance(want, int):
                if want != got:
                    return False
                continue
            expr = want.node.expr
            if isinstance(expr, sympy.Symbol):
                if bound.setdefault(expr, got) != got:
                    return False
            elif isinstance(expr, sympy.Integer):
                if int(expr) != got:
                    return False
            else:
                compound.append((expr, got))
    for expr, got in compound:
        value = expr.xreplace({k: sympy.Integer(b) for k, b in bound.items()})
        if not isinstance(value, sympy.Integer) or int(value) != got:
            return False
    return input_guards(gm).check(feeds) is None
