"""Which ONNX opset the backend exports at: 23 where the installed ONNX Runtime runs opset 23's fused `Attention`
on the CPU, else the exporter's default.

At opset 23 torch's exporter lowers `scaled_dot_product_attention` to one `Attention` node (ORT's CPU kernel)
instead of MatMul / Softmax / MatMul with a NaN guard (`Where(IsNaN(p), 0, p)` over every [heads, S, S]
probability tensor). The probe builds a one-node Attention model with a boolean mask, runs it once and compares
it with numpy; any failure (an older ORT, a missing kernel, a wrong result) means the default opset.
"""
from __future__ import annotations

import functools

import numpy as np

__all__ = ["FUSED_OPSET", "export_opset"]

FUSED_OPSET = 23


@functools.lru_cache(maxsize=None)
def export_opset() -> int | None:
    """FUSED_OPSET when ONNX Runtime runs its Attention correctly, else None (the exporter's default opset)."""
    try:
        import onnxruntime as ort
        from onnx import TensorProto, helper

        b, h, s, e = 1, 2, 3, 4
        shape = [b, h, s, e]
        node = helper.make_node("Attention", ["q", "k", "v", "m"], ["y"])
        graph = helper.make_graph(
            [node], "probe",
            [helper.make_tensor_value_info(n, TensorProto.FLOAT, shape) for n in "qkv"]
            + [helper.make_tensor_value_info("m", TensorProto.BOOL, [s, s])],
            [helper.make_tensor_value_info("y", TensorProto.FLOAT, shape)])
        # IR version 11 (opset 23's): onnx 1.23 writes 14 by default, which ONNX Runtime 1.30 refuses to load
        model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", FUSED_OPSET)], ir_version=11)
        so = ort.SessionOptions()
        so.log_severity_level = 3
        sess = ort.InferenceSession(model.SerializeToString(), sess_options=so, providers=["CPUExecutionProvider"])
        rng = np.random.default_rng(0)
        q, k, v = (rng.standard_normal(shape).astype(np.float32) for _ in range(3))
        mask = np.tril(np.ones((s, s), dtype=bool))
        (y,) = sess.run(None, {"q": q, "k": k, "v": v, "m": mask})
        scores = q @ k.transpose(0, 1, 3, 2) / np.sqrt(e)
        scores = np.where(mask, scores, -np.inf)
        p = np.exp(scores - scores.max(-1, keepdims=True))
        ref = (p / p.sum(-1, keepdims=True)) @ v
        return FUSED_OPSET if np.allclose(y, ref, atol=1e-5) else None
    except Exception:  # any failure to build, load or run the probe: export at the default opset
        return None
