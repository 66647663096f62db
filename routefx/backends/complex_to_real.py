"""Complex-valued subgraphs as real arithmetic on a trailing (real, imaginary) pair dimension.

Some families apply rotary embeddings with complex numbers (DeepSeek-V2, Llama 4: `view_as_complex` of the
query's [..., d/2, 2] pairs, times `polar(1, θ)` frequencies that pass through unsqueeze / slice / to, then
`view_as_real`). torch's ONNX exporter has no complex lowering for most of those ops (unsqueeze, expand, _to_copy,
polar), so `complex_to_real(gm)` returns a copy of the graph in which every complex value z of shape S is carried
as a real tensor of shape [*S, 2] (z.real, z.imag), the representation `view_as_real` gives:

    view_as_complex(x)  -> x                         view_as_real(z)    -> z
    polar(r, θ)         -> stack(r cos θ, r sin θ)   complex(a, b)      -> stack(a, b)
    mul / add / sub / div / neg / conj               -> on the real and imaginary parts (complex or real operands)
    real / imag / abs / angle                        -> from the parts (real results)
    shape ops (unsqueeze, view, reshape, expand, slice, select, permute, transpose, flatten, squeeze, cat, stack,
    sum / mean over dims, sym_size)                  -> the same op on the pair tensor, dims counted without the pair
    casts (to / _to_copy)                            -> complex64 <-> float32, complex128 <-> float64
    complex weights (get_attr)                       -> view_as_real copies

Requires: `gm` carries fake values (meta["val"]) on its nodes, as a routefx capture does.
Ensures: no node of the result has a complex value and the result computes what `gm` computes; `gm` is left
unchanged (a graph without complex values is returned as it is). Any other op on complex values, a complex
input or a complex output raises `BackendError` naming the node and its op.
"""
from __future__ import annotations

import contextlib
import numbers

import torch
from torch import fx

from routefx.errors import BackendError
from routefx.ir.graph_utils import fake_mode, fetch_attr, module_path, targets

__all__ = ["complex_to_real", "has_complex"]

aten = torch.ops.aten
_REAL = {torch.complex64: torch.float32, torch.complex128: torch.float64, torch.complex32: torch.float16}

# ops whose complex result is an elementwise function of their operands' parts (see `_Rewriter._elementwise`)
_ELEMENTWISE = targets(aten.mul, aten.add, aten.sub, aten.div, aten.neg, aten.conj, aten._conj, aten.conj_physical,
                       aten.polar, aten.complex)
_PASS_THROUGH = targets(aten.clone, aten.contiguous, aten.alias, aten.detach, aten.lift_fresh_copy,
                        aten.resolve_conj, aten.resolve_neg)
_CASTS = targets(aten.to, aten._to_copy)
_SHAPE_OPS = targets(aten.unsqueeze, aten.view, aten.reshape, aten._unsafe_view, aten.expand, aten.slice,
                     aten.select, aten.permute, aten.transpose, aten.flatten, aten.squeeze, aten.cat, aten.stack,
                     aten.sum, aten.mean, aten.sym_size)
_ASSERTS = targets(aten._assert_tensor_metadata)   # dtype checks on a complex value: dropped with it
_PARTS = targets(aten.real, aten.imag, aten.abs, aten.angle, aten.view_as_real, aten.view_as_complex)
SUPPORTED = ("view_as_complex", "view_as_real", "polar", "complex", "mul", "add", "sub", "div", "neg", "conj",
             "real", "imag", "abs", "angle", "unsqueeze", "view", "reshape", "expand", "slice", "select", "permute",
             "transpose", "flatten", "squeeze", "cat", "stack", "sum", "mean", "sym_size", "to", "_to_copy", "clone")


def _is_complex(v) -> bool:
    if isinstance(v, torch.Tensor):
        return v.dtype.is_complex
    if isinstance(v, (list, tuple)):
        return any(_is_complex(x) for x in v)
    return False


def _complex_nodes(gm: fx.GraphModule) -> set[fx.Node]:
    """The nodes of `gm` with a complex value (a weight's get_attr node read from the weight itself)."""
    out = set()
    for n in gm.graph.nodes:
        v = fetch_attr(gm, n.target) if n.op == "get_attr" else n.meta.get("val")
        if _is_complex(v):
            out.add(n)
    return out


def has_complex(gm: fx.GraphModule) -> bool:
    """Whether some node of `gm` has a complex value."""
    return bool(_complex_nodes(gm))


def complex_to_real(gm: fx.GraphModule) -> tuple[fx.GraphModule, int]:
    """(graph, rewrites): a copy of `gm` (sharing its weights) without complex values, and how many complex-valued
    nodes it rewrote; `gm` itself with 0 when it has none. See the module docstring."""
    complex_nodes = _complex_nodes(gm)
    if not complex_nodes:
        return gm, 0
    return _Rewriter(gm, complex_nodes).run()


def _fake_mode(gm: fx.GraphModule):
    mode = fake_mode(gm)
    if mode is None:
        raise BackendError("complex_to_real needs a graph with fake values (meta['val']), as routefx captures it")
    return mode


def _norm(d: int, rank: int) -> int:
    return d + rank if d < 0 else d


class _Rewriter:
    def __init__(self, gm: fx.GraphModule, complex_nodes: set[fx.Node]):
        self.gm = gm
        self.complex = complex_nodes
        self.mode = _fake_mode(gm)
        self.graph = fx.Graph()
        self.graph._codegen = gm.graph._codegen   # the calling convention (pytree specs), shared, not mutated
        self.env: dict[fx.Node, fx.Node] = {}       # old node -> new node (a complex value: its pair tensor)
        self.attrs: dict[str, torch.Tensor] = {}    # get_attr targets of the new graph -> their values
        self.node: fx.Node | None = None            # the old node being rewritten (meta of the new nodes)
        self.rewrites = 0

    def run(self) -> tuple[fx.GraphModule, int]:
        for n in self.gm.graph.nodes:
            self.node = n
            if n.op == "output":
                bad = [a for a in n.all_input_nodes if self._is_c(a)]
                if bad:
                    self._refuse(bad[0], "is a complex output of the graph")
                self.graph.output(fx.node.map_arg(n.args[0], self.env.__getitem__),
                                  type_expr=getattr(n, "type", None)).meta.update(n.meta)
                continue
            complex_in = [a for a in n.all_input_nodes if self._is_c(a)]
            if not complex_in and not self._is_c(n):
                self.env[n] = self.graph.node_copy(n, self.env.__getitem__)
                if n.op == "get_attr":
                    self.attrs[n.target] = fetch_attr(self.gm, n.target)
                continue
            if n.op == "call_function" and n.target in _ASSERTS and not n.users:
                continue
            self.env[n] = self._rewrite(n)
            self.rewrites += 1
        root = {**self.attrs}
        for n in self.graph.nodes:   # submodules: a higher-order op's body, the input guards (call_module)
            if n.op in ("get_attr", "call_module") and n.target not in root:
                root[n.target] = fetch_attr(self.gm, n.target)
        new = fx.GraphModule(root, self.graph, class_name=type(self.gm).__name__)
        new.meta.update(self.gm.meta)
        return new, self.rewrites

    def _is_c(self, a) -> bool:
        return isinstance(a, fx.Node) and a in self.complex

    def _new(self, args):
        """`args` (any nesting) with each old-graph node replaced by its new-graph node."""
        return fx.node.map_arg(args, self.env.__getitem__)

    def _rank(self, a: fx.Node) -> int:
        return (fetch_attr(self.gm, a.target) if a.op == "get_attr" else a.meta["val"]).dim()

    # ---- per node ------------------------------------------------------------------------------------------

    def _rewrite(self, n: fx.Node) -> fx.Node:
        if n.op == "placeholder":
            self._refuse(n, "is a complex input of the graph")
        if n.op == "get_attr":
            t = fetch_attr(self.gm, n.target)
            name = f"_as_real_{n.target.replace('.', '_')}"
            self.attrs[name] = torch.view_as_real(t.detach().resolve_conj()).clone()
            node = self.graph.get_attr(name)
            node.meta.update({k: v for k, v in n.meta.items() if k != "val"})
            node.meta["val"] = self.mode.from_tensor(self.attrs[name], static_shapes=True)
            return node
        if n.op != "call_function":
            self._refuse(n, "takes or makes complex values")
        t = n.target
        if t in _ELEMENTWISE:
            return self._elementwise(n)
        if t in _PASS_THROUGH:
            return self.emit(t, self.env[n.args[0]], *self._new(n.args[1:]), **self._new(n.kwargs))
        if t in _CASTS:
            return self._cast(n)
        if t in _SHAPE_OPS:
            return self._shape_op(n)
        if t in _PARTS:
            return self._parts_op(n)
        self._refuse(n, "takes or makes complex values")

    def _refuse(self, n: fx.Node, what: str):
        where = module_path(n) or "the model's top level"
        target = str(n.target).removeprefix("aten.") if n.op == "call_function" else n.op
        raise BackendError(
            f"the graph computes with complex tensors, and node {n.name} ({target}, in {where}) {what}: the "
            f"complex-to-real rewrite before ONNX lowering supports {', '.join(SUPPORTED)} on complex values "
            "inside the graph; backend 'eager' or 'inductor' runs complex graphs as captured")

    def emit(self, target, *args, **kwargs) -> fx.Node:
        """A new node `target(*args, **kwargs)` (args may hold new-graph nodes), its fake value computed."""
        node = self.graph.call_function(target, args, kwargs)
        node.meta.update({k: v for k, v in self.node.meta.items() if k not in ("val", "tensor_meta")})
        fake = fx.node.map_arg((args, kwargs), lambda a: a.meta["val"])
        quiet = self.mode.shape_env.suppress_guards() if self.mode.shape_env is not None else contextlib.nullcontext()
        try:
            with quiet, self.mode:
                node.meta["val"] = target(*fake[0], **fake[1])
        except Exception as e:  # noqa: BLE001 - a rule that built a malformed node: name the node it rewrote
            raise BackendError(f"complex_to_real: the rewrite of node {self.node.name} ({self.node.target}) built "
                               f"{target} on values it does not take: {type(e).__name__}: {e}") from e
        return node

    def _finish(self, node: fx.Node, old: fx.Node) -> fx.Node:
        """`node` (the pair tensor of `old`'s complex value), checked against `old`'s value; cast to its dtype."""
        want, got = old.meta["val"], node.meta["val"]
        if got.dtype != _REAL[want.dtype]:
            node = self.emit(aten._to_copy.default, node, dtype=_REAL[want.dtype])
        if [str(s) for s in got.shape] != [str(s) for s in (*want.shape, 2)]:
            raise BackendError(f"complex_to_real: node {old.name} ({old.target}) became shape {list(got.shape)}, "
                               f"not {list(want.shape)} + [2]: a rewrite rule is wrong")
        return node

    # ---- real / imaginary parts ------------------------------------------------------------------------------

    def parts(self, a):
        """(real, imaginary) of an old-graph argument: new-graph nodes or Python numbers (0 for a real value)."""
        if isinstance(a, fx.Node):
            if not self._is_c(a):
                return self.env[a], 0
            z = self.env[a]
            return self.emit(aten.select.int, z, -1, 0), self.emit(aten.select.int, z, -1, 1)
        if isinstance(a, complex):
            return a.real, a.imag
        if isinstance(a, numbers.Number):
            return a, 0
        raise BackendError(f"complex_to_real: argument {a!r} of node {self.node.name} is not a tensor or a number")

    def mul(self, x, y):
        if isinstance(x, numbers.Number) and isinstance(y, numbers.Number):
            return x * y
        if (isinstance(x, numbers.Number) and x == 0) or (isinstance(y, numbers.Number) and y == 0):
            return 0
        if isinstance(x, numbers.Number):
            x, y = y, x
        return x if isinstance(y, numbers.Number) and y == 1 else self.emit(aten.mul.Tensor, x, y)

    def add(self, x, y):
        if isinstance(x, numbers.Number) and isinstance(y, numbers.Number):
            return x + y
        if isinstance(x, numbers.Number):
            x, y = y, x
        return x if isinstance(y, numbers.Number) and y == 0 else self.emit(aten.add.Tensor, x, y)

    def neg(self, x):
        return -x if isinstance(x, numbers.Number) else self.emit(aten.neg.default, x)

    def sub(self, x, y):
        return self.add(x, self.neg(y))

    def div(self, x, y):
        if isinstance(x, numbers.Number) and isinstance(y, numbers.Number):
            return x / y
        if isinstance(x, numbers.Number):
            return self.mul(self.emit(aten.reciprocal.default, y), x)
        return x if isinstance(y, numbers.Number) and y == 1 else self.emit(aten.div.Tensor, x, y)

    def _elementwise(self, n: fx.Node) -> fx.Node:
        t, args = n.target, n.args
        name = t.overloadpacket.__name__
        if name in ("neg", "conj", "_conj", "conj_physical"):
            re, im = self.parts(args[0])
            re, im = (self.neg(re), self.neg(im)) if name == "neg" else (re, self.neg(im))
        elif name == "polar":   # polar(abs, angle): abs * (cos angle + i sin angle)
            r, theta = self.env[args[0]], self.env[args[1]]
            re = self.emit(aten.mul.Tensor, r, self.emit(aten.cos.default, theta))
            im = self.emit(aten.mul.Tensor, r, self.emit(aten.sin.default, theta))
        elif name == "complex":
            re, im = self.env[args[0]], self.env[args[1]]
        else:
            (ar, ai), (br, bi) = self.parts(args[0]), self.parts(args[1])
            alpha = n.kwargs.get("alpha", args[2] if len(args) > 2 and name in ("add", "sub") else 1)
            if set(n.kwargs) - {"alpha"} or (len(args) > 2 and name not in ("add", "sub")):
                self._refuse(n, f"has arguments {list(args[2:])} {dict(n.kwargs)} the rewrite does not take")
            br, bi = self.mul(br, alpha), self.mul(bi, alpha)
            if name == "mul":      # (a + bi)(c + di) = (ac - bd) + (ad + bc)i
                re, im = self.sub(self.mul(ar, br), self.mul(ai, bi)), self.add(self.mul(ar, bi), self.mul(ai, br))
            elif name == "add":
                re, im = self.add(ar, br), self.add(ai, bi)
            elif name == "sub":
                re, im = self.sub(ar, br), self.sub(ai, bi)
            elif isinstance(bi, numbers.Number) and bi == 0:   # div by a real value
                re, im = self.div(ar, br), self.div(ai, br)
            else:                  # a / b = a conj(b) / |b|^2
                den = self.add(self.mul(br, br), self.mul(bi, bi))
                re = self.div(self.add(self.mul(ar, br), self.mul(ai, bi)), den)
                im = self.div(self.sub(self.mul(ai, br), self.mul(ar, bi)), den)
        return self._finish(self._pair(re, im), n)

    def _pair(self, re, im) -> fx.Node:
        """stack([re, im], -1), each part broadcast to the shape of both (x + zeros_like(y) is exact)."""
        if isinstance(re, numbers.Number):
            re = self.emit(aten.full_like.default, im, re)
        if isinstance(im, numbers.Number):
            im = self.emit(aten.full_like.default, re, im)
        if [str(s) for s in re.meta["val"].shape] != [str(s) for s in im.meta["val"].shape]:
            re, im = (self.emit(aten.add.Tensor, re, self.emit(aten.zeros_like.default, im)),
                      self.emit(aten.add.Tensor, im, self.emit(aten.zeros_like.default, re)))
        return self.emit(aten.stack.default, [re, im], -1)

    # ---- casts, shape ops, parts -----------------------------------------------------------------------------

    def _cast(self, n: fx.Node) -> fx.Node:
        x, out = n.args[0], n.meta["val"]
        if not self._is_c(x):          # real -> complex: the value, imaginary part 0
            re = self.emit(aten._to_copy.default, self.env[x], dtype=_REAL[out.dtype])
            return self._finish(self._pair(re, 0.0), n)
        if not out.dtype.is_complex:      # complex -> real keeps the real part (as torch does)
            return self.emit(aten._to_copy.default, self.parts(x)[0], dtype=out.dtype)
        return self._finish(self.emit(aten._to_copy.default, self.env[x], dtype=_REAL[out.dtype]), n)

    def _shape_op(self, n: fx.Node) -> fx.Node:
        name, args = n.target.overloadpacket.__name__, [n.args[0], *self._new(n.args[1:])]
        if n.kwargs:
            self._refuse(n, f"has keyword arguments {dict(n.kwargs)} the rewrite does not take")
        if name in ("cat", "stack"):
            rank = n.meta["val"].dim() - (name == "stack")
            dim = _norm(args[1] if len(args) > 1 else 0, rank + (name == "stack"))
            pairs = [self.env[a] if self._is_c(a) else self._pair(self.env[a], 0.0) for a in args[0]]
            return self._finish(self.emit(n.target, pairs, dim), n)
        z, rank = self.env[args[0]], self._rank(args[0])
        target = n.target
        if name == "sym_size":
            return self.emit(target, z, _norm(args[1], rank))
        if name in ("view", "reshape", "_unsafe_view", "expand"):
            rest = [[*args[1], 2], *args[2:]]
        elif name == "unsqueeze":
            rest = [_norm(args[1], rank + 1)]
        elif name == "permute":
            rest = [[_norm(d, rank) for d in args[1]] + [rank]]
        elif name == "flatten":    # flatten(z, start=0, end=-1)
            rest = [_norm(args[1] if len(args) > 1 else 0, rank), _norm(args[2] if len(args) > 2 else -1, rank)]
        elif name == "squeeze" and len(args) == 1:   # every size-1 dim: the pair dim (2) is never one
            rest = []
        elif name in ("sum", "mean") and len(args) == 1:   # over every dim
            target, rest = (aten.sum.dim_IntList if name == "sum" else aten.mean.dim), [list(range(rank))]
        elif name in ("transpose", "slice", "select", "squeeze", "sum", "mean"):
            dims = args[1]
            dims = [_norm(d, rank) for d in dims] if isinstance(dims, (list, tuple)) else _norm(dims, rank)
            rest = [dims, *args[2:]]
            if name == "transpose":
                rest = [dims, _norm(args[2], rank)]
        else:  # pragma: no cover - _SHAPE_OPS and this dispatch agree
            self._refuse(n, "takes or makes complex values")
        return self._finish(self.emit(target, z, *rest), n)

    def _parts_op(self, n: fx.Node) -> fx.Node:
        name = n.target.overloadpacket.__name__
        if name in ("view_as_real", "view_as_complex"):
            return self.env[n.args[0]]      # both sides are the pair tensor
        re, im = self.parts(n.args[0])
        if name == "real":
            return re
        if name == "imag":
            return im
        if name == "abs":
            return self.emit(aten.sqrt.default, self.add(self.mul(re, re), self.mul(im, im)))
        return self.emit(aten.atan2.default, im, re)   # angle
