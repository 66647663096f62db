"""The ONNX lowering of `routefx::routed_ffn` on hand-built graphs (no routing pass involved): outputs and route
ids against eager, per-route MatMul row counts from ONNX Runtime's profiler, input errors, export errors."""
from __future__ import annotations

import functools
import json
import re

import onnx
import onnx.numpy_helper
import pytest
import torch
from torch import nn

import routefx
from routefx.backends import get_backend
from routefx.backends import onnx as onnx_backend
from routefx.ir import capture
from tests.backends.routed_models import D, F, LAYERS, ROUTED_FFN, RoutedStack, stack_input
from tests.tolerances import ONNX_VS_EAGER


@functools.lru_cache(maxsize=None)
def _stack():
    """(graph, runner with the profiler on) for `RoutedStack`, captured at batch 2, length 5."""
    x = stack_input(2, 5)
    gm = capture(RoutedStack().eval(), (x,))
    return gm, onnx_backend.prepare(gm, {"x": x}, profile=True)


def _eager(gm, x):
    with torch.no_grad():
        return gm(x)


# (batch, length): unlike the export example, including a single token; ORT with its graph optimizations on
# (the backend's default) and off, so that no fusion hides a wrong lowering
@pytest.mark.parametrize("level", ["all", "disable"])
@pytest.mark.parametrize("batch,seq", [(3, 11), (1, 1), (4, 2)])
def test_routed_stack_equals_eager(batch, seq, level):
    gm, run = _stack()
    run = run if level == "all" else run.at_level(level)
    x = stack_input(batch, seq, seed=batch * 100 + seq)
    y, outs, routes = run(x=x)
    y_ref, outs_ref, routes_ref = _eager(gm, x)
    for i, (r, r_ref) in enumerate(zip(routes, routes_ref)):
        assert r.dtype == torch.int64 and torch.equal(r, r_ref), f"layer {i}: route ids differ"
    for i, (o, o_ref) in enumerate(zip(outs, outs_ref)):
        err = (o - o_ref).abs().max().item()
        assert err <= ONNX_VS_EAGER, f"layer {i} ({LAYERS[i]}): max abs error {err:.3g}"
    assert (y - y_ref).abs().max().item() <= ONNX_VS_EAGER


def test_every_route_is_exercised():
    """The test data reaches every non-skip route except the ones the router never picks."""
    gm, run = _stack()
    _, _, routes = run(x=stack_input(3, 11, seed=7))
    for cfg, r in zip(LAYERS, routes):
        counts = torch.bincount(r.flatten(), minlength=len(cfg.ranges) // 2)
        for route, count in enumerate(counts.tolist()):
            assert (count == 0) == (route in cfg.never), (cfg, counts)


# ORT keeps our node names through fusions: "routed_ffn_4/route2/up/MatMulAddFusion", "fused routed_ffn_4/..."
_KERNEL = re.compile(r"^(?:fused )?(?P<op>routed_ffn(?:_\d+)?)/(?P<route>route\d+|dense)/(?P<mat>up|gate|down)"
                     r"(?:/|_kernel_time)")


def _matmul_rows(profile_path: str) -> dict[tuple[str, str, str], list[int]]:
    """{(fx node, 'routeN' | 'dense', 'up' | 'gate' | 'down'): [row counts, one per run]} from ORT's profile
    (node events carry their inputs' shapes in args.input_type_shape)."""
    rows: dict[tuple[str, str, str], list[int]] = {}
    with open(profile_path) as f:
        events = json.load(f)
    for e in events:
        if e.get("cat") != "Node" or not e["name"].endswith("_kernel_time"):
            continue
        m = _KERNEL.match(e["name"])
        if m is None:
            continue
        assert e["args"]["op_name"] in ("MatMul", "Gemm", "FusedGemm", "FusedMatMul"), e
        shape = next(iter(e["args"]["input_type_shape"][0].values()))  # the activation operand [..., d or F_r]
        rows.setdefault((m["op"], m["route"], m["mat"]), []).append(int(torch.tensor(shape[:-1]).prod()))
    return rows


def test_profiler_each_route_runs_on_its_own_rows():
    """Each routed MatMul runs on as many rows as there are (token, slot) assignments to its route; a skip
    route (empty range) runs no MatMul; the dense layer runs on all tokens."""
    gm, run = _stack()  # the profiler has been on since prepare; other tests may have run it before
    x = stack_input(3, 13, seed=11)
    _, _, routes = run(x=x)
    rows = {key: counts[-1] for key, counts in _matmul_rows(run.end_profiling()).items()}  # this call's rows
    names = [n.name for n in gm.graph.nodes if n.op == "call_function" and n.target is ROUTED_FFN]
    assert len(names) == len(LAYERS)
    expected: dict[tuple[str, str, str], int] = {}
    for name, cfg, r in zip(names, LAYERS, routes):
        mats = ("up", "gate", "down") if cfg.gated else ("up", "down")
        if list(cfg.ranges) == [0, F] and cfg.k == 1:
            expected.update({(name, "dense", m): r.shape[0] * r.shape[1] for m in mats})
            continue
        counts = torch.bincount(r.flatten(), minlength=len(cfg.ranges) // 2).tolist()
        for route, count in enumerate(counts):
            if cfg.ranges[2 * route] == cfg.ranges[2 * route + 1]:
                assert not any(k[0] == name and k[1] == f"route{route}" for k in rows), \
                    f"{name}: skip route {route} ran a MatMul"
                continue
            expected.update({(name, f"route{route}", m): count for m in mats})
    assert rows == expected


# ---- what the exported model looks like -----------------------------------------------------------------

def test_exported_model_inputs_and_initializers():
    gm, run = _stack()
    model = onnx.load_from_string(run.onnx_model)
    assert [i.name for i in model.graph.input] == ["x"]
    assert [i.name for i in run.inputs] == ["x"]
    ops = {n.op_type for n in model.graph.node}
    assert {"TopK", "Gather", "ScatterElements"} <= ops  # one sort, gathers in and out, the inverse permutation
    assert not {"NonZero", "ScatterND"} & ops
    # every route's run from one Split by run lengths (per routed layer: one, two when K > 1), given as an input
    # and without the num_outputs attribute ONNX forbids beside it
    splits = [n for n in model.graph.node if n.op_type == "Split"]
    routed_k = [cfg.k for cfg in LAYERS if list(cfg.ranges) != [0, F]]
    assert len(splits) == sum(1 if k == 1 else 2 for k in routed_k)
    assert all(len(n.input) == 2 and not any(a.name == "num_outputs" for a in n.attribute) for n in splits)
    onnx.checker.check_model(model)
    inits = {i.name: list(i.dims) for i in model.graph.initializer}
    kernel = re.compile(r"routed_ffn(_\d+)?/(route\d+|dense)/(up|gate|down)")  # a route's (or dense) products
    routed_mm = [n for n in model.graph.node if n.op_type == "MatMul" and kernel.fullmatch(n.name)]
    assert len(routed_mm) > 20
    # every routed MatMul reads a pre-sliced, pre-transposed initializer: no Slice / Transpose at run time
    assert all(n.input[1] in inits and n.input[1].endswith(".weight_t") for n in routed_mm)
    assert inits["routed_ffn/route1/up.weight_t"] == [D, 9]           # [d, F_r]
    assert inits["routed_ffn/route1/down.weight_t"] == [9, D]         # [F_r, d]
    assert "routed_ffn/route0/up.weight_t" not in inits               # skip route: no weight at all


def test_weight_slices_fold_without_onnxscripts_folder(monkeypatch):
    """Where onnxscript's constant folder fails on some other node of the graph (its partial evaluators run on
    every node: ProphetNet's SplitToSequence), the weight slices are still folded into pre-sliced initializers,
    one node at a time, and the model still equals eager."""
    import onnxscript.optimizer

    from routefx.backends import onnx_ops

    def fails(*a, **k):
        raise RuntimeError("Error during constant folding for node 'node_split' (::SplitToSequence)")

    monkeypatch.setattr(onnxscript.optimizer, "fold_constants", fails)
    x = stack_input(2, 5)
    gm = capture(RoutedStack().eval(), (x,))
    run = onnx_backend.prepare(gm, {"x": x})
    model = onnx.load_from_string(run.onnx_model)
    inits = {i.name: list(i.dims) for i in model.graph.initializer}
    assert inits["routed_ffn/route1/up.weight_t"] == [D, 9]
    assert not [n.name for n in model.graph.node if n.name.startswith(onnx_ops._FOLD_PREFIX)]
    x = stack_input(3, 7, seed=5)
    y, _, routes = run(x=x)
    y_ref, _, routes_ref = _eager(gm, x)
    assert all(torch.equal(r, r_ref) for r, r_ref in zip(routes, routes_ref))
    assert (y - y_ref).abs().max().item() <= ONNX_VS_EAGER


class _DenseFFN(nn.Module):
    """One full range, K = 1, no gates: the dense case of routed_ffn."""

    def __init__(self):
        super().__init__()
        g = torch.Generator().manual_seed(3)
        self.w_up = nn.Parameter(torch.randn(40, D, generator=g) * 0.2)
        self.w_gate = nn.Parameter(torch.randn(40, D, generator=g) * 0.2)
        self.w_down = nn.Parameter(torch.randn(D, 40, generator=g) * 0.2)

    def forward(self, x):
        routes = torch.zeros(x.shape[:-1] + (1,), dtype=torch.long)
        return ROUTED_FFN(x, routes, None, self.w_up, self.w_gate, self.w_down, None, None, None, [0, 40], "silu")


def test_dense_range_lowers_to_plain_matmuls(tmp_path, monkeypatch):
    x = stack_input(2, 3)
    gm = capture(_DenseFFN().eval(), (x,))
    run = onnx_backend.prepare(gm, {"x": x})
    ops = [n.op_type for n in onnx.load_from_string(run.onnx_model).graph.node]
    assert ops.count("MatMul") == 3 and not {"TopK", "NonZero", "Gather", "ScatterND"} & set(ops)
    x = stack_input(5, 7, seed=2)
    out = run(x=x)
    assert isinstance(out, torch.Tensor) and out.shape == x.shape
    assert (out - _eager(gm, x)).abs().max().item() <= ONNX_VS_EAGER
    run.save(str(tmp_path / "ffn.onnx"))
    assert onnx.load(str(tmp_path / "ffn.onnx")).graph.input[0].name == "x"

    # models past protobuf's 2 GiB limit go to a temporary directory with external data
    monkeypatch.setattr(onnx_backend, "_MAX_PROTO_BYTES", 0)
    big = onnx_backend.prepare(gm, {"x": stack_input(2, 3)})
    assert big.onnx_model is None and big.onnx_path.endswith("model.onnx")
    assert torch.equal(big(x=x), out)
    with pytest.raises(routefx.BackendError, match="stored with external data"):
        big.save(str(tmp_path / "big.onnx"))


class _StaticRoutes(nn.Module):
    """Three layers with constant route ids (small, skip, big) built with full_like, zeros_like and full."""

    def __init__(self):
        super().__init__()
        g = torch.Generator().manual_seed(5)
        self.w = nn.ParameterList([nn.Parameter(torch.randn(*s, generator=g) * 0.2)
                                   for _ in range(3) for s in ((F, D), (F, D), (D, F))])
        self.b = nn.Parameter(torch.randn(D, generator=g) * 0.2)

    def forward(self, x):
        first = x[..., :1]
        small = torch.full_like(first, 1, dtype=torch.long)
        skip = torch.zeros_like(first, dtype=torch.long)
        big = torch.full((*x.shape[:-1], 1), 2, dtype=torch.long)
        ranges = [0, 0, 0, 9, 0, F]
        for i, routes in enumerate((small, skip, big)):
            up, gate, down = self.w[3 * i:3 * i + 3]
            x = x + ROUTED_FFN(x, routes, None, up, gate, down, None, None, self.b, ranges, "silu")
        return x


@pytest.mark.parametrize("level", ["all", "disable"])
def test_static_routes_lower_to_plain_matmuls(level):
    x = stack_input(2, 3)
    gm = capture(_StaticRoutes().eval(), (x,))
    run = onnx_backend.prepare(gm, {"x": x})
    ops = [n.op_type for n in onnx.load_from_string(run.onnx_model).graph.node]
    assert ops.count("MatMul") == 6 and not {"TopK", "NonZero", "Gather", "ScatterND"} & set(ops), ops
    inits = {i.name: list(i.dims) for i in onnx.load_from_string(run.onnx_model).graph.initializer}
    assert [d for name, d in inits.items() if name.endswith("up.weight_t")] == [[D, 9], [D, F]]
    run = run if level == "all" else run.at_level(level)
    for batch, seq in [(3, 11), (1, 1)]:
        x = stack_input(batch, seq, seed=batch + seq)
        assert (run(x=x) - _eager(gm, x)).abs().max().item() <= ONNX_VS_EAGER


class _Nested(nn.Module):
    """Skip / small / big over one weight (nested ranges), F large enough that the optimizer keeps slices."""
    F_BIG = 400

    def __init__(self):
        super().__init__()
        g = torch.Generator().manual_seed(9)
        self.router = nn.Parameter(torch.randn(3, D, generator=g))
        self.up, self.gate = (nn.Parameter(torch.randn(self.F_BIG, D, generator=g) * 0.1) for _ in range(2))
        self.down = nn.Parameter(torch.randn(D, self.F_BIG, generator=g) * 0.1)

    def forward(self, x):
        routes = torch.argmax(x @ self.router.T, dim=-1, keepdim=True)
        return ROUTED_FFN(x, routes, None, self.up, self.gate, self.down, None, None, None,
                          [0, 0, 0, 150, 0, self.F_BIG], "silu")


@pytest.mark.parametrize("level", ["all", "disable"])
def test_nested_ranges_store_each_weight_once(level):
    x = stack_input(2, 5)
    gm = capture(_Nested().eval(), (x,))
    run = onnx_backend.prepare(gm, {"x": x})
    model = onnx.load_from_string(run.onnx_model)
    ffn_bytes = sum(onnx.numpy_helper.to_array(i).nbytes for i in model.graph.initializer
                    if i.name.startswith("routed_ffn"))
    assert ffn_bytes == 3 * _Nested.F_BIG * D * 4  # up, gate, down once each: the small route slices them
    inits = {i.name for i in model.graph.initializer}
    assert sum(n.op_type == "Slice" and n.input[0] in inits for n in model.graph.node) == 3  # small's weights
    run = run if level == "all" else run.at_level(level)
    x = stack_input(3, 11, seed=3)
    with torch.no_grad():
        assert len(torch.argmax(x @ _Nested().router.T, dim=-1).unique()) == 3  # skip, small and big all run
    for x in (x, stack_input(1, 1, seed=4)):
        assert (run(x=x) - _eager(gm, x)).abs().max().item() <= ONNX_VS_EAGER


# ---- inputs the model cannot take ----------------------------------------------------------------------

def test_wrong_dtype_rank_and_shape_raise_input_error():
    _, run = _stack()
    x = stack_input(2, 3)
    with pytest.raises(routefx.InputError, match=r"input 'x' has dtype torch.float64 and rank 3; the ONNX model "
                                                 r"takes dtype torch.float32 and rank 3"):
        run(x=x.double())
    with pytest.raises(routefx.InputError, match=r"input 'x' has dtype torch.float32 and rank 2; the ONNX model "
                                                 r"takes dtype torch.float32 and rank 3"):
        run(x=x[0])
    with pytest.raises(routefx.InputError, match=r"input 'x' has shape \[2, 3, 7\]; the ONNX model takes shape "
                                                 r"\[\?, \?, 24\]"):
        run(x=x[..., :7])
    with pytest.raises(routefx.InputError, match=r"input 'x' is a list; the ONNX model takes a tensor of dtype "
                                                 r"torch.float32 and rank 3"):
        run(x=x.tolist())
    with pytest.raises(routefx.InputError, match=r"missing input 'x'"):
        run()
    with pytest.raises(routefx.InputError, match=r"unexpected input\(s\) \['mask'\]; the ONNX model takes \['x'\]"):
        run(x=x, mask=x)


class _WithConstant(nn.Module):
    def __init__(self):
        super().__init__()
        self.w = nn.Parameter(torch.ones(D, 3))

    def forward(self, x, mode: str = "a"):
        return x @ self.w if mode == "a" else x


def test_constant_keywords_are_baked_in():
    x = stack_input(2, 3)
    gm = capture(_WithConstant(), (), {"x": x, "mode": "a"})
    run = onnx_backend.prepare(gm, {"x": x, "mode": "a"})
    assert [i.name for i in run.inputs] == ["x"]
    assert torch.allclose(run(x=x, mode="a"), x @ torch.ones(D, 3), atol=ONNX_VS_EAGER)
    assert run(x=x).shape == (2, 3, 3)
    with pytest.raises(routefx.InputError, match=r"input 'mode' is 'b'; the ONNX model was exported with mode='a'"):
        run(x=x, mode="b")


# ---- export failures and registration ------------------------------------------------------------------

@torch.library.custom_op("routefx_test::mystery", mutates_args=())
def _mystery(x: torch.Tensor) -> torch.Tensor:
    return x.clone()


@_mystery.register_fake
def _(x):
    return torch.empty_like(x)


class _Mystery(nn.Module):
    def forward(self, x):
        return torch.ops.routefx_test.mystery(x) + 1


def test_export_failure_names_the_node():
    x = stack_input(2, 3)
    gm = capture(_Mystery(), (x,))
    with pytest.raises(routefx.BackendError, match=r"ONNX export failed: node %mystery "
                                                   r"\(routefx_test\.mystery\.default\): .*No ONNX function"):
        onnx_backend.prepare(gm, {"x": x})


def test_backend_is_registered():
    assert "onnx" in routefx.backends.BACKENDS
    assert get_backend("onnx") is onnx_backend
    with pytest.raises(routefx.BackendError, match="supported: eager, onnx"):
        get_backend("tvm")


def test_k_routes_unpermute_without_scatter_on_many_tokens():
    """K > 1: a token appears K times, so its un-permute must not be a scatter-add over repeated indices (ONNX
    Runtime's multi-threaded CPU ScatterND loses such updates: an occasional token missing one route's output,
    a different token per run). Structure: no ScatterND at all (the un-permute is a Gather by the inverse
    permutation); behaviour: many tokens on 2 threads, repeated runs, equal to eager every time."""
    gm, run = _stack()
    model = onnx.load_from_string(run.onnx_model)
    scatters = [n.name for n in model.graph.node if n.op_type == "ScatterND"]
    assert not scatters, f"ScatterND in the lowering: {scatters}"
    threads = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        two = onnx_backend.prepare(gm, {"x": stack_input(2, 5)})
        x = stack_input(8, 256, seed=5)
        _, outs_ref, _ = _eager(gm, x)
        for _ in range(3):
            _, outs, _ = two(x=x)
            for i, (o, o_ref) in enumerate(zip(outs, outs_ref)):
                err = (o - o_ref).abs().max().item()
                assert err <= ONNX_VS_EAGER, f"layer {i} ({LAYERS[i]}): max abs error {err:.3g}"
    finally:
        torch.set_num_threads(threads)
