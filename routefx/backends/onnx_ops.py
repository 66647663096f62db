"""ONNX lowering of `routefx::routed_ffn` (see `routefx/ir/ops.py` for its semantics).

`routed_ffn_lowering(names)` makes the translation function for `torch.onnx.export(custom_translation_table=...)`:
a plain Python function calling onnxscript opset ops on the exporter's values. With T = tokens, K = routes per
token, N = T*K assignments, R = routes, n_r = assignments to route r, it emits:

    order   = TopK(routes.flat, N, ascending)[1]    # [N] one stable sort: positions grouped by route id
    ends    = CumSum(ReduceSum(routes.flat[:, None] == arange(R)))  # [R] where each route's run ends
    tok     = order / K                              # [N] token of each sorted position (order when K == 1)
    per route r with a non-empty range [s_r, e_r):   (skip routes: nothing; their tokens are never copied)
        tok_r = tok[begin_r:end_r]                   # [n_r] a contiguous slice
        y_r   = FFN_r(Gather(x2, tok_r))             # [n_r, d] MatMuls on exactly the rows routed to r
    y   = Concat(y_r) (+ b_down) (* gates.flat[Concat(order_r)])      # [n, d] in sorted order
    out = ScatterND(zeros[T, d], Concat(tok_r), y)   # one un-permute, when K == 1
    out = ReduceSum(ScatterND(zeros[N, d], Concat(order_r), y).reshape(T, K, d), axis=1)   # when K > 1 (unique
                                                     # indices: ORT's scatter-add loses updates to repeated ones)

so the routing work per layer is one sort, one scatter and a gather per live route, whatever R is. ONNX's TopK
returns equal values in index order, so the sort is stable. One full range with K == 1 and no gates lowers to the
plain FFN on all rows; a layer whose route ids are a constant of the graph (`static_routes`, found by the backend)
lowers to the plain FFN on that route's range (zeros for a skip), with no routing op at all. Route ids outside
[0, R) contribute nothing here (the reference raises); ONNX has no way to raise a typed error at run time.

Weights enter as `Transpose(Slice(w))` nodes named `_FOLD_PREFIX...`; `fold_weight_slices` evaluates them once
after export, so the model holds one pre-sliced, pre-transposed initializer per route and weight ([d, F_r] for
the up/gate products, [F_r, d] for the down product): no Slice or Transpose runs per call, and ONNX Runtime can
pre-pack every routed weight. When live ranges overlap (nested small/big), each weight is instead transposed
once into one full initializer and a route reads a constant-bounds `Slice` of it, so the file stores every
neuron once; ONNX Runtime folds those slices into pre-packed constants at session creation (with its graph
optimizations off, the slices run per call). Measured on the 8-layer d=1024 bench model, Duo 0.5 random: file
661 -> 595 MiB (the dense model's size), latency 449 -> 463 ms median (+3%, one run of 7 rounds on a
shared 2-core machine: not shown to be noise; a standalone sliced-vs-separate MatMul measured equal).

Node names: `{prefix}/route{r}/{up|gate|down}` for the routed MatMuls (`{prefix}/dense/...` on the dense path),
where `prefix` is the fx node's name (`routed_ffn`, `routed_ffn_1`, ...), so profiles can be read per route.
"""
from __future__ import annotations

import itertools
import math
import sys
from typing import Callable, Sequence

import numpy as np
import onnx_ir as ir
import onnxscript.optimizer
from onnxscript import opset18 as op

from routefx.errors import BackendError

__all__ = ["routed_ffn_lowering", "fold_weight_slices", "ONNX_ACTIVATIONS"]

_FOLD_PREFIX = "routefx_fold/"
_SQRT_HALF = math.sqrt(0.5)
_SQRT_2_OVER_PI = math.sqrt(2.0 / math.pi)

# Exact formulas, matching `routefx.ir.activations` (ONNX Runtime fuses them into its own kernels).
ONNX_ACTIVATIONS: dict[str, Callable] = {
    "silu": lambda x: op.Mul(x, op.Sigmoid(x)),
    "gelu": lambda x: op.Mul(op.Mul(x, 0.5), op.Add(op.Erf(op.Mul(x, _SQRT_HALF)), 1.0)),
    "gelu_tanh": lambda x: op.Mul(
        op.Mul(x, 0.5),
        op.Add(op.Tanh(op.Mul(op.Add(x, op.Mul(op.Mul(op.Mul(x, x), x), 0.044715)), _SQRT_2_OVER_PI)), 1.0)),
    "relu": lambda x: op.Relu(x),
    "relu2": lambda x: _square(op.Relu(x)),
    "sigmoid": lambda x: op.Sigmoid(x),
    "quick_gelu": lambda x: op.Mul(x, op.Sigmoid(op.Mul(x, 1.702))),
    "identity": lambda x: x,
}

# fp16 / bf16 contributions accumulate in fp32, as in the reference.
_ACC = {ir.DataType.FLOAT16: ir.DataType.FLOAT, ir.DataType.BFLOAT16: ir.DataType.FLOAT}


def _zeros_like(x):
    return op.ConstantOfShape(op.Shape(x), value=ir.tensor(np.zeros(1, dtype=x.dtype.numpy())))


def _square(x):
    return op.Mul(x, x)


def _named(value, name: str, value_name: str | None = None):
    """Name the node that produced `value` (for profiles and for `fold_weight_slices`), and the value itself
    when given (folded weights keep it as their initializer name)."""
    value.producer().name = name
    if value_name is not None:
        value.name = value_name
    return value


def routed_ffn_lowering(names: Sequence[str] = (), static_routes: dict[str, int] | None = None) -> Callable:
    """The translation function for `torch.ops.routefx.routed_ffn.default` (a plain function, so the exporter
    can read its signature).

    `names` are the fx names of the routed_ffn nodes in graph order (the exporter translates them in that
    order); they prefix the ONNX node names. Calls beyond the list are named `routed_ffn@{i}`.
    `static_routes` maps a node name to its constant route id (routes filled with one value in the graph):
    such a layer lowers to the plain FFN on that route's range.
    """
    static_routes = dict(static_routes or {})
    pending = list(names)
    calls = itertools.count()

    def routed_ffn(x, routes, gates, w_up, w_gate, w_down, b_up, b_gate, b_down, ranges, activation):
        i = next(calls)
        prefix = pending[i] if i < len(pending) else f"routed_ffn@{i}"
        return _lower(prefix, x, routes, gates, w_up, w_gate, w_down, b_up, b_gate, b_down, ranges, activation,
                      static_routes.get(prefix))

    return routed_ffn


def _lower(prefix, x, routes, gates, w_up, w_gate, w_down, b_up, b_gate, b_down, ranges, activation,
           static_route: int | None = None):
    """One routed_ffn call as ONNX ops (the module docstring shows what is emitted); returns [..., d] like x."""
    if activation not in ONNX_ACTIVATIONS:
        raise BackendError(f"{prefix}: activation {activation!r} has no ONNX lowering; supported: "
                           f"{', '.join(sorted(ONNX_ACTIVATIONS))}")
    act = ONNX_ACTIVATIONS[activation]
    ranges = [int(v) for v in ranges]
    n_neurons = _static_dim(w_up, 0, prefix, "w_up")
    d = _static_dim(w_up, 1, prefix, "w_up")
    k_routes = _static_dim(routes, -1, prefix, "routes")
    weights = _Weights(prefix, w_up, w_gate, w_down, b_up, b_gate)

    if ranges == [0, n_neurons] and n_neurons > 0 and gates is None and k_routes == 1:
        # Dense: the plain FFN on all rows, x [..., d] -> [..., d] (MatMul broadcasts the leading dims).
        y = weights.ffn(x, 0, n_neurons, act, f"{prefix}/dense")
        # The exporter renames the node producing the op's output; Identity keeps the MatMul's name.
        return op.Identity(y) if b_down is None else op.Add(y, b_down)

    if static_route is not None and gates is None and k_routes == 1:
        return _lower_static(prefix, x, weights, ranges, static_route, b_down, act)

    acc = _ACC.get(x.dtype)
    live = [r for r in range(len(ranges) // 2) if ranges[2 * r] < ranges[2 * r + 1]]  # routes with neurons
    if not live:
        return _zeros_like(x)  # every route is a skip: exactly 0
    spans = sorted((ranges[2 * r], ranges[2 * r + 1]) for r in live)
    if any(a[1] > b[0] for a, b in zip(spans, spans[1:])):  # overlapping ranges: store each weight once
        weights = _Weights(prefix, w_up, w_gate, w_down, b_up, b_gate, shared=True)
    x2 = op.Reshape(x, [-1, d])  # [T, d]
    flat_routes = op.Reshape(routes, [-1])  # [N = T*K]
    # One stable sort: TopK(k=N, ascending) orders positions by route id, ties by position (ONNX's TopK
    # contract), so route r's positions are the contiguous slice order[begin_r:end_r].
    order = op.TopK(flat_routes, op.Shape(flat_routes), axis=0, largest=0, sorted=1)[1]  # [N]
    n_routes = len(ranges) // 2
    hits = op.Equal(op.Unsqueeze(flat_routes, [1]), op.Constant(value=ir.tensor(np.arange(n_routes))))  # [N, R]
    ends = op.CumSum(op.ReduceSum(op.Cast(hits, to=ir.DataType.INT64), [0], keepdims=0), 0)  # [R]
    begins = op.Concat(op.Constant(value=ir.tensor(np.zeros(1, dtype=np.int64))), ends, axis=0)  # [R+1]
    token_of = order if k_routes == 1 else op.Div(order, k_routes)  # [N] token of each sorted position

    pos, toks, ys = [], [], []
    for r in live:
        b, e = op.Slice(begins, [r], [r + 1]), op.Slice(ends, [r], [r + 1])  # [1], [1]
        tok = op.Slice(token_of, b, e)  # [n_r] tokens routed to r (repeats allowed for K > 1)
        rows = op.Gather(x2, tok, axis=0)  # [n_r, d]
        ys.append(weights.ffn(rows, ranges[2 * r], ranges[2 * r + 1], act, f"{prefix}/route{r}"))  # [n_r, d]
        toks.append(tok)
        if gates is not None:
            pos.append(op.Slice(order, b, e))
    y = ys[0] if len(ys) == 1 else op.Concat(*ys, axis=0)  # [n, d]: the live assignments, in sorted order
    tok = toks[0] if len(toks) == 1 else op.Concat(*toks, axis=0)  # [n]
    if k_routes > 1 and not pos:                            # the slot positions, for the un-permute below
        pos = [op.Slice(order, op.Slice(begins, [r], [r + 1]), op.Slice(ends, [r], [r + 1])) for r in live]
    if b_down is not None:
        y = op.Add(y, b_down)
    if acc is not None:
        y = op.Cast(y, to=acc)
    if gates is not None:
        flat_gates = op.Reshape(op.Cast(gates, to=acc or x.dtype), [-1])  # [N]
        at = pos[0] if len(pos) == 1 else op.Concat(*pos, axis=0)  # [n]
        y = op.Mul(y, op.Unsqueeze(op.Gather(flat_gates, at, axis=0), [1]))  # [n, d] * [n, 1]
    zero = ir.tensor(np.zeros(1, dtype=(acc or x.dtype).numpy()))
    if k_routes == 1:
        # One un-permute: every token appears at most once, so a plain scatter; skip tokens stay 0, never copied.
        out = op.ConstantOfShape(op.Shape(x2), value=zero)  # [T, d]
        out = op.ScatterND(out, op.Unsqueeze(tok, [1]), y, reduction="none")
    else:
        # K > 1: a token repeats, so scatter by slot position (token·K + slot: unique) into [T·K, d], then sum
        # the K slots. A ScatterND with reduction="add" over repeated indices loses updates in ONNX Runtime's
        # multi-threaded CPU kernel (an occasional token missing one expert, a different one per run).
        at = pos[0] if len(pos) == 1 else op.Concat(*pos, axis=0)  # [n] unique slot positions
        slots = op.ConstantOfShape(op.Concat(op.Shape(flat_routes), op.Constant(value=ir.tensor(
            np.array([d], dtype=np.int64))), axis=0), value=zero)  # [T·K, d]
        slots = op.ScatterND(slots, op.Unsqueeze(at, [1]), y, reduction="none")
        tkd = op.Constant(value=ir.tensor(np.array([-1, k_routes, d], dtype=np.int64)))
        out = op.ReduceSum(op.Reshape(slots, tkd), op.Constant(value=ir.tensor(np.array([1], dtype=np.int64))),
                           keepdims=0)  # [T, d]
    if acc is not None:
        out = op.Cast(out, to=x.dtype)
    return op.Reshape(out, op.Shape(x))


def _lower_static(prefix, x, weights, ranges, route: int, b_down, act):
    """Every token takes route `route` (constant route ids): the plain FFN on that range, no routing ops."""
    if not 0 <= route < len(ranges) // 2:
        raise BackendError(f"{prefix}: the constant route id {route} is outside [0, R={len(ranges) // 2}) for "
                           f"ranges {ranges}")
    start, end = ranges[2 * route], ranges[2 * route + 1]
    if start == end:
        return _zeros_like(x)  # a skip contributes exactly 0
    y = weights.ffn(x, start, end, act, f"{prefix}/route{route}")
    return op.Identity(y) if b_down is None else op.Add(y, b_down)


class _Weights:
    """Range slices of one FFN's weights, transposed for MatMul ([d, F_r] for up/gate, [F_r, d] for down).

    Unshared (the default): `Transpose(Slice(w))` nodes folded after export into one initializer per route and
    weight. Shared (`shared=True`, for overlapping ranges such as nested small/big): each weight is transposed
    once (folded into one full initializer) and a route reads a constant-bounds `Slice` of it, so the file
    stores every neuron once; ONNX Runtime folds those slices at session creation and pre-packs them (measured:
    no slower per call than a separate initializer; with its optimizations off the slice runs per call)."""

    def __init__(self, prefix, w_up, w_gate, w_down, b_up, b_gate, shared: bool = False):
        self.prefix, self.shared = prefix, shared
        self.w_up, self.w_gate, self.w_down, self.b_up, self.b_gate = w_up, w_gate, w_down, b_up, b_gate
        self._full: dict[str, object] = {}

    def _transposed(self, w, start: int, end: int, axis: int, kind: str, label: str):
        """w sliced to [start, end) along `axis` (0: rows of [F, d]; 1: columns of [d, F]), transposed."""
        if not self.shared:
            sliced = _named(op.Slice(w, [start], [end], [axis]), f"{_FOLD_PREFIX}{label}/slice")
            return _named(op.Transpose(sliced, perm=[1, 0]), f"{_FOLD_PREFIX}{label}/t", f"{label}.weight_t")
        if kind not in self._full:
            self._full[kind] = _named(op.Transpose(w, perm=[1, 0]), f"{_FOLD_PREFIX}{self.prefix}/{kind}/t",
                                      f"{self.prefix}/{kind}.weight_t")
        full = self._full[kind]
        if start == 0 and end == w.shape[axis]:
            return full
        return _named(op.Slice(full, [start], [end], [1 - axis]), f"{label}/slice", f"{label}.weight_t")

    def _bias(self, b, start: int, end: int, label: str):
        return _named(op.Slice(b, [start], [end], [0]), f"{_FOLD_PREFIX}{label}/slice", f"{label}.bias")

    def _linear(self, rows, w, b, start, end, kind, name):
        y = _named(op.MatMul(rows, self._transposed(w, start, end, 0, kind, name)), name)
        return y if b is None else op.Add(y, self._bias(b, start, end, name))

    def ffn(self, rows, start: int, end: int, act, name: str):
        """rows [n, d] (or [..., d]) -> [..., d] on neurons [start, end), without b_down."""
        up = self._linear(rows, self.w_up, self.b_up, start, end, "up", f"{name}/up")
        if self.w_gate is None:
            h = act(up)
        else:
            h = op.Mul(act(self._linear(rows, self.w_gate, self.b_gate, start, end, "gate", f"{name}/gate")), up)
        w_down = self._transposed(self.w_down, start, end, 1, "down", f"{name}/down")
        return _named(op.MatMul(h, w_down), f"{name}/down")


def _static_dim(value, axis: int, prefix: str, what: str) -> int:
    dim = value.shape[axis] if value.shape is not None else None
    if not isinstance(dim, int):
        raise BackendError(f"{prefix}: {what} needs a static size along dim {axis} for the ONNX lowering, found "
                           f"shape {value.shape}")
    return dim


def fold_weight_slices(model: ir.Model) -> int:
    """Evaluate the weight `Slice`/`Transpose` nodes the lowering emitted, and the constant nodes feeding them
    (a fused gate-up weight split in the graph), into initializers, in place and with no size limit. Returns
    how many lowering nodes were folded; raises `BackendError` if one is left (a weight that is not a constant
    of the graph)."""
    ours = {id(n) for n in model.graph if n.name and n.name.startswith(_FOLD_PREFIX)}
    todo = [n for n in model.graph if id(n) in ours]
    feeding: set[int] = set()
    while todo:  # every node upstream of a weight slice; the folder folds those whose inputs are all constant
        for v in todo.pop().inputs:
            producer = v.producer() if v is not None else None
            if producer is not None and id(producer) not in feeding:
                feeding.add(id(producer))
                todo.append(producer)
    onnxscript.optimizer.fold_constants(model, input_size_limit=sys.maxsize, output_size_limit=sys.maxsize,
                                        should_fold=lambda node: id(node) in ours or id(node) in feeding)
    left = [n.name for n in model.graph if n.name and n.name.startswith(_FOLD_PREFIX)]
    if left:
        raise BackendError(f"routed_ffn weights must be constants of the exported graph; could not fold {left[:3]}")
    return len(ours)
