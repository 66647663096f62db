"""An ONNX Runtime session from an in-memory `onnx_ir.Model` without serializing its weights.

Serializing a model copies every weight into a protobuf (and ONNX Runtime parses them back out of it): on the
8-layer d=1024 bench model (595 MiB) that copy took longer than the export itself. Instead, `open_session` writes
the graph with every large initializer declared as external data, and hands ONNX Runtime the weights themselves
through `SessionOptions.add_external_initializers` (OrtValues over the tensors' own memory, no copy; ONNX Runtime
never opens the declared location). The weights are written once, by ONNX Runtime's pre-packing.

`Graph` holds what a session needs (the stripped graph bytes, the initializer names and OrtValues, kept alive
as long as the graph); `Graph.session(options)` opens another session on the same weights (another optimization
level) without re-serializing. `serialize(model)` gives the complete model's bytes for whoever asks for a file.
"""
from __future__ import annotations

import dataclasses

import numpy as np
import onnx_ir as ir
import onnxruntime as ort

__all__ = ["Graph", "prepare_graph", "serialize"]

_MIN_EXTERNAL_BYTES = 1024  # smaller initializers stay in the graph (shape constants, scalars)
_PLACEHOLDER = "routefx-in-memory"  # the declared external location; ONNX Runtime never reads it


@dataclasses.dataclass
class Graph:
    graph_bytes: bytes
    names: list[str]
    values: list  # ort.OrtValue per name
    arrays: list  # the numpy arrays the OrtValues view (kept alive with the session)

    def session(self, options: ort.SessionOptions) -> ort.InferenceSession:
        if self.names:
            options.add_external_initializers(self.names, self.values)
        return ort.InferenceSession(self.graph_bytes, sess_options=options, providers=["CPUExecutionProvider"])


def prepare_graph(model: ir.Model) -> Graph:
    """`model` with its large initializers moved out of the graph (see the module docstring). `model` itself
    is left unchanged."""
    names, values, arrays, swapped = [], [], [], []
    for name, v in model.graph.initializers.items():
        t = v.const_value
        if t is None or t.nbytes < _MIN_EXTERNAL_BYTES:
            continue
        array = _numpy(t)
        if array is None:
            continue  # a dtype numpy/ORT cannot share (bf16 via ml_dtypes...): serialized inline
        names.append(name)
        arrays.append(array)
        values.append(ort.OrtValue.ortvalue_from_numpy(array))
        swapped.append((v, t))
        v.const_value = ir.ExternalTensor(_PLACEHOLDER, offset=0, length=t.nbytes, dtype=t.dtype, shape=t.shape,
                                          name=name)
    try:
        graph_bytes = ir.serde.serialize_model(model).SerializeToString()
    finally:
        for v, t in swapped:
            v.const_value = t
    return Graph(graph_bytes, names, values, arrays)


def serialize(model: ir.Model) -> bytes:
    """The complete model, weights inline (protobuf's 2 GiB limit applies)."""
    return ir.serde.serialize_model(model).SerializeToString()


_SHAREABLE = {np.dtype(t) for t in (np.float32, np.float64, np.float16, np.int64, np.int32, np.int16, np.int8,
                                    np.uint8, np.bool_)}


def _numpy(t) -> np.ndarray | None:
    try:
        array = t.numpy()
    except Exception:  # noqa: BLE001 - a tensor type without a numpy view: keep it inline
        return None
    if array.dtype not in _SHAREABLE:
        return None
    if not array.flags.c_contiguous:  # a folded weight transpose is a strided view; torch's tiled copy is ~3x
        import torch                  # faster than numpy's on these [d, F] matrices
        array = torch.from_numpy(array).contiguous().numpy()
    return array
