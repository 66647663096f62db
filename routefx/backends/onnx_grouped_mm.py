"""ONNX lowering of grouped expert GEMMs left in the graph (`aten._grouped_mm`, `transformers.grouped_mm_fallback`).

Hugging Face's MoE experts (transformers 5) sort the token-expert assignments by expert and run one grouped GEMM,
`out[r] = a[r] @ b[g(r)]` for a: [M, K], b: [G, K, N] and offs: [G] the cumulative row ends per expert. Where
RaiseMoE turns a block into `routed_ffn` this op is gone; where it cannot read the block (an activation it does not
know, a clamped SwiGLU with biases, experts of another layout) the block stays as captured and its grouped GEMMs
need an ONNX translation, which torchlib lacks. G is static, so the lowering is one contiguous row `Slice` and one
`MatMul` per expert, concatenated in row order; rows past offs[-1] are zeros (as in transformers' fallback). The
weight's per-expert `Gather`s have constant inputs, so ONNX Runtime folds them into pre-packed initializers at
session creation.

Only that form is lowered (2-D a, 3-D b, offs given); the others raise `BackendError` naming what was found.
"""
from __future__ import annotations

import numpy as np
import onnx_ir as ir
import torch
from onnxscript import opset18 as op

from routefx.errors import BackendError

__all__ = ["grouped_mm_lowerings"]


def _dtype_of(out_dtype) -> ir.DataType | None:
    if out_dtype is None:
        return None
    if isinstance(out_dtype, torch.dtype):
        return ir.DataType(_TORCH_TO_ONNX[out_dtype])
    return ir.DataType(int(out_dtype))  # the exporter hands dtypes over as ONNX enum values


_TORCH_TO_ONNX = {torch.float32: 1, torch.float16: 10, torch.bfloat16: 16, torch.float64: 11}


def _grouped_mm(mat_a, mat_b, offs=None, bias=None, out_dtype=None):
    shape_a, shape_b = mat_a.shape, mat_b.shape
    if offs is None or shape_a is None or shape_b is None or len(shape_a) != 2 or len(shape_b) != 3:
        raise BackendError(f"grouped GEMM of a {shape_a} by b {shape_b} (offs {'absent' if offs is None else 'given'})"
                           " has no ONNX lowering; supported: a [M, K] rows sorted by group, b [G, K, N], offs [G]")
    groups = shape_b[0]
    if not isinstance(groups, int) or groups < 1:
        raise BackendError(f"grouped GEMM: the number of groups (b's dim 0) must be static, found {groups}")
    n_out = shape_b[2]
    ends = op.Cast(offs, to=ir.DataType.INT64)
    start = op.Constant(value=ir.tensor(np.array([0], dtype=np.int64)))
    outs = []
    for g in range(groups):
        index = op.Constant(value=ir.tensor(np.array(g, dtype=np.int64)))
        end = op.Gather(ends, op.Constant(value=ir.tensor(np.array([g], dtype=np.int64))), axis=0)  # [1]
        rows = op.Slice(mat_a, start, end, [0])  # [n_g, K]: a contiguous run, no index copy
        y = op.MatMul(rows, op.Gather(mat_b, index, axis=0))  # [n_g, N]
        if bias is not None:
            y = op.Add(y, op.Gather(bias, index, axis=0))
        outs.append(y)
        start = end
    # rows past the last group's end (none in transformers' experts) are zeros, so the output keeps a's M rows
    rest = op.Concat(op.Sub(op.Shape(mat_a, start=0, end=1), start),
                     op.Constant(value=ir.tensor(np.array([n_out], dtype=np.int64))), axis=0)
    dtype = mat_a.dtype.numpy() if mat_a.dtype is not None else np.float32
    outs.append(op.ConstantOfShape(rest, value=ir.tensor(np.zeros(1, dtype=dtype))))
    y = op.Concat(*outs, axis=0)
    target = _dtype_of(out_dtype)
    return y if target is None or target == mat_a.dtype else op.Cast(y, to=target)


def _fallback(input, weight, offs):  # noqa: A002 - transformers' argument names
    return _grouped_mm(input, weight, offs)


def grouped_mm_lowerings() -> dict:
    """{torch op: ONNX translation} for the grouped-GEMM ops this torch / transformers has registered."""
    table = {}
    if hasattr(torch.ops.aten, "_grouped_mm"):
        table[torch.ops.aten._grouped_mm.default] = _grouped_mm
    try:
        table[torch.ops.transformers.grouped_mm_fallback.default] = _fallback
    except (AttributeError, RuntimeError):  # transformers' MoE integration not loaded / an older transformers
        pass
    return table
