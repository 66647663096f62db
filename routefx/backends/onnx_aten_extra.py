"""ONNX lowerings of ATen ops that torch's exporter registry lacks but Hugging Face graphs carry.

An op without a registered translation sends the whole graph through the exporter's decomposition path (a
re-trace plus a fake-tensor run of every node, most of an export's time; `onnx_program`). transformers' mask code
computes `torch.diff` of the position ids (packed-sequence detection) in every padded or position-id batch, so
`aten.diff` alone did that for most Hugging Face models; `aten.square` (BitNet's, DeepSeek-V4's norms), the
binary `aten.min` / `aten.max` (CPM-Ant) and `aten.eye` (Bailing-hybrid's linear attention) did it for others.
`aten._is_all_true` is a model's own check (`torch._check((x == y).all())`; ProphetNet's decode step) whose result
feeds a runtime assertion; it had no translation at all.
"""
from __future__ import annotations

import numpy as np
import onnx_ir as ir
import torch
from onnxscript import opset18 as op
from onnxscript.function_libs.torch_lib.ops import common as common_ops

__all__ = ["aten_extra_lowerings"]


def _diff(x, n: int = 1, dim: int = -1, prepend=None, append=None):
    """torch.diff: out[i] = x[i + 1] - x[i] along `dim` (xor for bool), `n` times, on prepend ++ x ++ append."""
    parts = [p for p in (prepend, x, append) if p is not None]
    y = parts[0] if len(parts) == 1 else op.Concat(*parts, axis=dim)
    one, zero = (op.Constant(value=ir.tensor(np.array([v], dtype=np.int64))) for v in (1, 0))
    big, minus = (op.Constant(value=ir.tensor(np.array([v], dtype=np.int64))) for v in (2**62, -1))
    axes = op.Constant(value=ir.tensor(np.array([dim], dtype=np.int64)))
    for _ in range(n):
        later, earlier = op.Slice(y, one, big, axes), op.Slice(y, zero, minus, axes)
        y = op.Xor(later, earlier) if x.dtype == ir.DataType.BOOL else op.Sub(later, earlier)
    return y


def _square(x):
    return op.Mul(x, x)


def _minimum(x, other):
    return op.Min(x, other)


def _maximum(x, other):
    return op.Max(x, other)


def _is_all_true(x):
    """torch's all() of a bool tensor as a 0-d bool: the minimum of its values as int32 (1 for an empty one)."""
    return op.Cast(op.ReduceMin(op.Cast(x, to=ir.DataType.INT32), keepdims=0), to=ir.DataType.BOOL)


def _eye(n, dtype=-1, layout="", device="", pin_memory=False):
    return _eye_m(n, n, dtype)


def _eye_m(n, m, dtype=-1, layout="", device="", pin_memory=False):
    """torch.eye(n, m): EyeLike of an [n, m] zero tensor (n, m ints or symbolic sizes), in float32 (ONNX
    Runtime's EyeLike has no bool or half kernel) cast to `dtype`."""
    dtype = ir.DataType.FLOAT if dtype in (None, -1) else ir.DataType(dtype)
    zero = op.Constant(value=ir.tensor(np.array(0.0, dtype=np.float32)))
    eye = op.EyeLike(op.Expand(zero, common_ops.merge_dims([n, m])))
    return eye if dtype == ir.DataType.FLOAT else op.Cast(eye, to=dtype)


def aten_extra_lowerings() -> dict:
    return {torch.ops.aten.diff.default: _diff, torch.ops.aten.square.default: _square,
            torch.ops.aten.min.other: _minimum, torch.ops.aten.max.other: _maximum,
            torch.ops.aten.eye.default: _eye, torch.ops.aten.eye.m: _eye_m,
            torch.ops.aten._is_all_true.default: _is_all_true}
