"""ONNX lowering of `routefx::routed_ffn` (see `routefx/ir/ops.py` for its semantics).

`routed_ffn_lowering(names)` makes the translation function for `torch.onnx.export(custom_translation_table=...)`:
a plain Python function calling onnxscript opset ops on the exporter's values. With T = tokens, K = routes per
token, N = T*K assignments, R = routes, n_r = assignments to route r, it emits:

    order   = TopK(routes.flat, N, ascending)[1]    # [N] one stable sort: positions grouped by route id
    bounds  = ReduceSum(routes.flat[:, None] < arange(R + 1), axis=0)  # [R+1]: r's run is bounds[r]:bounds[r+1]
    tok     = order / K                              # [N] token of each sorted position (order when K == 1)
    sizes   = [bounds[0], diff(bounds), N - bounds[R]]                    # [R+2] run lengths (ids < 0, >= R first/last)
    pos_r   = Split(order, sizes)[r + 1]; tok_r = Split(tok, sizes)[r + 1]  # one Split each for all routes
    per route r with a non-empty range [s_r, e_r):   (skip routes: nothing; their tokens are never copied)
        y_r   = FFN_r(Gather(x2, tok_r)) (+ b_down)  # [n_r, d] MatMuls on exactly the rows routed to r
    at  = Concat(pos_r)                              # [n] the (token, slot) position of each live row (unique)
    inv = ScatterElements(full(N, n), at, arange(n)) # [N] the row of each position; n (a zero row) if none
    y   = Gather(Concat(y_r, zeros[1, d]), inv)      # [N, d] = [T, K, d]: the un-permute, in token order
    out = y (* gates when K == 1)                    # [T, d]
    out = MatMul(gates[T, 1, K], y[T, K, d])         # [T, 1, d]: gate-weighted sum of the K slots (K > 1)
    out = ReduceSum(y[T, K, d], axis=1)              # K > 1 without gates

so the routing work per layer is one sort, a gather per live route, one concatenation and one gather back,
whatever R is. No ScatterND: its CPU kernel is slower than a Gather here (a zeros buffer, a copy of it, then the
scatter), and with reduction="add" over repeated token indices its multi-threaded kernel loses updates. Measured
(one d=1024 layer, 8 experts x 1408, top-2, T=512, 1 thread, CPU time of interleaved runs; bench/moe_onnx_layer.py
shape): the previous ScatterND un-permute (zeros [T*K, d], scatter, gate Mul, ReduceSum over K) at 0.864-0.880
of the dense-equivalent FFN, this one at 0.896-0.903. ONNX's TopK returns equal values in index order, so the
sort is stable. The runs come from one Split per tensor rather than two Slices per route: on a Mixtral-shaped
model with 32 experts per layer (4 layers, AMD EPYC, 2 threads) ONNX Runtime spent 1.92 ms per call in 388 Slice
kernels, and 0.18 ms in the 8 Splits that replace them. One full range with K == 1 and no gates lowers to the
plain FFN on all rows; a layer whose route ids are a constant of the graph (`static_routes`, found by the backend)
lowers to the plain FFN on that route's range (zeros for a skip), with no routing op at all. Route ids outside
[0, R), negative ones included, contribute nothing here (the reference raises); ONNX has no way to raise a typed
error at run time.

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
`{prefix}/unpermute` for the Gather back to token order and `{prefix}/combine` for the gate-weighted K-sum,
where `prefix` is the fx node's name (`routed_ffn`, `routed_ffn_1`, ...), so profiles can be read per route.
"""
from __future__ import annotations

import functools
import itertools
import math
import sys
from typing import Callable, Sequence

import numpy as np
import onnx_ir as ir
import onnxscript.optimizer
from onnxscript import opset18 as op

from routefx.errors import BackendError, UnsupportedActivationError
from routefx.ir.activations import parse_activation

__all__ = ["routed_ffn_lowering", "fold_weight_slices", "drop_split_counts", "ONNX_ACTIVATIONS"]

_FOLD_PREFIX = "routefx_fold/"
_SQRT_HALF = math.sqrt(0.5)
_SQRT_2_OVER_PI = math.sqrt(2.0 / math.pi)


def _k(value: float, like):
    """A scalar constant in `like`'s dtype (a bare Python float is a float32 constant: an fp16 model's Mul then
    binds two types and ONNX Runtime refuses the graph)."""
    return op.CastLike(value, like)


# Exact formulas, matching `routefx.ir.activations` (ONNX Runtime fuses them into its own kernels).
ONNX_ACTIVATIONS: dict[str, Callable] = {
    "silu": lambda x: op.Mul(x, op.Sigmoid(x)),
    "gelu": lambda x: op.Mul(op.Mul(x, _k(0.5, x)), op.Add(op.Erf(op.Mul(x, _k(_SQRT_HALF, x))), _k(1.0, x))),
    "gelu_tanh": lambda x: op.Mul(
        op.Mul(x, _k(0.5, x)),
        op.Add(op.Tanh(op.Mul(op.Add(x, op.Mul(op.Mul(op.Mul(x, x), x), _k(0.044715, x))),
                              _k(_SQRT_2_OVER_PI, x))), _k(1.0, x))),
    "relu": lambda x: op.Relu(x),
    "relu2": lambda x: _square(op.Relu(x)),
    "sigmoid": lambda x: op.Sigmoid(x),
    "quick_gelu": lambda x: op.Mul(x, op.Sigmoid(op.Mul(x, _k(1.702, x)))),
    "identity": lambda x: x,
}


class _OnnxActivation:
    """An activation name (`routefx.ir.activations.ActivationSpec`) as ONNX ops: called, the gate side; `glu` the
    gated unit with the spec's clamps and shift."""

    def __init__(self, spec):
        self.spec = spec
        alpha = spec.alpha
        if spec.base == "swish":
            self._base = lambda x: op.Mul(x, op.Sigmoid(op.Mul(x, _k(alpha, x))))
        elif spec.base == "xielu":
            self._base = functools.partial(_xielu, s=spec)
        else:
            self._base = ONNX_ACTIVATIONS[spec.base]

    def __call__(self, x):
        s = self.spec
        x = self._base(x if s.gate_max is None else op.Min(x, _k(s.gate_max, x)))
        return x if s.act_max is None else op.Min(x, _k(s.act_max, x))

    def glu(self, g, u):
        s = self.spec
        if s.up_limit is not None:
            u = op.Max(op.Min(u, _k(s.up_limit, u)), _k(-s.up_limit, u))
        if s.up_add != 0.0:
            u = op.Add(u, _k(s.up_add, u))
        return op.Mul(self(g), u)


def _xielu(x, s):
    """`routefx.ir.activations`' xielu as ONNX ops:
    Where(x > 0, alpha_p x² + beta x, alpha_n (exp(min(x, eps)) - 1 - x) + beta x)."""
    bx = op.Mul(x, _k(s.beta, x))
    pos = op.Add(op.Mul(op.Mul(x, x), _k(s.alpha_p, x)), bx)
    neg = op.Add(op.Mul(op.Sub(op.Sub(op.Exp(op.Min(x, _k(s.eps, x))), _k(1.0, x)), x), _k(s.alpha_n, x)), bx)
    return op.Where(op.Greater(x, _k(0.0, x)), pos, neg)


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
    try:
        spec = parse_activation(activation)
    except UnsupportedActivationError as e:
        raise BackendError(f"{prefix}: activation {activation!r} has no ONNX lowering ({e})") from None
    act = _OnnxActivation(spec)
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
    # contract), so route r's positions are one contiguous run of `order`.
    order = op.TopK(flat_routes, op.Shape(flat_routes), axis=0, largest=0, sorted=1)[1]  # [N]
    n_routes = len(ranges) // 2
    # bounds[r] = how many positions have a route id < r, so route r's run is order[bounds[r]:bounds[r+1]], also
    # when some ids are outside [0, R) (negative ones sort first, ids >= R last; both are in no route's run)
    below = op.Less(op.Unsqueeze(flat_routes, [1]), op.Constant(value=ir.tensor(np.arange(n_routes + 1))))
    bounds = op.ReduceSum(op.Cast(below, to=ir.DataType.INT64), [0], keepdims=0)  # [R+1]
    token_of = order if k_routes == 1 else op.Div(order, k_routes)  # [N] token of each sorted position

    # Every route's run at once: one Split of the sorted positions (and one of their tokens when K > 1) into
    # [ids < 0, route 0, ..., route R-1, ids >= R] by the run lengths, instead of two Slices per route
    n_flat = op.Shape(flat_routes)  # [1] = N
    sizes = op.Sub(op.Concat(bounds, n_flat, axis=0), op.Concat(op.Constant(value_ints=[0]), bounds, axis=0))
    runs = _split(order, sizes, n_routes + 2)
    tokens = runs if k_routes == 1 else _split(token_of, sizes, n_routes + 2)
    pos, ys = [], []
    for r in live:
        rows = op.Gather(x2, tokens[r + 1], axis=0)  # [n_r, d]: the tokens routed to r (K > 1: repeats)
        y_r = weights.ffn(rows, ranges[2 * r], ranges[2 * r + 1], act, f"{prefix}/route{r}")  # [n_r, d]
        ys.append(y_r if b_down is None else op.Add(y_r, b_down))
        pos.append(runs[r + 1])  # [n_r] the (token, slot) positions of those rows
    # The un-permute is a Gather: row j of y belongs to position at[j] (unique), so inv[at[j]] = j, and every
    # position no live route took (a skip, a route id outside [0, R)) reads the zero row appended at index n.
    at = pos[0] if len(pos) == 1 else op.Concat(*pos, axis=0)  # [n]
    n = op.Shape(at)  # [1]
    inv = op.ScatterElements(op.Expand(n, op.Shape(flat_routes)), at, op.Range(0, op.Squeeze(n), 1),
                             axis=0)  # [N]: int64 indices, unique, so no reduction and no race
    y = op.Concat(*ys, op.ConstantOfShape(op.Constant(value=ir.tensor(np.array([1, d], dtype=np.int64))),
                                          value=ir.tensor(np.zeros(1, dtype=x.dtype.numpy()))), axis=0)  # [n+1, d]
    if acc is not None:
        y = op.Cast(y, to=acc)
    y = _named(op.Gather(y, inv, axis=0), f"{prefix}/unpermute")  # [N, d] = [T*K, d] in token order
    if gates is not None:
        flat_gates = op.Cast(gates, to=acc or x.dtype)
        if k_routes == 1:
            out = op.Mul(y, op.Reshape(flat_gates, [-1, 1]))  # [T, d] * [T, 1]
        else:  # the gate-weighted sum over the K slots as one batched product: [T, 1, K] @ [T, K, d]
            out = _named(op.MatMul(op.Reshape(flat_gates, [-1, 1, k_routes]), op.Reshape(y, [-1, k_routes, d])),
                         f"{prefix}/combine")
    elif k_routes == 1:
        out = y
    else:
        out = op.ReduceSum(op.Reshape(y, [-1, k_routes, d]), [1], keepdims=0)  # [T, d]
    if acc is not None:
        out = op.Cast(out, to=x.dtype)
    return op.Reshape(out, op.Shape(x))


def _split(x, sizes, parts: int) -> list:
    """Split(x, sizes) into `parts` outputs. The exporter's graph builder needs `num_outputs` to know how many
    outputs a Split has, which ONNX forbids beside a `split` input: `drop_split_counts` removes it after export."""
    return list(op.Split(x, sizes, axis=0, num_outputs=parts))


def drop_split_counts(model: ir.Model) -> int:
    """Remove `num_outputs` from every Split that also has a `split` input (invalid ONNX: the exporter's builder
    needs the attribute to count a Split's outputs, `_split`); returns how many. Call on the exported model
    before anything validates or runs it."""
    count = 0
    for node in ir.traversal.RecursiveGraphIterator(model.graph):
        if node.op_type == "Split" and len(node.inputs) > 1 and node.inputs[1] is not None \
                and node.attributes.pop("num_outputs", None) is not None:
            count += 1
    return count


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
            h = act.glu(self._linear(rows, self.w_gate, self.b_gate, start, end, "gate", f"{name}/gate"), up)
        w_down = self._transposed(self.w_down, start, end, 1, "down", f"{name}/down")
        return _named(op.MatMul(h, w_down), f"{name}/down")


def _static_dim(value, axis: int, prefix: str, what: str) -> int:
    dim = value.shape[axis] if value.shape is not None else None
    if not isinstance(dim, int):
        raise BackendError(f"{prefix}: {what} needs a static size along dim {axis} for the ONNX lowering, found "
                           f"shape {value.shape}")
    return dim


def _fold_by_reference(model: ir.Model, ids: set) -> None:
    """Evaluate the nodes of `model.graph` whose id is in `ids` and whose inputs are all constants, in graph
    order, with ONNX's reference evaluator, into initializers (the fallback of `fold_weight_slices`)."""
    import onnx
    from onnx.reference import ReferenceEvaluator

    opsets = [onnx.helper.make_opsetid(d, v) for d, v in model.opset_imports.items()]
    for node in [n for n in model.graph if id(n) in ids]:
        if any(v is not None and v.const_value is None for v in node.inputs) \
                or any(v.is_graph_output() for v in node.outputs):
            continue
        feeds = {f"in{i}": v.const_value.numpy() for i, v in enumerate(node.inputs) if v is not None}
        proto = ir.serde.serialize_node(node)
        del proto.input[:]
        proto.input.extend(f"in{i}" if v is not None else "" for i, v in enumerate(node.inputs))
        del proto.output[:]
        proto.output.extend(f"out{i}" for i in range(len(node.outputs)))
        graph = onnx.helper.make_graph(
            [proto], "fold", [onnx.helper.make_tensor_value_info(k, onnx.helper.np_dtype_to_tensor_dtype(a.dtype),
                                                                 a.shape) for k, a in feeds.items()],
            [onnx.helper.make_empty_tensor_value_info(f"out{i}") for i in range(len(node.outputs))])
        outs = ReferenceEvaluator(onnx.helper.make_model(graph, opset_imports=opsets)).run(None, feeds)
        for old, array in zip(node.outputs, outs):
            new = ir.Value(name=old.name, const_value=ir.tensor(array, name=old.name))
            new.shape, new.dtype = ir.Shape(array.shape), new.const_value.dtype
            model.graph.register_initializer(new)
            ir.convenience.replace_all_uses_with(old, new)
        model.graph.remove(node, safe=True)


def fold_weight_slices(model: ir.Model) -> int:
    """Evaluate the weight `Slice`/`Transpose` nodes the lowering emitted, and the constant nodes feeding them
    (a fused gate-up weight split in the graph), into initializers, in place and with no size limit. Returns
    how many lowering nodes were folded; raises `BackendError` if one is left (a weight that is not a constant
    of the graph)."""
    ours = {id(n) for n in model.graph if n.name and n.name.startswith(_FOLD_PREFIX)}
    if not ours:
        return 0
    todo = [n for n in model.graph if id(n) in ours]
    feeding: set[int] = set()
    while todo:  # every node upstream of a weight slice; the folder folds those whose inputs are all constant
        for v in todo.pop().inputs:
            producer = v.producer() if v is not None else None
            if producer is not None and id(producer) not in feeding:
                feeding.add(id(producer))
                todo.append(producer)
    try:
        onnxscript.optimizer.fold_constants(model, input_size_limit=sys.maxsize, output_size_limit=sys.maxsize,
                                            should_fold=lambda node: id(node) in ours or id(node) in feeding)
    except RuntimeError:  # its partial evaluators run on every node, and fail on some (ProphetNet's
        _fold_by_reference(model, ours | feeding)   # SplitToSequence): our few nodes evaluated one by one
    left = [n.name for n in model.graph if n.name and n.name.startswith(_FOLD_PREFIX)]
    if left:
        raise BackendError(f"routed_ffn weights must be constants of the exported graph; could not fold {left[:3]}")
    return len(ours)
