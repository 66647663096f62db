"""The exported graph cleaned up cheaply and rewritten to ONNX Runtime's fused CPU kernels.

`optimize_(model)` is onnxscript's optimizer (constant folding, its default rewrite rules, dead-node removal,
constants lifted, CSE) without the one rule whose matcher is quadratic in the graph: `SlicesSplit` has two output
nodes, and onnxscript matches such a pattern by enumerating every pair of same-type nodes of the whole graph for
every candidate (each rotary embedding has two Slices; on the 8-layer d=1024 bench model the optimizer took 1.8
CPU s with it, 0.9 without). ONNX Runtime does that Slice -> Split rewrite itself at session creation.
Each rewrite step tries only the rules whose pattern ops all occur in the model at that step (the matcher tries
every rule at every node: on a 12-layer, 128-expert MoE graph of 11k nodes, 7.8 -> 5.7 s; bench/moe_compile.py).

`fuse_(model, fusions)` then applies, in place and in this order (each counted; a fusion whose rules are missing in
the installed onnxscript is skipped and said so in the notes):

  shared_kv_heads  Attention(q, Reshape(Expand(Unsqueeze(k, 2))), ...) -> Attention(q, k, ...): opset 23's
                   Attention takes fewer K/V heads than query heads (grouped-query attention) and repeats them
                   itself, so the exporter's [B, kv, rep, S, H] copies of K and V per layer go.
  rotary           x * cos + rotate_half(x) * sin on [B, N, S, H] (rotate_half = Concat(-x[..., H/2:], x[..., :H/2]))
                   with cos / sin = Unsqueeze(Cos / Sin(Concat(f, f)), 1), f [1, S, H/2] (one angle row per
                   position, the same for every batch row) -> com.microsoft RotaryEmbedding(x, position offset 0,
                   Cos(f[0]), Sin(f[0])): row s of the cache is position s's angles, whatever the positions are.
                   f [B, S, H/2] (per-row position_ids: the generation graphs, left padding) -> the cache is f
                   flattened to [B*S, H/2] and the position ids b*S + s. Measured on the 6-layer d=256 trained
                   LM's decode step (ONNX Runtime, 2 threads): 320 -> 253 nodes, 0.66 -> 0.55 ms.
  causal_gqa       Attention whose mask may be the causal triangle -> If(mask causal over equal lengths,
                   com.microsoft GroupQueryAttention on [B, S, heads * H] views, the exported Attention):
                   ONNX Runtime's GQA CPU kernel skips the masked half of the scores (`onnx_attention`).
  rms_norm         Pow / ReduceMean / Add eps / Sqrt / Reciprocal / Mul / Mul(scale) ->
                   SimplifiedLayerNormalization (ONNX Runtime's RMSNorm kernel; onnxscript's rule).
  skip_rms_norm    Add(residual, x) feeding a SimplifiedLayerNormalization -> SkipSimplifiedLayerNormalization
                   (com.microsoft: the residual sum and its norm in one pass; onnxscript's rule). Not applied
                   where a norm's input and scale types differ (an fp16 Gemma scales in float32): the fused
                   kernel binds one type, and ONNX Runtime would refuse the graph.

Each rewrite computes the same function in fp32 (the equality tests run with ONNX Runtime's own graph
optimizations on and off); none adds a NaN guard. Which fusions pay was measured with `bench/onnx_fusions.py`
(bench shape A cut to 4 layers, one thread, median CPU per run against no fusion: shared_kv_heads -0.7%, rotary
-2.5%, rms_norm + skip_rms_norm -2.0%, all -3.5%; kernel time outside MatMul and Attention 39.8 -> 22.5 ms;
causal_gqa on the 8-layer model, one thread, on a loaded machine: -7.8% CPU per run, attention 150 -> 74 ms).
"""
from __future__ import annotations

import dataclasses

import numpy as np
import onnx_ir as ir
import onnx_ir.passes.common as common_passes

__all__ = ["FUSIONS", "DEFAULT_FUSIONS", "FusionResult", "optimize_", "fuse_"]

FUSIONS = ("shared_kv_heads", "rotary", "causal_gqa", "rms_norm", "skip_rms_norm")
DEFAULT_FUSIONS = FUSIONS
_QUADRATIC_RULES = {"SlicesSplit"}  # multi-output patterns: matched by enumerating node pairs of the whole graph


@dataclasses.dataclass
class FusionResult:
    counts: dict[str, int] = dataclasses.field(default_factory=dict)  # fusion -> rewrites made
    notes: list[str] = dataclasses.field(default_factory=list)  # "fusion: node: reason" for patterns left alone

    def summary(self, limit: int = 3) -> list[str]:
        """Lines for the compile report: the counts, then at most `limit` distinct misses (the same miss on
        every layer said once, with its count)."""
        done = ", ".join(f"{k} x{v}" for k, v in self.counts.items() if v) or "none"
        misses: dict[str, int] = {}
        for n in self.notes:  # "fusion: node: reason" -> "fusion: reason"
            key = n.split(": ", 1)[0] + ": " + n.rsplit(": ", 1)[-1]
            misses[key] = misses.get(key, 0) + 1
        return [f"ONNX fusions: {done}"] + [f"ONNX fusion not applied: {k}" + (f" ({v}x)" if v > 1 else "")
                                            for k, v in list(misses.items())[:limit]]


def _default_rules():
    """onnxscript's default rewrite rules minus the quadratic ones; None if this onnxscript has no such list
    (then `optimize_` runs onnxscript's optimizer as it is)."""
    from onnxscript import rewriter
    rules = getattr(rewriter, "_DEFAULT_REWRITE_RULES", None)
    if rules is None:
        return None
    return [r for r in rules if getattr(r, "name", None) not in _QUADRATIC_RULES]


def optimize_(model: ir.Model) -> str:
    """onnxscript's optimizer (what `torch.onnx.export(optimize=True)` runs) without its quadratic rule, and
    with only the rules that can match the model at each step (`_RewriteRulesThatCanMatch`), in place. Returns
    which optimizer ran ("routefx" or "onnxscript", the latter where the rule list is missing); where its constant
    folder fails on a node, the same passes without folding, and the returned text says why."""
    import onnxscript.optimizer
    from onnxscript.optimizer import _constant_folding

    rules = _default_rules()
    if rules is None:
        onnxscript.optimizer.optimize(model)
        return "onnxscript"

    def passes(fold: bool):
        folding = [_constant_folding.FoldConstantsPass(
            shape_inference=True, input_size_limit=_constant_folding.DEFAULT_CONSTANT_FOLD_INPUT_SIZE_LIMIT,
            output_size_limit=_constant_folding.DEFAULT_CONSTANT_FOLD_OUTPUT_SIZE_LIMIT)] if fold else []
        loop = ir.passes.PassManager(
            folding + [_RewriteRulesThatCanMatch(rules),
                       common_passes.RemoveUnusedNodesPass(),
                       common_passes.RemoveUnusedFunctionsPass(),
                       common_passes.RemoveUnusedOpsetsPass()],
            steps=2, early_stop=True)
        return ir.passes.Sequential(
            common_passes.InlinePass(),
            loop,
            common_passes.RemoveUnusedNodesPass(),
            common_passes.LiftConstantsToInitializersPass(lift_all_constants=True, size_limit=0),
            common_passes.LiftSubgraphInitializersToMainGraphPass(),
            common_passes.DeduplicateInitializersPass(),
            common_passes.CommonSubexpressionEliminationPass(),
            common_passes.OutputFixPass(),
            common_passes.NameFixPass(),
        )

    try:
        passes(fold=True)(model)
    except ir.passes.PassError as e:  # onnxscript's folder fails on some nodes (SplitToSequence in ProphetNet);
        # each fold it made before is exact, and ONNX Runtime folds constants again at session creation
        cause = e
        while cause.__cause__ is not None:
            cause = cause.__cause__
        passes(fold=False)(model)
        return f"routefx, without onnxscript's constant folding ({type(cause).__name__}: {cause})"
    return "routefx"


def _pattern_ops(rule) -> frozenset | None:
    """The (domain, op type) pairs a rewrite rule's pattern needs, or None where that is not readable (a pattern
    node matching any op, a rule of another kind, another onnxscript): such a rule always runs."""
    try:
        ids = [n.op_identifier() for n in rule._target_pattern._nodes]
    except (AttributeError, TypeError):
        return None
    if any(i is None or not isinstance(i[1], str) for i in ids):
        return None
    return frozenset((_domain(i[0]), i[1]) for i in ids)


def _domain(d: str | None) -> str:
    return "" if d in (None, "ai.onnx") else d


class _RewriteRulesThatCanMatch(ir.passes.InPlacePass):
    """onnxscript's RewritePass with only the rules whose pattern ops all occur in the model when it runs: the
    matcher tries every rule at every node, and on a MoE model with many experts (a dozen ONNX nodes per expert)
    half of the default rules (convolution, batch norm, clip, dropout, scatter patterns) cannot match any of them.
    The op set is read again at each call, so ops an earlier rewrite made are seen by the next step."""

    def __init__(self, rules):
        super().__init__()
        self.rules = [(r, _pattern_ops(r)) for r in rules]

    def rules_for(self, model: ir.Model) -> list:
        """The rules that can match `model` as it is now."""
        graphs = [model.graph, *model.functions.values()]
        present = {(_domain(n.domain), n.op_type)
                   for g in graphs for n in ir.traversal.RecursiveGraphIterator(g)}
        return [r for r, ops in self.rules if ops is None or ops <= present]

    def call(self, model: ir.Model) -> ir.passes.PassResult:
        from onnxscript import rewriter

        return rewriter.RewritePass(self.rules_for(model))(model)


def _is(node: ir.Node | None, op_type: str) -> bool:
    return node is not None and node.op_type == op_type and _domain(node.domain) == ""


def _ints(v: ir.Value | None) -> list[int] | None:
    if v is None or v.const_value is None:
        return None
    return np.asarray(v.const_value.numpy()).reshape(-1).tolist()


# ---- shared K/V heads ------------------------------------------------------------------------------------------

def _head_repeat_source(v: ir.Value) -> tuple[ir.Value | None, str]:
    """(kv, "") when `v` = Reshape(Expand(Unsqueeze(kv, axes=[2]), [B, kv, rep, S, H]), [B, kv*rep, S, H]) with kv
    of shape [B, kv, S, H] (each K/V head repeated rep times, adjacent: torch's repeat_kv / repeat_interleave on
    dim 1); (None, "") where there is no Reshape(Expand(Unsqueeze)) chain at all (no repeat: nothing to say);
    (None, the reason) where there is one that is not a head repeat."""
    reshape = v.producer()
    expand = reshape.inputs[0].producer() if _is(reshape, "Reshape") else None
    unsq = expand.inputs[0].producer() if _is(expand, "Expand") else None
    if not _is(unsq, "Unsqueeze") or len(unsq.inputs) < 2:
        return None, ""
    if _ints(unsq.inputs[1]) not in ([2], [-3]):
        return None, "Unsqueeze not on axis 2"
    kv, mid, out = unsq.inputs[0], expand.outputs[0], reshape.outputs[0]
    if kv.shape is None or mid.shape is None or out.shape is None:
        return None, "shapes unknown"
    if kv.shape.rank() != 4 or mid.shape.rank() != 5 or out.shape.rank() != 4:
        return None, f"ranks {kv.shape.rank()}, {mid.shape.rank()}, {out.shape.rank()} (expected 4, 5, 4)"
    b, heads, s, h = kv.shape
    rep = mid.shape[2]
    if not (isinstance(heads, int) and isinstance(rep, int)):
        return None, "head counts not static"
    # out's sequence dim is not compared: with the other three equal, the Reshape's element count fixes it (torch
    # 2.11's exporter gives it another symbol than kv's)
    if list(mid.shape) != [b, heads, rep, s, h] or [out.shape[i] for i in (0, 1, 3)] != [b, heads * rep, h]:
        return None, f"shapes {kv.shape} -> {mid.shape} -> {out.shape} are not a head repeat"
    return kv, ""


def _fuse_shared_kv_heads(model: ir.Model, result: FusionResult) -> int:
    count = 0
    for node in list(model.graph):
        if not _is(node, "Attention") or len(node.inputs) < 3:
            continue
        if model.opset_imports.get("", 0) < 23:
            continue
        q = node.inputs[0]
        sources = [_head_repeat_source(node.inputs[i]) for i in (1, 2)]
        if any(src is None for src, _ in sources):
            reasons = "; ".join(r for _, r in sources if r)
            if reasons:
                result.notes.append(f"shared_kv_heads: {node.name}: {reasons}")
            continue
        if q.shape is None or q.shape.rank() != 4:
            result.notes.append(f"shared_kv_heads: {node.name}: query not 4-D")
            continue
        for i, (src, _) in zip((1, 2), sources):
            node.replace_input_with(i, src)
        count += 1
    if count:
        common_passes.RemoveUnusedNodesPass()(model)
    return count


# ---- rotary embedding -------------------------------------------------------------------------------------------

def _last_axis_slice(node: ir.Node | None, start: int, end: int | None, h: int) -> bool:
    """node = Slice(x, [start], [end], [last axis], [1]) of 4-D x; end None: any end >= h (to the end)."""
    if not _is(node, "Slice") or len(node.inputs) < 4:
        return False
    ends = _ints(node.inputs[2])
    steps = _ints(node.inputs[4]) if len(node.inputs) > 4 and node.inputs[4] is not None else [1]
    return (_ints(node.inputs[1]) == [start] and ends is not None and len(ends) == 1
            and (ends[0] == end if end is not None else ends[0] >= h)
            and _ints(node.inputs[3]) in ([3], [-1]) and steps == [1])


def _angles(v: ir.Value, trig: str, half: int) -> ir.Value | None:
    """f where v = Unsqueeze(trig(Concat(f, f, axis=-1)), [1]) and f is [1, S, half]; else None."""
    unsq = v.producer()
    if not _is(unsq, "Unsqueeze") or _ints(unsq.inputs[1]) != [1]:
        return None
    t = unsq.inputs[0].producer()
    cat = t.inputs[0].producer() if _is(t, trig) else None
    if not _is(cat, "Concat") or len(cat.inputs) != 2 or cat.inputs[0] is not cat.inputs[1]:
        return None
    f = cat.inputs[0]
    if cat.attributes.get_int("axis", 0) not in (-1, 2) or f.shape is None or f.shape.rank() != 3:
        return None
    return f if f.shape[2] == half else None


def _rotary_match(add: ir.Node) -> tuple[ir.Value, ir.Value] | str:
    """(x, f) when `add` is x * cos + rotate_half(x) * sin as in the module docstring, else the reason."""
    if len(add.inputs) != 2:
        return "not a binary Add"
    for a, b in (add.inputs, add.inputs[::-1]):
        m_cos, m_sin = a.producer(), b.producer()
        if not (_is(m_cos, "Mul") and _is(m_sin, "Mul")):
            continue
        for rot, sin in (m_sin.inputs, m_sin.inputs[::-1]):
            cat = rot.producer()
            if not _is(cat, "Concat") or len(cat.inputs) != 2 or cat.attributes.get_int("axis", 0) not in (-1, 3):
                continue
            neg, first = cat.inputs[0].producer(), cat.inputs[1].producer()
            second = neg.inputs[0].producer() if _is(neg, "Neg") else None
            if second is None or first is None or second.inputs[0] is not first.inputs[0]:
                continue
            x = first.inputs[0]
            if x not in m_cos.inputs:
                continue
            cos = m_cos.inputs[1] if m_cos.inputs[0] is x else m_cos.inputs[0]
            if x.shape is None or x.shape.rank() != 4 or not isinstance(x.shape[3], int) or x.shape[3] % 2:
                return "input not [B, N, S, H] with a static, even head size"
            h = x.shape[3]
            if not (_last_axis_slice(first, 0, h // 2, h) and _last_axis_slice(second, h // 2, None, h)):
                return "rotate_half does not split the head in halves"
            f = _angles(cos, "Cos", h // 2)
            if f is None or _angles(sin, "Sin", h // 2) is not f:
                return "cos / sin are not Cos / Sin of one [B, S, H/2] angle table repeated twice"
            if not _same_batch(f.shape[0], x.shape[0]):
                return f"angle table batch {f.shape[0]} is neither 1 nor the input's batch {x.shape[0]}"
            return x, f
    return "not x * cos + rotate_half(x) * sin"


def _same_batch(table, x) -> bool:
    """Whether the angle table's batch dim is 1 or provably the input's (an equal int, or the same named
    symbol): the flattened cache of `_rotary_tables` has one block of rows per batch row of x."""
    if table == 1:
        return True
    if isinstance(table, int) or isinstance(x, int):
        return table == x
    return getattr(table, "value", None) is not None and table == x


def _rotary_tables(f: ir.Value, zero: ir.Value, axes0: ir.Value) -> tuple[list[ir.Node], tuple]:
    """(nodes, (position ids, cos cache, sin cache)) for RotaryEmbedding from the angle table f [B, S, H/2].
    B == 1 (positions shared by the rows): the cache is f[0] and the position offset 0. Otherwise (per-row
    positions, e.g. a decode step's position_ids input): the cache is f flattened to [B*S, H/2] and row (b, s)
    reads cache row b*S + s, so any positions, padding included, give exactly the angles the model computed."""
    if f.shape[0] == 1:
        table = ir.node("Squeeze", [f, axes0])
        nodes, positions = [table], zero
    else:
        def const(v):
            return ir.node("Constant", [], attributes={"value": ir.tensor(np.array(v, np.int64))})
        flat_shape, start, step = const([-1, f.shape[2]]), const(0), const(1)
        table = ir.node("Reshape", [f, flat_shape.outputs[0]])                           # [B*S, H/2]
        shape = ir.node("Shape", [f], attributes={"start": 0, "end": 2})                   # [B, S]
        count = ir.node("ReduceProd", [shape.outputs[0]], attributes={"keepdims": 0})      # B*S
        rows = ir.node("Range", [start.outputs[0], count.outputs[0], step.outputs[0]])
        ids = ir.node("Reshape", [rows.outputs[0], shape.outputs[0]])                      # [B, S]: b*S + s
        nodes, positions = [flat_shape, start, step, table, shape, count, rows, ids], ids.outputs[0]
    cos, sin = ir.node("Cos", [table.outputs[0]]), ir.node("Sin", [table.outputs[0]])
    return nodes + [cos, sin], (positions, cos.outputs[0], sin.outputs[0])


def _replace_value(old: ir.Value, new: ir.Value) -> None:
    """Every use of `old` reads `new`, graph outputs included (a prefill graph returns the rotated keys as its
    cache); a graph output keeps its name, so the model's outputs read the same."""
    if old.is_graph_output():
        name, old.name = old.name, f"{old.name}/unfused"
        new.name = name
    old.replace_all_uses_with(new, replace_graph_outputs=True)


def _fuse_rotary(model: ir.Model, result: FusionResult) -> int:
    graph, caches, count = model.graph, {}, 0
    zero = axes0 = None
    for add in list(graph):
        if not _is(add, "Add") or not _is(add.inputs[0].producer(), "Mul"):
            continue
        found = _rotary_match(add)
        if isinstance(found, str):
            if found != "not x * cos + rotate_half(x) * sin":
                result.notes.append(f"rotary: {add.name}: {found}")
            continue
        x, f = found
        if zero is None:
            zero = ir.Value(name="routefx_rotary_position_offset", const_value=ir.tensor(np.array([0], np.int64)))
            axes0 = ir.Value(name="routefx_rotary_axes0", const_value=ir.tensor(np.array([0], np.int64)))
            graph.register_initializer(zero)
            graph.register_initializer(axes0)
        new = []
        if id(f) not in caches:  # cos / sin tables, made once per angle table, before their first use
            new, caches[id(f)] = _rotary_tables(f, zero, axes0)
        positions, cos, sin = caches[id(f)]
        rope = ir.node("RotaryEmbedding", [x, positions, cos, sin], attributes={"interleaved": 0},
                       domain="com.microsoft", name=f"{add.name}/rotary")
        out = rope.outputs[0]
        out.shape, out.type = add.outputs[0].shape, add.outputs[0].type
        graph.insert_before(add, [*new, rope])
        _replace_value(add.outputs[0], out)
        count += 1
    if count:
        model.opset_imports.setdefault("com.microsoft", 1)
        common_passes.RemoveUnusedNodesPass()(model)
    return count


# ---- norms (onnxscript's ORT fusion rules) --------------------------------------------------------------------

def _rule_set(name: str):
    if name == "rms_norm":
        from onnxscript.rewriter.ort_fusions.rms_normalization import rms_normalization_ruleset
        return rms_normalization_ruleset
    from onnxscript.rewriter.ort_fusions.skip_normalization import skip_rms_normalization_ruleset
    return skip_rms_normalization_ruleset


def _mixed_norm(model: ir.Model) -> str | None:
    """The input and scale types of the first SimplifiedLayerNormalization whose two differ (onnxscript's skip
    rule would fuse it into a SkipSimplifiedLayerNormalization, whose one type parameter ONNX Runtime then
    refuses to bind), or None."""
    for node in model.graph:
        if node.op_type == "SimplifiedLayerNormalization" and len(node.inputs) > 1 and node.inputs[1] is not None:
            x, scale = node.inputs[0].dtype, node.inputs[1].dtype
            if x is not None and scale is not None and x != scale:
                return f"{x} input with a {scale} scale"
    return None


def _fuse_causal_gqa(model: ir.Model, result: FusionResult) -> int:
    from routefx.backends.onnx_attention import fuse_causal_gqa  # it imports this module's helpers
    return fuse_causal_gqa(model, result)


_OWN = {"shared_kv_heads": _fuse_shared_kv_heads, "rotary": _fuse_rotary, "causal_gqa": _fuse_causal_gqa}


def fuse_(model: ir.Model, fusions=DEFAULT_FUSIONS) -> FusionResult:
    """Apply `fusions` (names from FUSIONS) to `model` in place; returns the counts and notes (fusions skipped
    because this onnxscript lacks their rules, attention nodes left as they were and why)."""
    unknown = sorted(set(fusions) - set(FUSIONS))
    if unknown:
        from routefx.errors import BackendError
        raise BackendError(f"unknown ONNX fusion(s) {unknown}; supported: {', '.join(FUSIONS)}")
    result = FusionResult()
    for name in FUSIONS:
        if name not in fusions:
            continue
        if name in _OWN:
            result.counts[name] = _OWN[name](model, result)
            continue
        if name == "skip_rms_norm" and (mixed := _mixed_norm(model)) is not None:
            result.counts[name] = 0     # ONNX Runtime's fused kernel takes one type for input, skip and scale
            result.notes.append(f"skip_rms_norm: not applied, a norm takes {mixed} (an fp16 model whose norm "
                                "scales in float32, as Gemma's does)")
            continue
        try:
            rules = _rule_set(name)
        except ImportError as e:
            result.notes.append(f"{name}: not applied, this onnxscript lacks the rule ({e})")
            continue
        result.counts[name] = rules.apply_to_model(model)
    if any(result.counts.values()):
        common_passes.RemoveUnusedNodesPass()(model)
        common_passes.RemoveUnusedOpsetsPass()(model)
    return result
