"""Accumulating scatters on the onnx backend (`routefx/backends/onnx_scatter.py`): `index_add` and
`index_put(accumulate=True)` with repeated indices equal torch on every call. The exporter's own translation,
ScatterND(reduction="add"), loses updates in ONNX Runtime's multi-threaded CPU kernel (a different result from
call to call); these run as ScatterElements(reduction="add")."""
import onnx
import torch
from torch import nn

import routefx
from routefx.policies import Dense
from tests.tolerances import ONNX_FP16_VS_EAGER, ONNX_VS_EAGER

T, M, D = 64, 512, 1024


class Scatters(nn.Module):
    """Every form the lowering rewrites, each with many updates per row."""

    def forward(self, x, src, idx, row, col):
        put = torch.ops.aten.index_put.default
        a = torch.zeros_like(x).index_add(0, idx, src)                       # a token's outputs added back
        b = x.t().index_add(1, idx, src.t(), alpha=0.5).t()                  # another dim, alpha
        c = torch.zeros_like(x).index_put((idx,), src, accumulate=True)      # one leading index
        d = put(torch.zeros_like(x), [idx.view(8, -1)], src.view(8, -1, D), True)   # a 2-D index
        e = put(torch.zeros(x.shape[0], 4, D), [row, col - 4], src, True)    # two indices (negative ones too)
        f = put(torch.zeros(3, x.shape[0], D), [None, idx], src, True)       # one index after a full slice
        return a + b + c + d + e.sum(1) + f.sum(0)


def _inputs(seed):
    g = torch.Generator().manual_seed(seed)
    idx = torch.randint(0, T, (M,), generator=g)
    return (torch.randn(T, D, generator=g), torch.randn(M, D, generator=g), idx, idx,
            torch.randint(0, 4, (M,), generator=g))


def test_accumulating_scatters_equal_torch_on_every_call():
    model = Scatters().eval()
    args = _inputs(0)
    threads = torch.get_num_threads()
    torch.set_num_threads(2)          # the session's threads (the race needs two)
    try:
        cm = routefx.compile(model, Dense(), example_inputs=args, backend="onnx")
    finally:
        torch.set_num_threads(threads)
    graph = onnx.load_from_string(cm.runner.onnx_model).graph
    assert not [n for n in graph.node if n.op_type == "ScatterND"
                and any(a.name == "reduction" and a.s == b"add" for a in n.attribute)]
    assert sum(n.op_type == "ScatterElements" for n in graph.node) >= 6
    for seed in range(12):               # repeated calls: a racing kernel differs from call to call
        x = _inputs(seed % 3)
        with torch.no_grad():
            torch.testing.assert_close(cm(*x), model(*x), rtol=0, atol=ONNX_VS_EAGER)


def test_half_precision_scatters_run_in_float32():
    """ONNX Runtime's CPU provider has no fp16 kernel for a reducing ScatterElements (JetMoE in fp16 failed at run
    time): an fp16 scatter runs in float32 and comes back in fp16, equal to torch's fp16 result within its
    rounding (a sum of 8 updates per row: a few ulps)."""
    x, src, idx, row, col = _inputs(1)
    args = (x.half(), src.half(), idx, row, col)
    cm = routefx.compile(_HalfScatters(), Dense(), example_inputs=args, backend="onnx")
    out = cm(*args)
    assert out.dtype == torch.float16
    with torch.no_grad():
        ref = _HalfScatters()(*(a.float() if a.is_floating_point() else a for a in args))
    torch.testing.assert_close(out.float(), ref, rtol=ONNX_FP16_VS_EAGER, atol=ONNX_FP16_VS_EAGER)


class _HalfScatters(nn.Module):
    def forward(self, x, src, idx, row, col):
        a = torch.zeros_like(x).index_add(0, idx, src)
        c = torch.zeros_like(x).index_put((idx,), src, accumulate=True)
        return a + c
