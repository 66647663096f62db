"""The ONNX lowering's un-permute (a Gather by the inverse permutation, the gate-weighted sum over the K slots, no
ScatterND) on a compiled Mixtral model and on a top-1 gated layer with a skip route: structure, and values against
the eager backend on a left-padded batch of 2,048 tokens with ONNX Runtime on 2 threads, its graph optimizations on
and off, repeated runs (ONNX Runtime's multi-threaded ScatterND once lost updates only at such sizes)."""
from __future__ import annotations

import functools

import onnx
import pytest
import torch
from torch import nn

import routefx
from routefx.backends import onnx as onnx_backend
from routefx.ir import capture
from routefx.ir import graph_utils as gu
from routefx.policies import Dense
from tests.backends.routed_models import D, ROUTED_FFN, stack_input
from tests.compare import assert_close_nonpad
from tests.conftest import captured
from tests.tolerances import EXACT_REWRITE, ONNX_VS_EAGER
from tests.zoo import ZOO, example_inputs


class _two_threads:
    """ONNX Runtime's intra-op pool takes torch's thread count when a session is made."""

    def __enter__(self):
        self.before = torch.get_num_threads()
        torch.set_num_threads(2)

    def __exit__(self, *exc):
        torch.set_num_threads(self.before)


def _ops(run) -> list[str]:
    return [n.op_type for n in onnx.load_from_string(run.onnx_model).graph.node]


@functools.lru_cache(maxsize=None)
def _mixtral():
    """(HF model, compiled graph, ONNX runner on 2 threads) for the zoo's Mixtral compiled with Dense."""
    model, _ = captured("mixtral")
    args, kwargs = example_inputs(ZOO["mixtral"], batch=2, seq=7, left_pad=2, seed=1)
    cm = routefx.compile(model, Dense(), example_inputs=args, example_kwargs=kwargs, backend="eager")
    gm = cm.graph_module
    names = [n.target for n in gm.graph.nodes if n.op == "placeholder"]
    kw = {**dict(zip(names, args)), **kwargs, **gm.meta["routefx"].constant_kwargs}
    with _two_threads():
        run = onnx_backend.prepare(gm, kw)
    return model, cm, run


def test_moe_model_lowers_without_scatter():
    _, cm, run = _mixtral()
    routed = [n for n in cm.graph_module.graph.nodes if gu.is_routed(n)]
    k = ZOO["mixtral"].expect.top_k
    assert len(routed) == 3 and all(gu.val(n.args[1]).shape[-1] == k and n.args[2] is not None for n in routed)
    ops = _ops(run)
    assert not {"ScatterND", "NonZero"} & set(ops), sorted(set(ops))
    # per routed layer: one inverse permutation (ScatterElements on int64 positions, no reduction), and one
    # gate-weighted K-sum as a batched MatMul [T, 1, K] @ [T, K, d]
    model = onnx.load_from_string(run.onnx_model)
    inv = [n for n in model.graph.node if n.op_type == "ScatterElements"]
    assert len(inv) == len(routed)
    assert all(a.s in (b"", b"none") for n in inv for a in n.attribute if a.name == "reduction")
    by_name = {n.name: n.op_type for n in model.graph.node}
    for node in routed:
        assert by_name.get(f"{node.name}/unpermute") == "Gather" and by_name.get(f"{node.name}/combine") == "MatMul"


@pytest.mark.parametrize("level", ["all", "disable"])
def test_moe_model_equals_eager_on_a_padded_batch_of_2048_tokens(level):
    model, cm, run = _mixtral()
    args, kwargs = example_inputs(ZOO["mixtral"], batch=4, seq=512, left_pad=37, seed=11)
    with torch.no_grad():
        ref = cm(*args, **kwargs).logits  # the eager backend: routed_ffn's reference dispatch
        hf = model(*args, **kwargs).logits
    assert_close_nonpad(ref, hf, kwargs["attention_mask"], EXACT_REWRITE)
    with _two_threads():
        run = run.at_level(level)
    names = [n.target for n in cm.graph_module.graph.nodes if n.op == "placeholder"]
    kw = {**dict(zip(names, args)), **kwargs, **cm.graph_module.meta["routefx"].constant_kwargs}
    for _ in range(3):
        out = run(**kw)
        out = out.logits if hasattr(out, "logits") else out[0]
        assert_close_nonpad(out, ref, kwargs["attention_mask"], ONNX_VS_EAGER)


class _TopOneGated(nn.Module):
    """K = 1 with gates (the top route's softmax probability), a skip route and a route no token takes."""
    RANGES = [0, 0, 0, 11, 11, 30, 30, 40]

    def __init__(self):
        super().__init__()
        g = torch.Generator().manual_seed(13)
        self.router = nn.Parameter(torch.randn(4, D, generator=g))
        self.bias = nn.Parameter(torch.tensor([0.0, 0.0, 0.0, -1e4]))  # route 3 never taken
        self.w_up, self.w_gate = (nn.Parameter(torch.randn(40, D, generator=g) * 0.2) for _ in "ug")
        self.w_down = nn.Parameter(torch.randn(D, 40, generator=g) * 0.2)
        self.b_down = nn.Parameter(torch.randn(D, generator=g) * 0.2)

    def forward(self, x):
        gates, routes = torch.softmax(x @ self.router.T + self.bias, dim=-1).max(dim=-1, keepdim=True)  # [B,S,1]
        y = ROUTED_FFN(x, routes, gates, self.w_up, self.w_gate, self.w_down, None, None, self.b_down,
                       self.RANGES, "silu")
        return y, routes


@pytest.mark.parametrize("level", ["all", "disable"])
def test_top_one_gated_with_a_skip_route(level):
    gm = capture(_TopOneGated().eval(), (stack_input(2, 5),))
    with _two_threads():
        run = onnx_backend.prepare(gm, {"x": stack_input(2, 5)}).at_level(level)
    assert not {"ScatterND", "NonZero"} & set(_ops(run))
    for x in (stack_input(8, 256, seed=3), stack_input(1, 1, seed=4), stack_input(3, 7, seed=5)):
        with torch.no_grad():
            ref, routes = gm(x)
        counts = torch.bincount(routes.flatten(), minlength=4).tolist()
        if x.shape[0] * x.shape[1] >= 2048:
            assert counts[0] > 0 and counts[1] > 0 and counts[2] > 0 and counts[3] == 0, counts
            assert (ref[routes[..., 0] == 0] == 0).all()  # a skip token's output is exactly 0 (no b_down)
        for _ in range(2):
            y, r = run(x=x)
            assert torch.equal(r, routes)
            assert (y - ref).abs().max().item() <= ONNX_VS_EAGER


class _OutOfRange(nn.Module):
    """Top-2 gated routes where some slots carry an id outside [0, R) (-1 or R), chosen from the input; with
    `sanitize`, those slots instead take route 0 with gate 0: the same output if invalid ids contribute nothing."""
    RANGES = [0, 10, 10, 20, 20, 30, 30, 40]

    def __init__(self, sanitize: bool):
        super().__init__()
        g = torch.Generator().manual_seed(17)
        self.sanitize = sanitize
        self.router = nn.Parameter(torch.randn(4, D, generator=g))
        self.w_up, self.w_gate = (nn.Parameter(torch.randn(40, D, generator=g) * 0.2) for _ in "ug")
        self.w_down = nn.Parameter(torch.randn(D, 40, generator=g) * 0.2)

    def forward(self, x):
        gates, routes = torch.topk(torch.softmax(x @ self.router.T, dim=-1), 2, dim=-1)  # [B, S, 2]
        bad = x[..., :2] > 0.8  # [B, S, 2]
        if self.sanitize:
            routes, gates = torch.where(bad, 0, routes), torch.where(bad, 0.0, gates)
        else:
            routes = torch.where(bad, torch.where(x[..., 2:4] > 0, -1, 4), routes)
        return ROUTED_FFN(x, routes, gates, self.w_up, self.w_gate, self.w_down, None, None, None, self.RANGES,
                          "silu")


@pytest.mark.parametrize("level", ["all", "disable"])
def test_route_ids_outside_the_routes_contribute_nothing(level):
    """The module docstring's promise for ids the reference refuses: negative ids (sorted before route 0) and ids
    >= R (sorted last) are in no route's run."""
    x = stack_input(4, 64, seed=19)
    gm = capture(_OutOfRange(sanitize=False).eval(), (stack_input(2, 5),))
    run = onnx_backend.prepare(gm, {"x": stack_input(2, 5)}).at_level(level)
    bad = x[..., :2] > 0.8
    ids = torch.where(x[..., 2:4] > 0, -1, 4)[bad]
    assert (ids == -1).sum() > 10 and (ids == 4).sum() > 10  # both kinds of invalid id occur
    with torch.no_grad():
        ref = _OutOfRange(sanitize=True).eval()(x)
    assert (run(x=x) - ref).abs().max().item() <= ONNX_VS_EAGER
