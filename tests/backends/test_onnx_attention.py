"""`routefx.backends.onnx_attention`: an ONNX Attention node runs on GroupQueryAttention exactly when its mask is
the causal triangle over equal lengths, and on the exported node otherwise, with the same result either way.

Hand-built one-node graphs, checked against a numpy attention; which kernel ran is read from ONNX Runtime's
profiler, so a check that always took one branch would fail here. The zoo models (with and without padding, and
with sliding-window layers) are compared with eager in test_onnx.py and below."""
from __future__ import annotations

import json
import os
import tempfile

import numpy as np
import onnx_ir as ir
import onnxruntime as ort
import pytest
import torch

import routefx
from routefx.backends import onnx_fusions
from routefx.backends.onnx_opset import export_opset
from tests.compare import assert_close_nonpad, graph_kwargs
from tests.tolerances import ONNX_VS_EAGER
from tests import zoo
from tests.zoo import ZOO, example_inputs

pytestmark = pytest.mark.skipif(export_opset() is None, reason="this ONNX Runtime lacks opset 23's Attention")

HEADS, KV_HEADS, H = 4, 2, 8
_F = ir.TensorType(ir.DataType.FLOAT)


def _model(mask: str, tail: bool) -> ir.Model:
    """Attention(q [B, 4, S, 8], k / v [B, 2, T, 8], mask) with mask "bool" / "float" ([B, 1, S, T]) or "causal"
    (is_causal=1, no mask); with `tail`, its output read through Transpose + Reshape to [B, S, 32]."""
    q = ir.Value(name="q", shape=ir.Shape(["B", HEADS, "S", H]), type=_F)
    k = ir.Value(name="k", shape=ir.Shape(["B", KV_HEADS, "T", H]), type=_F)
    v = ir.Value(name="v", shape=ir.Shape(["B", KV_HEADS, "T", H]), type=_F)
    inputs = [q, k, v]
    if mask != "causal":
        dtype = ir.DataType.BOOL if mask == "bool" else ir.DataType.FLOAT
        inputs.append(ir.Value(name="mask", shape=ir.Shape(["B", 1, "S", "T"]), type=ir.TensorType(dtype)))
    attn = ir.node("Attention", inputs, attributes={"is_causal": int(mask == "causal")}, name="attn")
    out = attn.outputs[0]
    out.dtype, out.shape = ir.DataType.FLOAT, ir.Shape(["B", HEADS, "S", H])
    nodes, inits = [attn], []
    if tail:
        tr = ir.node("Transpose", [out], attributes={"perm": [0, 2, 1, 3]})
        shape = ir.Value(name="shape", const_value=ir.tensor(np.array([0, 0, HEADS * H], np.int64)))
        rs = ir.node("Reshape", [tr.outputs[0], shape])
        out = rs.outputs[0]
        out.dtype, out.shape = ir.DataType.FLOAT, ir.Shape(["B", "S", HEADS * H])
        nodes, inits = nodes + [tr, rs], [shape]
    out.name = "y"
    graph = ir.Graph(inputs, [out], nodes=nodes, initializers=inits, opset_imports={"": 23})
    return ir.Model(graph, ir_version=10)


def _session(model: ir.Model, tmp: str) -> ort.InferenceSession:
    so = ort.SessionOptions()
    so.enable_profiling, so.profile_file_prefix = True, os.path.join(tmp, "p")
    so.intra_op_num_threads = 2
    return ort.InferenceSession(ir.serde.serialize_model(model).SerializeToString(), so,
                                providers=["CPUExecutionProvider"])


def _run(model: ir.Model, feeds: dict) -> tuple[np.ndarray, set]:
    """(output, op types of the kernels that ran)."""
    with tempfile.TemporaryDirectory() as tmp:
        s = _session(model, tmp)
        y = s.run(None, feeds)[0]
        with open(s.end_profiling()) as f:
            events = json.load(f)
    ran = {e["args"]["op_name"] for e in events if e.get("cat") == "Node" and "op_name" in e.get("args", {})}
    return y, ran


def _reference(q, k, v, allowed) -> np.ndarray:
    """float64 attention; allowed [B, 1, S, T] bool; rows with nothing allowed are left 0."""
    rep = HEADS // KV_HEADS
    k, v = np.repeat(k, rep, axis=1).astype(np.float64), np.repeat(v, rep, axis=1).astype(np.float64)
    s = q.astype(np.float64) @ k.transpose(0, 1, 3, 2) / np.sqrt(H)
    s = np.where(allowed, s, -np.inf)
    m = np.max(s, axis=-1, keepdims=True)
    p = np.where(allowed, np.exp(s - np.where(np.isfinite(m), m, 0)), 0.0)
    return p @ v / np.maximum(p.sum(-1, keepdims=True), 1e-300)


def _inputs(b=2, s=6, t=6, seed=0):
    rng = np.random.default_rng(seed)
    return (rng.standard_normal((b, HEADS, s, H), dtype=np.float32),
            rng.standard_normal((b, KV_HEADS, t, H), dtype=np.float32),
            rng.standard_normal((b, KV_HEADS, t, H), dtype=np.float32))


def _causal(b, s, t) -> np.ndarray:
    return np.broadcast_to(np.tril(np.ones((s, t), bool), t - s), (b, 1, s, t)).copy()


def _fused(mask: str, tail: bool) -> ir.Model:
    model = _model(mask, tail)
    result = onnx_fusions.fuse_(model, fusions=("causal_gqa",))
    assert result.counts == {"causal_gqa": 1}, result.notes
    assert [n.op_type for n in model.graph if n.op_type in ("Attention", "If")] == ["If"]
    return model


def _as_output(y: np.ndarray, tail: bool) -> np.ndarray:
    return y.transpose(0, 2, 1, 3).reshape(y.shape[0], y.shape[2], -1) if tail else y


@pytest.mark.parametrize("tail", [False, True])
@pytest.mark.parametrize("kind", ["bool", "float_inf", "float_min"])
def test_causal_mask_takes_gqa_and_other_masks_do_not(kind, tail):
    q, k, v = _inputs()
    model = _fused("bool" if kind == "bool" else "float", tail)
    causal = _causal(2, 6, 6)
    padded = causal.copy()
    padded[0, :, :, :2] = False          # row 0 left-padded by two positions
    biased = np.where(causal, 0.0, -np.inf).astype(np.float32)
    biased[1, 0, 3, 1] = -0.5            # an additive bias that is no mask
    for allowed, expect_gqa in ((causal, True), (padded, False), (None, False)):
        if kind == "bool":
            if allowed is None:
                continue
            m = allowed
        else:
            fill = -np.inf if kind == "float_inf" else np.finfo(np.float32).min
            m = biased if allowed is None else np.where(allowed, 0.0, fill).astype(np.float32)
        y, ran = _run(model, {"q": q, "k": k, "v": v, "mask": m})
        assert ("GroupQueryAttention" in ran) is expect_gqa and ("Attention" in ran) is not expect_gqa, ran
        if allowed is None:   # the biased float mask: compare with the unfused node
            ref, _ = _run(_model("float", tail), {"q": q, "k": k, "v": v, "mask": m})
            np.testing.assert_allclose(y, ref, atol=1e-5)
            continue
        ref = _as_output(_reference(q, k, v, allowed), tail)
        live = allowed.any(-1)[:, 0]     # [B, S]: query rows with some key (padding rows are undefined)
        sel = live if tail else np.broadcast_to(live[:, None], (2, HEADS, 6))
        np.testing.assert_allclose(y[sel], ref[sel], atol=1e-5)


def test_is_causal_without_mask_and_unequal_lengths():
    """is_causal=1 without a mask takes GroupQueryAttention over equal lengths; a query shorter than the keys
    (a cached step) runs the exported node, equal to the unfused graph."""
    model = _fused("causal", tail=True)
    q, k, v = _inputs()
    y, ran = _run(model, {"q": q, "k": k, "v": v})
    assert "GroupQueryAttention" in ran and "Attention" not in ran
    np.testing.assert_allclose(y, _as_output(_reference(q, k, v, _causal(2, 6, 6)), True), atol=1e-5)
    q, k, v = _inputs(s=2, t=5, seed=1)
    y, ran = _run(model, {"q": q, "k": k, "v": v})
    assert "GroupQueryAttention" not in ran and "Attention" in ran
    ref, _ = _run(_model("causal", True), {"q": q, "k": k, "v": v})
    np.testing.assert_allclose(y, ref, atol=1e-6)


def test_a_causal_mask_over_a_longer_key_is_not_taken():
    """A decode-style mask (one query, all five keys allowed) is causal bottom-right, but GroupQueryAttention is
    only used over equal lengths."""
    model = _fused("bool", tail=False)
    q, k, v = _inputs(s=1, t=5)
    allowed = _causal(2, 1, 5)
    y, ran = _run(model, {"q": q, "k": k, "v": v, "mask": allowed})
    assert "GroupQueryAttention" not in ran
    np.testing.assert_allclose(y, _reference(q, k, v, allowed), atol=1e-5)


def test_nodes_it_cannot_take_are_left_with_a_reason():
    model = _model("bool", tail=False)
    next(n for n in model.graph if n.op_type == "Attention").attributes["softcap"] = ir.AttrFloat32("softcap", 30.0)
    result = onnx_fusions.fuse_(model, fusions=("causal_gqa",))
    assert result.counts == {"causal_gqa": 0}
    assert any("causal_gqa" in n and "softcap" in n for n in result.notes), result.notes


def _head16(name: str) -> torch.nn.Module:
    """The zoo's model with head size 16 (GroupQueryAttention's CPU kernel takes multiples of 8; the zoo's own
    models have odd head sizes on purpose, which keep the exported node)."""
    cfg = getattr(zoo, f"_{name}")()
    cfg.head_dim = 16
    if name != "gemma3":  # head_dim = hidden / heads there
        cfg.hidden_size = 16 * cfg.num_attention_heads
    return zoo._hf(type(ZOO[name].build()), cfg)()


@pytest.mark.parametrize("name", ["gemma3", "exaone4", "llama"])
def test_zoo_models_unpadded_and_padded(name):
    """Without padding, full-attention layers take GroupQueryAttention and sliding-window layers (window 4 < 13
    positions) the exported node; with padding every layer takes the exported node; equal to eager throughout."""
    entry = ZOO[name]
    args, kwargs = example_inputs(entry, batch=2, seq=7)
    cm = routefx.compile(_head16(name), routefx.policies.Dense(), example_inputs=args, example_kwargs=kwargs,
                         backend="onnx")
    assert cm.runner.fusions["causal_gqa"] == entry.expect.blocks, cm.runner.notes
    gm = cm.graph_module
    for pad in (0, 4):
        args, kwargs = example_inputs(entry, batch=3, seq=13, left_pad=pad, seed=5)
        with torch.no_grad():
            ref = gm(**graph_kwargs(gm, args, kwargs))
        assert_close_nonpad(cm(*args, **kwargs), ref, kwargs.get("attention_mask"), ONNX_VS_EAGER)
