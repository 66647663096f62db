"""Causal self-attention onto ONNX Runtime's GroupQueryAttention CPU kernel, behind a run-time check.

Why. The exporter writes each attention as ONNX `Attention` (opset 23) with a boolean mask built from the causal
triangle and the attention mask. ONNX Runtime's CPU kernel for it computes every one of the S × S scores and then
masks; only with no mask at all does it take a fused path. com.microsoft `GroupQueryAttention` is causal by
construction, takes grouped K/V heads, and computes the lower triangle only. Measured with ONNX Runtime 1.32 on an
Intel Xeon, 2 threads, 16 query / 4 K/V heads of 64, S = 512, one call: Attention with the causal mask 8.3 ms,
GroupQueryAttention 4.1 ms, torch's causal SDPA 4.4 ms (1.30: 8.4 / 4.0 / 3.7 ms). GroupQueryAttention is asked
for its attention output only: requesting `present_key` / `present_value` selects another (tiled) CPU kernel
that took 9-11 ms on the same call.

What it cannot express: a mask other than the causal one over equal query and key lengths (left padding, a
sliding window shorter than the sequence, a decode step over a cache). An Attention whose keys are a cache input
with the step's keys appended (the generation graphs' decode step) is left as exported: its lengths differ on
every call with a past. Otherwise whether the mask is causal is a property of the inputs, not of the graph, so it
is checked at run time:

    If(cond, then: GroupQueryAttention(q, k, v as [B, S, heads · H]), else: the exported Attention as it was)
    cond = (S_q == S_kv) and the mask equals the causal triangle
           (a bool mask element for element; a float mask 0 where allowed and <= -1e30 where not)

so a padded batch, a windowed layer or a cached step runs the exported node, and nothing is ever approximated.
The check is one compare over the mask; layers that share the mask and the lengths share it. When the attention
output is read through Transpose([0, 2, 1, 3]) + Reshape to [B, S, heads · H] (the usual way into the output
projection), that pair moves into the else branch and the then branch hands GroupQueryAttention's [B, S, heads · H]
output straight on.

Only fp32 4-D q / k / v with static head counts and one head size (a multiple of 8, which the CPU kernel
requires), no past inputs, no softcap, and unused optional outputs are rewritten; other Attention nodes are left
as they are (said in the fusion notes).
"""
from __future__ import annotations

import numpy as np
import onnx_ir as ir
import onnx_ir.passes.common as common_passes

from routefx.backends.onnx_fusions import _is

__all__ = ["fuse_causal_gqa"]

_NEG = -1e30  # a float mask entry at or below this is a masked position (exp underflows to exactly 0 in fp32)


def _blocker(node: ir.Node) -> str | None:
    """Why `node` (an ONNX Attention) cannot become GroupQueryAttention; None if it can."""
    ins = list(node.inputs) + [None] * (6 - len(node.inputs))
    q, k, v, mask, past_k, past_v = ins[:6]
    if past_k is not None or past_v is not None or len(node.inputs) > 6:
        return "past key / value inputs"
    if any(o.uses() or o.is_graph_output() for o in node.outputs[1:]):
        return "optional outputs used"
    if _cache_concat(k):
        return ("keys are the cache input plus the step's keys (a decode step, its lengths differ whenever a past "
                "is given)")
    if node.attributes.get_float("softcap", 0.0) != 0.0:
        return "softcap"
    causal = node.attributes.get_int("is_causal", 0)
    if causal and mask is not None:
        return "is_causal together with a mask"
    if not causal and mask is None:
        return "not causal (no mask): ORT's kernel is already fused"
    for name, t in (("query", q), ("key", k), ("value", v)):
        if t is None or t.shape is None or t.shape.rank() != 4 or t.dtype != ir.DataType.FLOAT:
            return f"{name} not a 4-D fp32 tensor"
        if not (isinstance(t.shape[1], int) and isinstance(t.shape[3], int)):
            return f"{name} heads / head size not static"
    heads, kv_heads = q.shape[1], k.shape[1]
    if v.shape[1] != kv_heads or not (q.shape[3] == k.shape[3] == v.shape[3]):
        return f"head layout q {q.shape}, k {k.shape}, v {v.shape} (one head size, K and V heads equal)"
    if q.shape[3] % 8:
        return f"head size {q.shape[3]} not a multiple of 8 (GroupQueryAttention's CPU kernel requires it)"
    if heads % kv_heads:
        return f"{heads} query heads not a multiple of {kv_heads} K/V heads"
    if mask is not None and (mask.dtype not in (ir.DataType.BOOL, ir.DataType.FLOAT) or mask.shape is None
                             or mask.shape.rank() > 4):
        return "mask not a bool / fp32 tensor of rank <= 4"
    return None


def _cache_concat(k: ir.Value | None) -> bool:
    """Whether k is Concat(..., a graph input, ..., axis = sequence) of 4-D tensors: a step's keys appended to a
    KV cache passed in (the generation graphs). Such an attention runs its queries against the past too, so the
    run-time check (equal lengths and the causal triangle) fails on every call with a past and would only add
    an If and a compare per layer to each decode step; the exported Attention computes it exactly."""
    cat = k.producer() if k is not None else None
    return (_is(cat, "Concat") and cat.attributes.get_int("axis", 0) in (2, -2)
            and any(i is not None and i.is_graph_input() for i in cat.inputs))


class _Builder:
    """Appends nodes before an anchor node of the main graph and makes constants (initializers)."""

    def __init__(self, graph: ir.Graph):
        self.graph = graph
        self.consts: dict[tuple, ir.Value] = {}
        self.n = 0

    def const(self, array: np.ndarray) -> ir.Value:
        key = (array.dtype.str, array.shape, array.tobytes())
        if key not in self.consts:
            self.n += 1
            v = ir.Value(name=f"routefx_gqa_const_{self.n}", const_value=ir.tensor(array))
            self.graph.register_initializer(v)
            self.consts[key] = v
        return self.consts[key]

    def i64(self, *xs: int) -> ir.Value:
        return self.const(np.array(xs, np.int64))


def _dim(new: list, t: ir.Value, axis: int) -> ir.Value:
    node = ir.node("Shape", [t], attributes={"start": axis, "end": axis + 1})
    new.append(node)
    return node.outputs[0]


def _op(new: list, op: str, inputs, **attrs) -> ir.Value:
    node = ir.node(op, inputs, attributes=attrs or None)
    new.append(node)
    return node.outputs[0]


def _condition(b: _Builder, new: list, mask: ir.Value | None, sq: ir.Value, skv: ir.Value) -> ir.Value:
    """Scalar bool: S_q == S_kv and (no mask, or the mask is the causal triangle)."""
    same = _op(new, "Equal", [sq, skv])                                                  # [1]
    if mask is None:
        return _op(new, "Squeeze", [same, b.i64(0)])
    zero, one = b.i64(0), b.i64(1)
    rows = _op(new, "Add", [_op(new, "Range", [_op(new, "Squeeze", [zero]), _op(new, "Squeeze", [sq, zero]),
                                               _op(new, "Squeeze", [one])]),
                            _op(new, "Squeeze", [_op(new, "Sub", [skv, sq]), zero])])
    cols = _op(new, "Range", [_op(new, "Squeeze", [zero]), _op(new, "Squeeze", [skv, zero]),
                              _op(new, "Squeeze", [one])])
    causal = _op(new, "LessOrEqual", [_op(new, "Unsqueeze", [cols, zero]), _op(new, "Unsqueeze", [rows, one])])
    if mask.dtype == ir.DataType.BOOL:
        wrong = _op(new, "Xor", [mask, causal])
    else:
        allowed = _op(new, "Equal", [mask, b.const(np.array(0.0, np.float32))])
        blocked = _op(new, "LessOrEqual", [mask, b.const(np.array(_NEG, np.float32))])
        ok = _op(new, "Or", [_op(new, "And", [causal, allowed]),
                             _op(new, "And", [_op(new, "Not", [causal]), blocked])])
        wrong = _op(new, "Not", [ok])
    worst = _op(new, "ReduceMax", [_op(new, "Cast", [wrong], to=ir.DataType.INT32)], keepdims=0)
    ok = _op(new, "Equal", [worst, b.const(np.array(0, np.int32))])
    return _op(new, "And", [_op(new, "Squeeze", [same, zero]), ok])


def _absorbable_tail(y: ir.Value, heads_dim: int) -> tuple[ir.Node, ir.Node] | None:
    """(Transpose, Reshape) when y's only use is Transpose([0, 2, 1, 3]) whose only use is a Reshape to
    [B, S, heads · H] (identity Reshapes between them skipped)."""
    while _identity_reshape_output(y) is not None:
        y = _identity_reshape_output(y)
    uses = list(y.uses())
    if len(uses) != 1 or y.is_graph_output():
        return None
    tr = uses[0].node
    if not _is(tr, "Transpose") or list(tr.attributes.get_ints("perm", [])) != [0, 2, 1, 3]:
        return None
    uses = list(tr.outputs[0].uses())
    if len(uses) != 1 or tr.outputs[0].is_graph_output():
        return None
    rs = uses[0].node
    out = rs.outputs[0] if _is(rs, "Reshape") else None
    if out is None or out.shape is None or out.shape.rank() != 3 or out.shape[2] != heads_dim:
        return None
    return tr, rs


def _copy(node: ir.Node, inputs: list[ir.Value | None]) -> ir.Node:
    return ir.node(node.op_type, inputs, attributes=dict(node.attributes), domain=node.domain,
                   num_outputs=len(node.outputs))


def _typed(v: ir.Value, like: ir.Value) -> ir.Value:
    v.dtype, v.shape = like.dtype, like.shape
    return v


def _same_shape(a: ir.Value, b: ir.Value) -> bool:
    return a.shape is not None and b.shape is not None and a.shape.rank() == b.shape.rank() and all(
        x == y and (isinstance(x, int) or getattr(x, "value", None)) for x, y in zip(a.shape, b.shape))


def _identity_reshape_input(t: ir.Value) -> ir.Value | None:
    """x when t = Reshape(x) to x's own shape and t is x's only use."""
    rs = t.producer()
    if _is(rs, "Reshape") and _same_shape(rs.inputs[0], t) and len(rs.inputs[0].uses()) == 1:
        return rs.inputs[0]
    return None


def _identity_reshape_output(t: ir.Value) -> ir.Value | None:
    """t's only use's output when that is a Reshape of t to t's own shape."""
    uses = list(t.uses())
    rs = uses[0].node if len(uses) == 1 and not t.is_graph_output() else None
    return rs.outputs[0] if _is(rs, "Reshape") and _same_shape(t, rs.outputs[0]) else None


def _transposed_from(t: ir.Value) -> ir.Value | None:
    """x when t = Transpose(x, perm=[0, 2, 1, 3]) (x in [B, S, heads, H] layout), through identity Reshapes."""
    while _identity_reshape_input(t) is not None:
        t = _identity_reshape_input(t)
    tr = t.producer()
    if _is(tr, "Transpose") and list(tr.attributes.get_ints("perm", [])) == [0, 2, 1, 3]:
        return tr.inputs[0]
    return None


def _head_layouts(b: _Builder, new: list, then: list, else_: list, t: ir.Value, n: int, h: int,
                  node: ir.Node) -> tuple[ir.Value, ir.Value, tuple[ir.Value, int]]:
    """(t as [B, S, n·h] for the then branch, t as [B, n, S, h] for the else branch, (a value computed outside
    the If whatever the branch, the axis of its sequence length)).

    Where t is only read by `node` and comes from a [B, S, n, h] tensor x through Transpose([0, 2, 1, 3]), or
    through that Transpose and a (com.microsoft) RotaryEmbedding, the then branch reads x (rotated on its 3-D form
    outside the If) without any transpose, and the transpose moves into the else branch; otherwise the then
    branch transposes t."""
    users = {id(u.node) for u in t.uses()}
    producer = t.producer()
    rope = producer if (producer is not None and producer.op_type == "RotaryEmbedding"
                        and producer.domain == "com.microsoft" and len(producer.inputs) == 4) else None
    x = _transposed_from(rope.inputs[0] if rope is not None else t)
    if users != {id(node)} or t.is_graph_output() or x is None or (
            rope is not None and (len(rope.inputs[0].uses()) != 1 or rope.attributes.get_int("interleaved", 0))):
        t3 = _op(then, "Reshape", [_op(then, "Transpose", [t], perm=[0, 2, 1, 3]), b.i64(0, 0, n * h)])
        return t3, t, (t, 2)
    t3 = _op(new, "Reshape", [x, b.i64(0, 0, n * h)])
    if rope is None:
        return t3, _op(else_, "Transpose", [x], perm=[0, 2, 1, 3]), (x, 1)
    attrs = dict(rope.attributes)
    attrs["num_heads"] = ir.AttrInt64("num_heads", n)
    rot = ir.node("RotaryEmbedding", [t3, *rope.inputs[1:]], attributes=attrs, domain="com.microsoft",
                  name=f"{rope.name}/3d")
    new.append(rot)
    t4 = _op(else_, "Transpose", [_op(else_, "Reshape", [rot.outputs[0], b.i64(0, 0, n, h)])], perm=[0, 2, 1, 3])
    return rot.outputs[0], t4, (x, 1)


def _rewrite(b: _Builder, node: ir.Node, conditions: dict) -> None:
    graph = b.graph
    q, k, v = node.inputs[:3]
    mask = node.inputs[3] if len(node.inputs) > 3 else None
    heads, kv_heads, h = q.shape[1], k.shape[1], q.shape[3]
    new: list[ir.Node] = []
    then: list[ir.Node] = []
    else_: list[ir.Node] = []
    (q3, q4, q_len), (k3, k4, k_len), (v3, v4, _) = (_head_layouts(b, new, then, else_, t, n, h, node)
                                                     for t, n in ((q, heads), (k, kv_heads), (v, kv_heads)))
    sq, skv = _dim(new, *q_len), _dim(new, *k_len)
    key = (id(mask), str(q.shape[2]), str(k.shape[2]))
    named = all(isinstance(d, int) or getattr(d, "value", None) for d in (q.shape[2], k.shape[2]))
    if named and key in conditions:
        cond = conditions[key]
    else:
        cond = _condition(b, new, mask, sq, skv)
        if named:
            conditions[key] = cond
    batch = _dim(new, q_len[0], 0)
    seqlens = _op(new, "Expand", [_op(new, "Cast", [_op(new, "Sub", [skv, b.i64(1)])], to=ir.DataType.INT32),
                                  batch])
    total = _op(new, "Cast", [_op(new, "Squeeze", [skv, b.i64(0)])], to=ir.DataType.INT32)
    attrs = {"num_heads": heads, "kv_num_heads": kv_heads}
    scale = node.attributes.get_float("scale", 0.0)
    if scale:
        attrs["scale"] = scale
    gqa = ir.node("GroupQueryAttention", [q3, k3, v3, None, None, seqlens, total], attributes=attrs,
                  domain="com.microsoft", name=f"{node.name}/gqa")
    then.append(gqa)
    y3 = gqa.outputs[0]

    else_.append(_copy(node, [q4, k4, v4, *node.inputs[3:]]))
    y = node.outputs[0]
    tail = _absorbable_tail(y, heads * h)
    if tail is not None:
        tr, rs = tail
        else_.append(_copy(tr, [else_[-1].outputs[0]]))
        else_.append(_copy(rs, [else_[-1].outputs[0], *rs.inputs[1:]]))
        replaced = rs.outputs[0]
        then_out = y3
    else:
        replaced = y
        then_out = _op(then, "Transpose", [_op(then, "Reshape", [y3, b.i64(0, 0, heads, h)])], perm=[0, 2, 1, 3])
    _typed(then_out, replaced)
    _typed(else_[-1].outputs[0], replaced)
    branches = {name: ir.Graph([], [out], nodes=nodes, name=f"{node.name}/{name}")
                for name, out, nodes in (("then_branch", then_out, then), ("else_branch", else_[-1].outputs[0], else_))}
    choose = ir.node("If", [cond], attributes=branches, name=f"{node.name}/causal_gqa")
    _typed(choose.outputs[0], replaced)
    graph.insert_before(node, [*new, choose])
    if replaced.is_graph_output():  # keep the graph output's name
        name, replaced.name = replaced.name, f"{replaced.name}/unfused"
        choose.outputs[0].name = name
    replaced.replace_all_uses_with(choose.outputs[0], replace_graph_outputs=True)


def fuse_causal_gqa(model: ir.Model, result) -> int:
    """Rewrite every eligible Attention node as in the module docstring; returns the count (misses in
    result.notes)."""
    if model.opset_imports.get("", 0) < 23:
        return 0
    b, conditions, count = _Builder(model.graph), {}, 0
    for node in list(model.graph):
        if not _is(node, "Attention"):
            continue
        reason = _blocker(node)
        if reason is not None:
            result.notes.append(f"causal_gqa: {node.name}: {reason}")
            continue
        _rewrite(b, node, conditions)
        count += 1
    if count:
        model.opset_imports.setdefault("com.microsoft", 1)
        common_passes.RemoveUnusedNodesPass()(model)
        common_passes.NameFixPass()(model)  # names for the new values, unique across the branches too
    return count
