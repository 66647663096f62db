"""`routefx.backends.onnx_fusions`: the rewrites to ONNX Runtime's fused CPU kernels fire where the model has the
pattern (counts from the model's own modules, not from the rewriter), leave the rest alone, and keep the output
equal to eager with ONNX Runtime's graph optimizations on and off; the cheap optimizer and the skipped
type-promotion pass lower the same function."""
from __future__ import annotations

import collections
import functools

import numpy as np
import onnx
import onnx_ir as ir
import onnxruntime as ort
import pytest
import torch

import routefx
from routefx.backends import onnx as onnx_backend
from routefx.backends import onnx_fusions, onnx_program
from routefx.backends.onnx_opset import export_opset
from routefx.errors import BackendError
from routefx.ir.capture import capture
from tests.compare import assert_close_nonpad, graph_kwargs
from tests.tolerances import ONNX_VS_EAGER
from tests.zoo import ZOO, example_inputs


def _rms_norms(model: torch.nn.Module) -> int:
    """RMSNorm modules of the model (the norms `rms_norm` must fuse), by their class."""
    return sum(type(m).__name__.endswith(("RMSNorm", "_RMS")) for m in model.modules())


def _ops(runner) -> collections.Counter:
    return collections.Counter(n.op_type for n in onnx.load_from_string(runner.onnx_model).graph.node)


@functools.lru_cache(maxsize=None)
def _captured(name: str):
    entry = ZOO[name]
    model = entry.build()
    args, kwargs = example_inputs(entry, batch=2, seq=7)
    cm = routefx.compile(model, routefx.policies.Dense(), example_inputs=args, example_kwargs=kwargs, backend="eager")
    return model, cm.graph_module, graph_kwargs(cm.graph_module, args, kwargs)


@functools.lru_cache(maxsize=None)
def _compiled(name: str, fusions=onnx_fusions.DEFAULT_FUSIONS):
    """(model, graph, ONNX runner) for a zoo model, Dense, lowered with `fusions` (one capture per model)."""
    model, gm, example = _captured(name)
    return model, gm, onnx_backend.prepare(gm, example, fusions=fusions)


def _equal_on_and_off(gm, run, name: str) -> None:
    args, kwargs = example_inputs(ZOO[name], batch=3, seq=13, left_pad=4, seed=5)
    feeds = graph_kwargs(gm, args, kwargs)
    with torch.no_grad():
        ref = gm(**feeds)
    for level in ("all", "disable"):
        assert_close_nonpad(run.at_level(level)(**feeds), ref, kwargs.get("attention_mask"), ONNX_VS_EAGER)


@pytest.mark.parametrize("name", ["llama", "plain_sandwich"])
def test_norms_fused_and_equal(name):
    """Every RMSNorm becomes one SimplifiedLayerNormalization or, where a residual add feeds it, one
    SkipSimplifiedLayerNormalization; no Pow / Sqrt / Reciprocal of the unfused norm is left."""
    model, gm, run = _compiled(name)
    ops = _ops(run)
    norms = _rms_norms(model)
    assert norms > 0
    assert ops["SimplifiedLayerNormalization"] + ops["SkipSimplifiedLayerNormalization"] == norms, ops
    assert ops["SkipSimplifiedLayerNormalization"] == run.fusions["skip_rms_norm"] > 0
    assert not set(ops) & {"Pow", "Sqrt", "Reciprocal"}, ops
    _equal_on_and_off(gm, run, name)


@pytest.mark.skipif(export_opset() is None, reason="this ONNX Runtime lacks opset 23's Attention")
def test_attention_fusions_on_llama():
    """llama (4 query heads, 2 K/V heads, rotary embeddings): K and V reach each Attention node unrepeated (no
    Expand of them left), the rotary embedding of q and k in each layer is one RotaryEmbedding (no Neg / Slice /
    Concat of rotate_half left), and the result equals eager."""
    entry = ZOO["llama"]
    model, gm, run = _compiled("llama")
    layers = entry.expect.blocks
    assert run.fusions["shared_kv_heads"] == layers
    ops = _ops(run)
    assert ops["RotaryEmbedding"] == run.fusions["rotary"] == 2 * layers, ops
    assert not set(ops) & {"Neg", "Slice", "Split"}, ops
    graph = onnx.load_from_string(run.onnx_model).graph
    shapes = {v.name: [d.dim_value or d.dim_param for d in v.type.tensor_type.shape.dim] for v in graph.value_info}
    attn = [n for n in graph.node if n.op_type == "Attention"]
    assert len(attn) == layers
    kv_heads = model.config.num_key_value_heads
    producers = {o: n.op_type for n in graph.node for o in n.output}
    for n in attn:
        assert producers[n.input[1]] != "Reshape" and producers[n.input[2]] != "Reshape"
        if n.input[2] in shapes:
            assert shapes[n.input[2]][1] == kv_heads
    assert "Expand" not in {producers.get(i) for n in attn for i in n.input[1:3]}
    _equal_on_and_off(gm, run, "llama")


def test_layer_norm_models_get_no_rms_fusion():
    """Must-not-fire: gpt2's LayerNorm (mean subtracted) is no RMSNorm, its learned positions no rotary embedding;
    its output stays equal."""
    model, gm, run = _compiled("gpt2")
    ops = _ops(run)
    assert run.fusions["rms_norm"] == run.fusions["skip_rms_norm"] == run.fusions["rotary"] == 0
    assert not set(ops) & {"SimplifiedLayerNormalization", "SkipSimplifiedLayerNormalization", "RotaryEmbedding"}, ops
    assert not any("shared_kv_heads" in n for n in run.notes), run.notes  # no repeat at all: nothing to report
    _equal_on_and_off(gm, run, "gpt2")


def test_without_fusions_the_norms_stay_unfused():
    """`fusions=()` lowers the same graph without rewrites (what bench/onnx_fusions.py compares against)."""
    model, gm, run = _compiled("llama", fusions=())
    ops = _ops(run)
    assert run.fusions == {}
    assert not set(ops) & {"SimplifiedLayerNormalization", "SkipSimplifiedLayerNormalization"}, ops
    assert ops["ReduceMean"] == _rms_norms(model)


def test_unknown_fusion_is_refused():
    with pytest.raises(BackendError, match="unknown ONNX fusion.*'flash'.*supported: shared_kv_heads"):
        onnx_fusions.fuse_(ir.Model(ir.Graph([], [], nodes=[]), ir_version=10), fusions=("flash",))


def _repeat_graph(rep_axis_shape: list) -> ir.Model:
    """Attention(q, Reshape(Expand(Unsqueeze(k, 2), shape)), same for v) with q [1, 4, 3, 8], k/v [1, 2, 3, 8]."""
    q = ir.Value(name="q", shape=ir.Shape([1, 4, 3, 8]), type=ir.TensorType(ir.DataType.FLOAT))
    k = ir.Value(name="k", shape=ir.Shape([1, 2, 3, 8]), type=ir.TensorType(ir.DataType.FLOAT))
    axes = ir.Value(name="axes", const_value=ir.tensor(np.array([2], np.int64)))
    nodes, reps = [], []
    for tag in "kv":
        u = ir.node("Unsqueeze", [k, axes], num_outputs=1)
        u.outputs[0].shape = ir.Shape([1, 2, 1, 3, 8])
        e_shape = ir.Value(name=f"e_{tag}", const_value=ir.tensor(np.array(rep_axis_shape, np.int64)))
        e = ir.node("Expand", [u.outputs[0], e_shape], num_outputs=1)
        e.outputs[0].shape = ir.Shape(rep_axis_shape)
        r_shape = ir.Value(name=f"r_{tag}", const_value=ir.tensor(np.array([1, 4, 3, 8], np.int64)))
        r = ir.node("Reshape", [e.outputs[0], r_shape], num_outputs=1)
        r.outputs[0].shape = ir.Shape([1, 4, 3, 8])
        nodes += [u, e, r]
        reps.append(r.outputs[0])
    attn = ir.node("Attention", [q, *reps], num_outputs=1, name="attn")
    attn.outputs[0].name, attn.outputs[0].type = "y", ir.TensorType(ir.DataType.FLOAT)
    graph = ir.Graph([q, k], attn.outputs, nodes=[*nodes, attn], opset_imports={"": 23},
                     initializers=[axes] + [n.inputs[1] for n in nodes if n.op_type != "Unsqueeze"])
    return ir.Model(graph, ir_version=10)


def test_head_repeat_is_recognised_by_shape_only_when_it_is_one():
    """The K/V head repeat is dropped for [B, kv, rep, S, H] -> [B, kv*rep, S, H]; an Expand that broadcasts
    another axis (here the sequence: [1, 2, 2, 3, 8] vs a [1, 2, 1, 3, 8] source is a repeat, [1, 2, 2, 6, 8]
    reshaped to 4 heads of 3 positions is not) is left in place with a reason."""
    good = _repeat_graph([1, 2, 2, 3, 8])
    res = onnx_fusions.fuse_(good, fusions=("shared_kv_heads",))
    assert res.counts == {"shared_kv_heads": 1}
    assert [n.op_type for n in good.graph] == ["Attention"]
    bad = _repeat_graph([1, 2, 2, 3, 8])
    for n in bad.graph:  # make the Expand's output claim a different sequence length
        if n.op_type == "Expand":
            n.outputs[0].shape = ir.Shape([1, 2, 2, 6, 8])
    res = onnx_fusions.fuse_(bad, fusions=("shared_kv_heads",))
    assert res.counts == {"shared_kv_heads": 0}
    assert any("not a head repeat" in note for note in res.notes), res.notes
    assert [n.op_type for n in bad.graph].count("Expand") == 2


def test_head_repeat_rewrite_runs_on_onnx_runtime():
    """The rewritten one-node graph runs on ONNX Runtime and equals the repeated-heads reference (numpy)."""
    model = _repeat_graph([1, 2, 2, 3, 8])
    onnx_fusions.fuse_(model, fusions=("shared_kv_heads",))
    sess = ort.InferenceSession(ir.serde.serialize_model(model).SerializeToString(),
                                providers=["CPUExecutionProvider"])
    rng = np.random.default_rng(0)
    q = rng.standard_normal((1, 4, 3, 8), dtype=np.float32)
    k = rng.standard_normal((1, 2, 3, 8), dtype=np.float32)
    (y,) = sess.run(None, {"q": q, "k": k})
    kk = np.repeat(k, 2, axis=1)  # heads 0, 0, 1, 1: adjacent repeats
    s = q @ kk.transpose(0, 1, 3, 2) / np.sqrt(8)
    p = np.exp(s - s.max(-1, keepdims=True))
    np.testing.assert_allclose(y, (p / p.sum(-1, keepdims=True)) @ kk, atol=ONNX_VS_EAGER, rtol=0)


class _IntScale(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.w = torch.nn.Parameter(torch.randn(5, 3, generator=torch.Generator().manual_seed(0)))

    def forward(self, ids, x):
        return (x + ids * 0.5) @ self.w


def test_type_promotion_pass_runs_only_where_needed():
    """The exporter's type-promotion pass is skipped when no op mixes dtypes (every zoo dense graph), and kept
    where one does (int64 ids times 0.5): that graph still lowers directly and equals eager."""
    _, gm, _ = _compiled("llama", fusions=())
    tensors = [n.target for n in gm.graph.nodes if n.op == "placeholder" and isinstance(n.meta.get("val"), torch.Tensor)]
    assert not onnx_program._promotion_needed(onnx_program.exported_program(gm, tensors).graph_module)
    ids = torch.randint(0, 9, (2, 4, 5), generator=torch.Generator().manual_seed(1))
    x = torch.randn(2, 4, 5, generator=torch.Generator().manual_seed(2))
    gm = capture(_IntScale(), (ids, x))
    assert onnx_program._promotion_needed(onnx_program.exported_program(gm, ["ids", "x"]).graph_module)
    run = onnx_backend.prepare(gm, {"ids": ids, "x": x})
    assert run.export_path == "direct"
    ids2 = torch.randint(0, 9, (3, 2, 5), generator=torch.Generator().manual_seed(3))
    x2 = torch.randn(3, 2, 5, generator=torch.Generator().manual_seed(4))
    torch.testing.assert_close(run(ids=ids2, x=x2), _IntScale()(ids2, x2).detach(), atol=ONNX_VS_EAGER, rtol=0)


def _rotary_graph(table_batch: str) -> onnx.ModelProto:
    """x * cos + rotate_half(x) * sin on x [B, 2, S, 8] with the angle table f [table_batch, S, 4] an input."""
    from onnx import TensorProto, helper, numpy_helper
    ints = {"one": [1], "zero": [0], "half": [4], "end": [1 << 30], "last": [3]}
    inits = [numpy_helper.from_array(np.array(v, np.int64), name) for name, v in ints.items()]
    nodes = [helper.make_node("Concat", ["f", "f"], ["ff"], axis=-1),
             helper.make_node("Cos", ["ff"], ["c"]), helper.make_node("Sin", ["ff"], ["s"]),
             helper.make_node("Unsqueeze", ["c", "one"], ["cu"]), helper.make_node("Unsqueeze", ["s", "one"], ["su"]),
             helper.make_node("Slice", ["x", "zero", "half", "last", "one"], ["x1"]),
             helper.make_node("Slice", ["x", "half", "end", "last", "one"], ["x2"]),
             helper.make_node("Neg", ["x2"], ["nx2"]), helper.make_node("Concat", ["nx2", "x1"], ["rot"], axis=-1),
             helper.make_node("Mul", ["x", "cu"], ["m1"]), helper.make_node("Mul", ["rot", "su"], ["m2"]),
             helper.make_node("Add", ["m1", "m2"], ["y"]), helper.make_node("Identity", ["y"], ["out"])]
    graph = helper.make_graph(
        nodes, "rotary", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["B", 2, "S", 8]),
                          helper.make_tensor_value_info("f", TensorProto.FLOAT, [table_batch, "S", 4])],
        [helper.make_tensor_value_info("out", TensorProto.FLOAT, ["B", 2, "S", 8])], initializer=inits)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)])


def test_rotary_with_per_row_angle_tables():
    """An angle table with one row block per batch row (per-row position_ids: generation with left padding) fuses
    into RotaryEmbedding over the flattened table and equals the unfused graph; a table whose batch dim is not
    provably the input's (another symbol) is left alone and said so (no silently wrong broadcast)."""
    g = np.random.default_rng(0)
    x = g.standard_normal((2, 2, 5, 8)).astype(np.float32)
    f = (g.standard_normal((2, 5, 4)) * 3).astype(np.float32)        # two rows, different angles
    proto = _rotary_graph("B")
    expected = ort.InferenceSession(proto.SerializeToString()).run(None, {"x": x, "f": f})[0]
    model = ir.from_proto(proto)
    result = onnx_fusions.fuse_(model, fusions=("rotary",))
    assert result.counts == {"rotary": 1}, result.notes
    fused = ir.to_proto(model)
    assert [n.op_type for n in fused.graph.node].count("RotaryEmbedding") == 1
    assert not {"Neg", "Slice"} & {n.op_type for n in fused.graph.node}
    for level in (ort.GraphOptimizationLevel.ORT_ENABLE_ALL, ort.GraphOptimizationLevel.ORT_DISABLE_ALL):
        so = ort.SessionOptions()
        so.graph_optimization_level = level
        got = ort.InferenceSession(fused.SerializeToString(), so).run(None, {"x": x, "f": f})[0]
        np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-5)
    other = ir.from_proto(_rotary_graph("Bf"))
    result = onnx_fusions.fuse_(other, fusions=("rotary",))
    assert result.counts == {"rotary": 0}
    assert any("angle table batch" in n for n in result.notes), result.notes


def _min_max_relu_model() -> ir.Model:
    """Relu(Max(Min(x, 6), 0)) then two Casts: onnxscript's rules turn Min + Max into a Clip, and fold the Relu
    into that Clip, an op the model did not have before the first rewrite."""
    from onnx import TensorProto, helper, numpy_helper
    inits = [numpy_helper.from_array(np.array(v, np.float32), n) for n, v in (("lo", 0.0), ("hi", 6.0))]
    nodes = [helper.make_node("Min", ["x", "hi"], ["a"]), helper.make_node("Max", ["a", "lo"], ["b"]),
             helper.make_node("Relu", ["b"], ["c"]),
             helper.make_node("Cast", ["c"], ["d"], to=TensorProto.DOUBLE),
             helper.make_node("Cast", ["d"], ["e"], to=TensorProto.FLOAT), helper.make_node("Identity", ["e"], ["out"])]
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["B", 4])],
                              [helper.make_tensor_value_info("out", TensorProto.FLOAT, ["B", 4])], initializer=inits)
    return ir.serde.deserialize_model(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)]))


def test_rewrite_rules_that_cannot_match_are_left_out_with_the_same_result(monkeypatch):
    """optimize_ runs only the default rules whose pattern ops all occur in the model (read again at each step):
    the model comes out as with every rule, including a rewrite that needs an op an earlier rewrite made."""
    from onnxscript import rewriter
    model = _min_max_relu_model()
    rules = onnx_fusions._default_rules()
    kept = onnx_fusions._RewriteRulesThatCanMatch(rules).rules_for(model)
    assert 0 < len(kept) < len(rules)      # the convolution, dropout, scatter... rules are left out
    onnx_fusions.optimize_(model)
    filtered = [n.op_type for n in model.graph]
    monkeypatch.setattr(onnx_fusions, "_RewriteRulesThatCanMatch", lambda rules: rewriter.RewritePass(rules))
    every = _min_max_relu_model()
    onnx_fusions.optimize_(every)
    assert filtered == [n.op_type for n in every.graph]
    assert "Clip" in filtered and not {"Min", "Max", "Relu"} & set(filtered)
    x = np.array([[-1.0, 2.0, 7.0, 0.5]], np.float32)
    sess = ort.InferenceSession(ir.serde.serialize_model(model).SerializeToString())
    np.testing.assert_array_equal(sess.run(None, {"x": x})[0], np.clip(x, 0, 6))


def test_nodes_with_own_lowerings_format_once_during_the_export():
    """The exporter labels every ONNX node a routed FFN emits with the fx node's text: inside `_format_once` that
    text is computed once per node (and equal to it), and afterwards the nodes format as before."""
    gm = capture(_IntScale(), (torch.zeros(2, 3, 5, dtype=torch.long), torch.randn(2, 3, 5)))
    nodes = [n for n in gm.graph.nodes if n.op == "call_function"]
    texts = [n.format_node() for n in nodes]
    target = nodes[0].target
    with onnx_program._format_once(gm.graph, {target}):
        for n, text in zip(nodes, texts):
            assert n.format_node() == text
            assert ("format_node" in vars(n)) == (n.target == target)
    assert not any("format_node" in vars(n) for n in nodes)
    assert [n.format_node() for n in nodes] == texts
