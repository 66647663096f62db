"""ONNX lowerings of accumulating scatters (`index_add`, `index_put(accumulate=True)`) that ONNX Runtime computes
correctly.

torch's exporter has no translation of `aten.index_add`; its decomposition is `index_put(accumulate=True)`, which
the exporter's registry writes as `ScatterND(reduction="add")`. ONNX Runtime's CPU ScatterND splits the updates
across threads, and updates of one row from two threads race: with repeated indices (a token's K expert outputs
added back to its row, JetMoE's attention experts, any hand-written `out.index_add_(0, token, y)` left as
captured) some updates are lost, differently from call to call (measured: 13 of 30 calls wrong, max error 3.7, on
[512, 1024] updates into 256 rows with 2 threads). ScatterElements(reduction="add") adds them one by one, and
equals numpy's `add.at` on every call; these lowerings write the op that way:

    index_add(x, dim, index, src, alpha)    -> ScatterElements(x, index expanded over src, src * alpha, axis=dim)
    index_put(x, [.., idx, ..], v, True)    -> the same along idx's dim (one integer index, any position)
    index_put(x, [i, j, ..], v, True)       -> leading integer indices flattened to one row index (x viewed as
                                               [rows, ...]), then the same along dim 0

An fp16 / bf16 scatter runs in float32 and is cast back (ONNX Runtime's CPU provider has no half kernel for a
reducing ScatterElements).

Other index_put forms (no accumulation, boolean masks, which select each position once, integer indices apart
or after a skipped dim) keep the exporter's translation.
"""
from __future__ import annotations

import numpy as np
import onnx_ir as ir
import torch
from onnxscript import opset18 as op
from onnxscript.function_libs.torch_lib.ops.core import aten_index_put

__all__ = ["scatter_lowerings"]


def _ints(values) -> ir.Value:
    return op.Constant(value=ir.tensor(np.array(values, dtype=np.int64)))


def _along(index, rank: int, dim: int, like):
    """`index` ([N]) as a tensor of `like`'s shape whose entries along `dim` are the index (ScatterElements' indices
    have the updates' shape)."""
    shape = [1] * rank
    shape[dim] = -1
    return op.Expand(op.Reshape(index, _ints(shape)), op.Shape(like))


_HALF = (ir.DataType.FLOAT16, ir.DataType.BFLOAT16)


def _scatter_add(x, indices, updates, axis: int, dtype):
    """ScatterElements(reduction="add") of x (whose dtype is `dtype`); an fp16 / bf16 one in float32, cast back
    (ONNX Runtime's CPU provider has no half kernel for a reducing ScatterElements: JetMoE in fp16 failed at run
    time)."""
    if dtype in _HALF:
        out = op.ScatterElements(op.Cast(x, to=ir.DataType.FLOAT), indices, op.Cast(updates, to=ir.DataType.FLOAT),
                                 axis=axis, reduction="add")
        return op.Cast(out, to=dtype)
    return op.ScatterElements(x, indices, updates, axis=axis, reduction="add")


def _index_add(x, dim: int, index, source, alpha=1):
    rank = len(x.shape if x.shape is not None else source.shape)
    dim = dim % rank if rank else 0
    if alpha != 1:
        source = op.Mul(source, op.CastLike(op.Constant(value_float=float(alpha)), source))
    if rank == 0:                         # a 0-d x and source (one index)
        return _scatter_add(op.Reshape(x, _ints([1])), op.Reshape(index, _ints([1])),
                            op.Reshape(source, _ints([1])), axis=0, dtype=x.dtype)
    return _scatter_add(x, _along(index, rank, dim, source), source, axis=dim, dtype=x.dtype)


def _integer(index) -> bool:
    return index is not None and index.dtype in (ir.DataType.INT64, ir.DataType.INT32)


def _index_put(x, indices, values, accumulate: bool = False):
    indices = list(indices)
    given = [i for i, t in enumerate(indices) if t is not None]
    if not accumulate or not given or not all(_integer(indices[i]) for i in given) or x.shape is None \
            or any(indices[i].shape is None for i in given) or len(x.shape) == 0:
        return aten_index_put(x, indices, values, accumulate)
    rank = len(x.shape)
    shape = op.Shape(x)
    if len(given) == 1:     # one integer index at dim p: values broadcast to x.shape[:p] + idx.shape + x.shape[p+1:]
        p, idx = given[0], indices[given[0]]
        before, after = op.Slice(shape, _ints([0]), _ints([p])), op.Slice(shape, _ints([p + 1]), _ints([rank]))
        upd = op.Reshape(op.Expand(values, op.Concat(before, op.Shape(idx), after, axis=0)),
                         op.Concat(before, _ints([-1]), after, axis=0))     # idx's dims as one
        return _scatter_add(x, _along(op.Reshape(idx, _ints([-1])), rank, p, upd), upd, axis=p, dtype=x.dtype)
    if given != list(range(len(given))):
        return aten_index_put(x, indices, values, accumulate)   # integer indices apart or after a skipped dim
    # leading integer indices i_0..i_{k-1} (broadcast together): one row index into x viewed as [rows, rest...]
    k = len(given)
    sizes = [op.Slice(shape, _ints([d]), _ints([d + 1])) for d in range(k)]
    row = None
    for d in range(k):
        i = op.Cast(indices[d], to=ir.DataType.INT64)
        i = op.Where(op.Less(i, _ints(0)), op.Add(i, sizes[d]), i)     # torch's negative indices
        row = i if row is None else op.Add(op.Mul(row, sizes[d]), i)
    rest = op.Slice(shape, _ints([k]), _ints([rank]))
    rows = op.Reshape(row, _ints([-1]))
    upd = op.Reshape(op.Expand(values, op.Concat(op.Shape(row), rest, axis=0)), op.Concat(_ints([-1]), rest, axis=0))
    flat_x = op.Reshape(x, op.Concat(_ints([-1]), rest, axis=0))
    out = _scatter_add(flat_x, _along(rows, rank - k + 1, 0, upd), upd, axis=0, dtype=x.dtype)
    return op.Reshape(out, shape)


def scatter_lowerings() -> dict:
    aten = torch.ops.aten
    return {aten.index_add.default: _index_add, aten.index_put.default: _index_put,
            aten._unsafe_index_put.default: _index_put}
