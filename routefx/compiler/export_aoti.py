"""AOTInductor artifacts: `routefx.export` of a model compiled with backend="inductor" or "triton".

The artifact directory holds `manifest.json` (as for ONNX artifacts, with `"kind": "aoti"`), `model.pt2` and the
plan. `model.pt2` is `torch._inductor.aoti_compile_and_package` of the backend's lowered graph, re-exported with
dynamic batch and sequence dims; `torch._inductor.aoti_load_package(path + "/model.pt2")` loads it without
routefx's Python code (torch alone). The package takes the manifest's input tensors by position, in the
manifest's order (constants are baked in), and returns the manifest's output leaves as a flat tuple of tensors;
`manifest["outputs"]["tree"]` rebuilds the model's structure, as for ONNX artifacts. Where the model's code branches
on a size (torch.export's guards: `manifest["guards"]`), the package computes each guard from its inputs' sizes
and raises RuntimeError naming it for sizes outside, instead of running the captured branch's numbers there.

Routed FFNs in the lowered graph:
- constant routes (Dense, a static router): already plain dense products on their range;
- `routefx_triton::routed_ffn` (backend "triton", CUDA): a `torch.library.triton_op`; AOTInductor compiles the
  Triton kernels it launches into the package;
- `routefx::routed_ffn` (backend "inductor": a Python custom op, which a package cannot call without routefx) is
  replaced for the package by its masked decomposition in torch ops (`_masked_routed_ffn`): every route's FFN is
  computed for every token and weighted by the token's route mask. Outputs equal the routed op's; the package
  does no less compute than a dense model (sum of the range widths per token), so it is a portable artifact, not
  a fast one. `manifest["aoti"]["decomposed_routed_ffns"]` says how many were replaced.
"""
from __future__ import annotations

import ast
import functools
import operator
import os
import types

import torch
import torch.utils._pytree as pytree
from torch import fx, nn

from routefx.errors import ExportError
from routefx.runtime.size_guards import Arithmetic, _eval

__all__ = ["write_package", "PACKAGE"]

PACKAGE = "model.pt2"
_ACC = {torch.float16: torch.float32, torch.bfloat16: torch.float32}


def _masked_routed_ffn(x, routes, gates, w_up, w_gate, w_down, b_up, b_gate, b_down, ranges, activation):
    """`routefx::routed_ffn` in torch ops without data-dependent shapes: each range's FFN on every token, times
    the sum of that token's gates on routes to the range. x [..., d], routes/gates [..., K] -> [..., d]."""
    from routefx.ir.activations import get_activation
    act = get_activation(activation)
    acc = _ACC.get(x.dtype, x.dtype)
    out = torch.zeros(x.shape, dtype=acc, device=x.device)                        # [..., d]
    for r in range(len(ranges) // 2):
        start, end = ranges[2 * r], ranges[2 * r + 1]
        if start == end:
            continue                                                            # an empty range adds exactly 0
        hit = (routes == r).to(acc)                                             # [..., K]
        weight = (hit if gates is None else hit * gates.to(acc)).sum(-1, keepdim=True)   # [..., 1]
        up = nn.functional.linear(x, w_up[start:end], None if b_up is None else b_up[start:end])
        if w_gate is None:
            h = act(up)
        else:
            h = act.glu(nn.functional.linear(x, w_gate[start:end], None if b_gate is None else b_gate[start:end]), up)
        y = nn.functional.linear(h, w_down[:, start:end], b_down)               # [..., d]
        out = out + weight * y.to(acc)
    return out.to(x.dtype)


def _decompose_python_ops(gm: fx.GraphModule) -> tuple[fx.GraphModule, int]:
    """A copy of `gm` whose `routefx::routed_ffn` calls run `_masked_routed_ffn` (traced into torch ops)."""
    target = torch.ops.routefx.routed_ffn.default
    gm = fx.GraphModule(gm, gm.graph.__deepcopy__())
    gm.meta.update(getattr(gm, "meta", {}))
    n = 0
    for node in gm.graph.nodes:
        if node.op == "call_function" and node.target in (target, torch.ops.routefx.routed_ffn):
            node.target = _masked_routed_ffn
            n += 1
    gm.recompile()
    return gm, n


class _SizeTensors(Arithmetic):
    """A guard (`routefx.runtime.size_guards`) built from int64 CPU scalars of the inputs' sizes, so the package
    computes it at run time: under torch.export a Python comparison of sizes would be decided once, at capture.
    Each divisor must be nonzero (Python raises where the tensor ops would divide by zero)."""

    def __init__(self):
        self.divisors = []

    @classmethod
    def holds(cls, tree: ast.Expression, env: dict):
        """The guard over `env` (inputs and baked-in values): a bool tensor, or a bool where it reads no size."""
        ar = cls()
        ok = _eval(tree, env, ar)
        for nonzero in ar.divisors:
            ok = ok & nonzero
        return ok

    def size(self, value, dim: int):
        return torch.full((), value.shape[dim], dtype=torch.int64, device="cpu")

    def binop(self, op: type, a, b):
        if op in (ast.FloorDiv, ast.Mod) and isinstance(b, torch.Tensor):
            self.divisors.append(b != 0)
            b = torch.where(b == 0, 1, b)
        return super().binop(op, a, b)

    def not_(self, a):
        return ~a if isinstance(a, torch.Tensor) else not a

    def all_(self, values):
        return functools.reduce(operator.and_, values, True)

    def any_(self, values):
        return functools.reduce(operator.or_, values, False)

    def call(self, name: str, args: list):
        if not any(isinstance(a, torch.Tensor) for a in args):
            return super().call(name, args)
        args = [torch.as_tensor(a, dtype=torch.int64) for a in args]
        if name == "abs":
            return torch.abs(args[0])
        return functools.reduce(torch.minimum if name == "min" else torch.maximum, args)


class _Flat(nn.Module):
    """forward(*tensors) -> tuple of the output's tensor leaves: the package's calling convention. Checks the
    graph's guards first: a package runs outside them with an error naming the guard, not the other branch's
    numbers."""

    def __init__(self, gm: fx.GraphModule, names: list[str], constants: dict, guards: list[str], baked: dict):
        super().__init__()
        self.gm = gm
        self._names, self._constants, self._baked = names, constants, baked
        self._guards = [(g, ast.parse(g, mode="eval")) for g in guards]

    def forward(self, *tensors):
        env = dict(zip(self._names, tensors))
        for src, tree in self._guards:
            ok = _SizeTensors.holds(tree, {**env, **self._baked})
            if not isinstance(ok, torch.Tensor):
                if not ok:   # on baked-in values only, false: the package could never run
                    raise ExportError(f"the graph's guard {src} is false for the exported constant inputs")
                continue
            torch._assert_async(ok, f"routefx: the package's graph holds for input sizes where {src} "
                                    "(torch.export's guard: the model's code branches on a size there); these "
                                    "inputs are outside it")
        out = self.gm(**env, **self._constants)
        return tuple(leaf for leaf in pytree.tree_leaves(out) if isinstance(leaf, torch.Tensor))


def _examples(tensors: list[dict], device: torch.device, guards: list[str] = (), baked: dict | None = None) -> tuple:
    """Inputs of batch 2 and length 8 (neither 1, so neither is specialised), or the first other sizes inside the
    graph's guards: token ids 1, masks 1."""
    from routefx.runtime.size_guards import SizeGuards
    check = SizeGuards(list(guards))
    for b, s in [(2, 8), (2, 4), (2, 3), (2, 2), (2, 5), (2, 6), (2, 7), (2, 16), (2, 32), (2, 64), (3, 8)]:
        sizes = {"B": b, "S": s}
        shapes = [[sizes.get(d, 3) if isinstance(d, str) else d for d in t["shape"]] for t in tensors]
        sized = {t["name"]: types.SimpleNamespace(shape=shape) for t, shape in zip(tensors, shapes)}
        if check.failed({**(baked or {}), **sized}) is None:
            break
    else:
        raise ExportError(f"no example batch and length for AOTInductor is inside the graph's guards {guards}")
    return tuple(torch.ones(shape, dtype=getattr(torch, t["dtype"]), device=device)
                 for t, shape in zip(tensors, shapes))


def write_package(gm: fx.GraphModule, tensors: list[dict], constants: dict, directory: str,
                  guards: list[str] = (), baked: dict | None = None) -> dict:
    """Compile `gm` (a backend's lowered graph, called as gm(**inputs, **constants)) into directory/model.pt2,
    checking `guards` (the input sizes it holds for, `routefx.runtime.size_guards`, over the inputs and `baked`:
    the values of the model's other arguments, `constants` among them) on every call; returns the manifest's
    "aoti" entry. Raises `ExportError` when torch.export or AOTInductor cannot compile it."""
    lowered, decomposed = _decompose_python_ops(gm)
    params = list(lowered.parameters()) + list(lowered.buffers())
    device = params[0].device if params else torch.device("cpu")
    names = [t["name"] for t in tensors]
    baked = baked if baked is not None else constants
    examples = _examples(tensors, device, guards, baked)
    auto = torch.export.Dim.AUTO
    dims = tuple({i: auto for i, d in enumerate(t["shape"]) if isinstance(d, str)} or None for t in tensors)
    try:
        with torch.no_grad():
            ep = torch.export.export(_Flat(lowered, names, constants, list(guards), baked).eval(), examples,
                                     dynamic_shapes=(dims,), strict=False)
    except Exception as e:  # torch.export raises many types
        raise ExportError(f"torch.export could not re-capture the lowered graph for AOTInductor: "
                          f"{type(e).__name__}: {_first(e)}") from e
    path = os.path.join(directory, PACKAGE)
    try:
        torch._inductor.aoti_compile_and_package(ep, package_path=path)
    except Exception as e:  # Inductor raises many types
        raise ExportError(f"AOTInductor could not compile the graph ({device}): {type(e).__name__}: "
                          f"{_first(e)}") from e
    return {"package": PACKAGE, "device": device.type, "decomposed_routed_ffns": decomposed,
            "torch": torch.__version__}


def _first(e: BaseException) -> str:
    text = str(e).strip().splitlines()
    return text[0] if text else ""
