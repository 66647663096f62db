"""`backend="triton"`: the lowered graph (dynamic routed FFNs -> Triton op, constant routes -> dense products)
against the eager backend on the same rewritten graph, with identical route ids; the refusals.

Without CUDA the kernels run under Triton's interpreter (fp32, CPU), which tests/conftest.py switches on before
triton is first imported, only where CUDA is absent: on a GPU machine the CUDA-marked tests run the compiled
kernels and the interpreter tests are skipped (bench/gpu_check.sh runs the suite with CUDA hidden so that they run
too).
"""
from __future__ import annotations

import os
import shutil

import pytest
import torch
from torch import nn

import routefx
from routefx.backends.static_routes import with_route_outputs
from routefx.backends.triton import backend as tb
from routefx.errors import BackendError, InputError
from routefx.ir import capture
from tests.backends.routed_models import D, F, ROUTED_FFN, RoutedStack, stack_input
from tests.compare import assert_close_nonpad, graph_kwargs
from tests.tolerances import TRITON_BF16_VS_EAGER, TRITON_VS_EAGER
from tests.zoo import ZOO, example_inputs

needs_interpreter = pytest.mark.skipif(
    os.environ.get("TRITON_INTERPRET", "0") in ("", "0"),
    reason="TRITON_INTERPRET is off (CUDA present): the CPU interpreter tests run where CUDA is hidden")
needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


def _triton_op():
    from routefx.backends.triton import ffn  # noqa: F401  (registers the op)
    return torch.ops.routefx_triton.routed_ffn.default


def _count(gm, target) -> int:
    return sum(n.op == "call_function" and n.target is target for n in gm.graph.nodes)


def _batches(entry, n, seed, device="cpu"):
    out = []
    for i in range(n):
        args, kwargs = example_inputs(entry, batch=3, seq=12, left_pad=2, seed=seed + i)
        out.append({k: v.to(device) for k, v in {"input_ids": args[0], **kwargs}.items()})
    return out


def _held_out(entry, device="cpu"):
    args, kwargs = example_inputs(entry, batch=3, seq=13, left_pad=4, seed=5)
    return (args[0].to(device),), {k: v.to(device) for k, v in kwargs.items()}


def _check_llama(policy, tol, device="cpu", dtype=torch.float32):
    """compile(llama, policy, backend="triton") against the eager backend on held-out inputs (another batch size
    and length, left padding): outputs within `tol`, one Triton op per routed FFN with identical route ids."""
    entry = ZOO["llama"]
    model = entry.build().to(device=device, dtype=dtype)
    cal = _batches(entry, 2, 40, device)
    cm = routefx.compile(model, policy, calibration=cal, backend="triton")
    args, kwargs = _held_out(entry, device)
    out = cm(*args, **kwargs)
    gm = cm.graph_module
    kw = graph_kwargs(gm, args, kwargs)
    with torch.no_grad():
        ref = gm(**kw)  # the eager backend runs the rewritten graph itself
    assert type(out) is type(ref)
    assert_close_nonpad(out, ref, kwargs["attention_mask"], tol)
    # the routes the backend computes: the same graph with its route ids as outputs, lowered and compiled as
    # `cm` was (Inductor on CUDA: a router fused otherwise than eager would show here), against eager's
    with_routes = with_route_outputs(gm)
    out_r, routes = tb.prepare(with_routes, kw)(**kw)
    with torch.no_grad():
        _, routes_ref = with_routes(**kw)
    assert_close_nonpad(out_r, ref, kwargs["attention_mask"], tol)
    # per-token routers route every FFN (Duo "random" / "local"); Dense and a static router route none
    routed = isinstance(policy, routefx.policies.Duo) and policy.router != "static"
    assert len(routes) == len(routes_ref) == (ZOO["llama"].expect.blocks if routed else 0)
    for i, (r, r_ref) in enumerate(zip(routes, routes_ref)):
        assert torch.equal(r, r_ref), f"routed FFN {i}: route ids differ"
    return cm, routes_ref


# ---- CPU, Triton's interpreter, fp32 ------------------------------------------------------------------------

@needs_interpreter
def test_dense_llama_runs_dense_products_no_kernel():
    cm, _ = _check_llama(routefx.policies.Dense(), TRITON_VS_EAGER)
    run = cm.runner
    n_ffn = ZOO["llama"].expect.blocks
    assert _count(cm.graph_module, ROUTED_FFN) == n_ffn  # the rewritten graph: one full-range routed FFN each
    assert (run.stats.triton_ops, run.stats.dense_ffns) == (0, n_ffn)
    assert _count(run.graph_module, _triton_op()) == 0 and _count(run.graph_module, ROUTED_FFN) == 0
    assert run.mode == "eager-interpreter" and cm.report.backend == "triton"


@needs_interpreter
def test_duo_random_router_equals_eager_with_identical_routes():
    cm, routes = _check_llama(routefx.policies.Duo(budget=0.5, router="random", small="nested"), TRITON_VS_EAGER)
    n_ffn = ZOO["llama"].expect.blocks
    run = cm.runner
    assert (run.stats.triton_ops, run.stats.dense_ffns) == (n_ffn, 0)
    # gated FFNs with routefx's own weights run the paired op on one matrix of interleaved gate/up rows, and the
    # eager graph's gate and up are views of that same matrix (same values: the comparison above ran on them)
    paired = torch.ops.routefx_triton.routed_ffn_paired.default
    assert _count(run.graph_module, paired) == n_ffn and _count(run.graph_module, _triton_op()) == 0
    assert _count(run.graph_module, ROUTED_FFN) == 0
    from routefx.backends.triton.ffn import paired_layout
    from routefx.ir.graph_utils import fetch_attr
    eager_ops = [n for n in cm.graph_module.graph.nodes if n.op == "call_function" and n.target is ROUTED_FFN]
    lowered_ops = [n for n in run.graph_module.graph.nodes if n.op == "call_function" and n.target is paired]
    for e, low in zip(eager_ops, lowered_ops, strict=True):
        up, gate = (fetch_attr(cm.graph_module, a.target) for a in e.args[3:5])
        w_gu = fetch_attr(run.graph_module, low.args[3].target)
        assert paired_layout(up, gate) and w_gu.shape == (2 * up.shape[0], up.shape[1])
        assert up.untyped_storage().data_ptr() == w_gu.untyped_storage().data_ptr()  # one copy of the weights
        assert not hasattr(run.graph_module, e.args[3].target)  # the lowered module holds the matrix alone
    # lowering the same graph again (another runner of it) reuses the matrix: no new copy, the paired op again
    again, _ = tb.lower(cm.graph_module)
    again_ops = [n for n in again.graph.nodes if n.op == "call_function" and n.target is paired]
    assert len(again_ops) == n_ffn
    for low, low2 in zip(lowered_ops, again_ops, strict=True):
        a, b = fetch_attr(run.graph_module, low.args[3].target), fetch_attr(again, low2.args[3].target)
        assert a.data_ptr() == b.data_ptr() and a.shape == b.shape and a.stride() == b.stride()
    # every router product became a reduction (the lowered graph keeps only the model's own linears)
    aten = torch.ops.aten
    assert _count(run.graph_module, aten.linear.default) == _count(cm.graph_module, aten.linear.default) - n_ffn
    assert _count(run.graph_module, aten.sum.dim_IntList) == _count(cm.graph_module, aten.sum.dim_IntList) + n_ffn
    mixed = [len(torch.unique(r)) >= 2 for r in routes]
    assert sum(mixed) >= 1, "routes are not mixed on the held-out input: the comparison would not test routing"


@needs_interpreter
@pytest.mark.skipif(shutil.which(os.environ.get("CXX", "g++")) is None,
                    reason="Inductor's CPU code generation needs a C++ compiler (g++ or $CXX)")
@pytest.mark.parametrize("dynamic,graphs", [(True, 1), (None, 2)], ids=["dynamic", "default"])
def test_inductor_compiles_the_lowered_graph_once_for_all_shapes(dynamic, graphs):
    """The GPU path's structure on CPU: Inductor (C++ here) compiles the lowered Duo graph whole (fullgraph) with
    the Triton op as one node. dynamic=True: one graph serves every batch size and length; the default (None):
    a graph specialised on the first shapes, then one dynamic graph for all later ones (never one per call)."""
    entry = ZOO["llama"]
    cm = routefx.compile(entry.build(), routefx.policies.Duo(budget=0.5, router="random", small="nested"),
                         calibration=_batches(entry, 2, 40))
    gm = cm.graph_module
    run = tb.prepare(gm, {}, inductor=True, dynamic=dynamic)
    assert run.mode == "inductor-interpreter" and run.stats.triton_ops == entry.expect.blocks
    torch._dynamo.reset()
    torch._dynamo.utils.counters.clear()
    for batch, seq, pad in [(3, 13, 4), (2, 6, 1), (4, 9, 2)]:
        args, kwargs = example_inputs(entry, batch=batch, seq=seq, left_pad=pad, seed=batch + seq)
        kw = graph_kwargs(gm, args, kwargs)
        with torch.no_grad():
            out, ref = run(**kw), gm(**kw)
        assert_close_nonpad(out, ref, kwargs["attention_mask"], TRITON_VS_EAGER)
    assert torch._dynamo.utils.counters["stats"]["unique_graphs"] == graphs


def test_bf16_graph_lowers_fp32_router_reductions_and_paired_weights():
    """The lowering alone (no kernel runs: bf16 cannot run under the interpreter) of a bf16 Duo graph: each router
    is a fused-reduction form over x cast to fp32 with fp32 weights, equal to the fp32 linear it replaces, and each
    routed FFN is the paired op on one interleaved bf16 matrix."""
    entry = ZOO["llama"]
    model = entry.build().to(torch.bfloat16)
    cm = routefx.compile(model, routefx.policies.Duo(budget=0.5, router="random", small="nested"),
                         calibration=_batches(entry, 2, 40))
    lowered, stats = tb.lower(cm.graph_module)
    n_ffn = entry.expect.blocks
    aten = torch.ops.aten
    paired = [n for n in lowered.graph.nodes if n.op == "call_function"
              and n.target is torch.ops.routefx_triton.routed_ffn_paired.default]
    assert stats.triton_ops == len(paired) == n_ffn
    for op in paired:
        w_gu = getattr(lowered, op.args[3].target)
        assert w_gu.dtype is torch.bfloat16 and w_gu.shape[0] % 2 == 0
        adj = op.args[1].args[0]                                   # argmax(sub(reduction + b, price))
        add = adj.args[0]
        red = add.args[0]
        assert (op.args[1].target, adj.target, add.target, red.target) == (
            aten.argmax.default, aten.sub.Tensor, aten.add.Tensor, aten.sum.dim_IntList)
        mul = red.args[0]
        cast = mul.args[0].args[0]                                 # unsqueeze(x.to(fp32), -2)
        assert cast.target is aten.to.dtype and cast.args[1] is torch.float32
        w, b = getattr(lowered, mul.args[1].target), getattr(lowered, add.args[1].target)
        assert w.dtype is b.dtype is torch.float32
        a = torch.randn(5, w.shape[1])
        torch.testing.assert_close((a[:, None, :] * w).sum(-1) + b, torch.nn.functional.linear(a, w, b))


@needs_interpreter
def test_duo_static_router_has_no_kernel():
    cm, _ = _check_llama(routefx.policies.Duo(budget=0.5, router="static", small="nested"), TRITON_VS_EAGER)
    assert (cm.runner.stats.triton_ops, cm.runner.stats.dense_ffns) == (0, ZOO["llama"].expect.blocks)


@needs_interpreter
@pytest.mark.parametrize("batch,seq", [(3, 11), (1, 1)])
def test_routed_stack_equals_eager(batch, seq):
    """Every routed_ffn variant of the hand-built stack (K=2 with gates, biases, overlapping ranges, every
    activation, a route no token takes), each layer's output and route ids."""
    x = stack_input(2, 5)
    gm = capture(RoutedStack().eval(), (x,))
    run = tb.prepare(gm, {})
    assert run.stats.triton_ops == _count(gm, ROUTED_FFN) and run.stats.dense_ffns == 0
    x = stack_input(batch, seq, seed=batch * 100 + seq)
    with torch.no_grad():
        y, outs, routes = run(x)
        y_ref, outs_ref, routes_ref = gm(x)
    for i, (r, r_ref) in enumerate(zip(routes, routes_ref)):
        assert torch.equal(r, r_ref), f"layer {i}: route ids differ"
    for i, (o, o_ref) in enumerate(zip(outs, outs_ref)):
        err = (o - o_ref).abs().max().item()
        assert err <= TRITON_VS_EAGER, f"layer {i}: max abs error {err:.3g}"


def test_with_route_outputs_returns_each_dynamic_routes_and_leaves_the_graph_alone():
    """`with_route_outputs` on the hand-built stack (whose forward returns its route ids itself): the copy returns
    the same outputs and, after them, the route ids feeding each routed FFN in graph order, equal to the ones the
    stack returns; the original graph's outputs are unchanged. Constant routes (a Dense graph) give none."""
    x = stack_input(2, 5)
    gm = capture(RoutedStack().eval(), (x,))
    n_nodes = len(gm.graph.nodes)
    with_routes = with_route_outputs(gm)
    with torch.no_grad():
        (y, outs, routes), extra = with_routes(x)
        y_ref, _, routes_ref = gm(x)
    assert len(gm.graph.nodes) == n_nodes and type(gm(x)) is tuple and len(gm(x)) == 3
    assert torch.equal(y, y_ref) and len(extra) == len(routes_ref) == _count(gm, ROUTED_FFN)
    for r, r_out, r_ref in zip(extra, routes, routes_ref):
        assert torch.equal(r, r_ref) and torch.equal(r_out, r_ref)
    entry = ZOO["llama"]
    args, kwargs = example_inputs(entry, batch=2, seq=5)
    dense = routefx.compile(entry.build(), routefx.policies.Dense(), example_inputs=args, example_kwargs=kwargs)
    out, none = with_route_outputs(dense.graph_module)(**graph_kwargs(dense.graph_module, args, kwargs))
    assert none == () and type(out) is type(dense(*args, **kwargs))


class _ConstantRoutes(nn.Module):
    """Routed FFNs whose routes are constant fills: a small range (K=1, biases), a skip (empty range) and K=2
    slots on one range with sigmoid gates (the output is the gate sum times the FFN)."""

    RANGES = [0, 0, 0, 11, 0, F]

    def __init__(self):
        super().__init__()
        g = torch.Generator().manual_seed(3)
        self.w = nn.ParameterList([nn.Parameter(torch.randn(*s, generator=g) * 0.2)
                                   for s in [(F, D), (F, D), (D, F), (F,), (F,), (D,), (2, D)]])

    def forward(self, x):
        w_up, w_gate, w_down, b_up, b_gate, b_down, w_r = self.w
        one = x[..., :1]
        small = ROUTED_FFN(x, torch.full_like(one, 1, dtype=torch.int64), None, w_up, w_gate, w_down, b_up, b_gate,
                           b_down, self.RANGES, "silu")
        skip = ROUTED_FFN(x, torch.zeros_like(one, dtype=torch.int64), None, w_up, w_gate, w_down, None, None,
                          b_down, self.RANGES, "gelu")
        gates = torch.sigmoid(x @ w_r.T)  # [..., 2], not summing to 1
        two = ROUTED_FFN(x, torch.full_like(gates, 2, dtype=torch.int64), gates, w_up, None, w_down, b_up, None,
                         b_down, self.RANGES, "relu")
        return small, skip, two


@needs_interpreter
def test_constant_routes_become_dense_products():
    x = stack_input(2, 5)
    gm = capture(_ConstantRoutes().eval(), (x,))
    run = tb.prepare(gm, {})
    assert (run.stats.triton_ops, run.stats.dense_ffns) == (0, 3)
    assert _count(run.graph_module, ROUTED_FFN) == 0
    x = stack_input(3, 7, seed=9)
    with torch.no_grad():
        outs, refs = run(x), gm(x)
    assert torch.equal(outs[1], torch.zeros_like(x))  # a skip contributes exactly 0, b_down included
    for i, (o, r) in enumerate(zip(outs, refs)):
        err = (o - r).abs().max().item()
        assert err <= TRITON_VS_EAGER, f"output {i}: max abs error {err:.3g}"


@needs_interpreter
def test_lowered_graph_traces_without_graph_break():
    """Dynamo captures the lowered graph whole (the dense products of constant routes are plain torch code). The
    Triton op itself is checked on CUDA: under the interpreter `wrap_triton` hands back an untraceable kernel."""
    x = stack_input(2, 5)
    run = tb.prepare(capture(_ConstantRoutes().eval(), (x,)), {})
    torch._dynamo.reset()
    explain = torch._dynamo.explain(run.graph_module)(stack_input(3, 7))
    assert explain.graph_break_count == 0 and explain.graph_count == 1, explain.break_reasons


# ---- refusals -----------------------------------------------------------------------------------------------

def test_no_cuda_and_no_interpreter_is_refused(monkeypatch):
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    entry = ZOO["llama"]
    args, kwargs = example_inputs(entry)
    with pytest.raises(BackendError, match=r"needs a CUDA GPU .*TRITON_INTERPRET=1"):
        routefx.compile(entry.build(), routefx.policies.Dense(), example_inputs=args, example_kwargs=kwargs,
                        backend="triton")


def test_cpu_weights_without_interpreter_are_refused(monkeypatch):
    x = stack_input(2, 5)
    gm = capture(_ConstantRoutes().eval(), (x,))
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    with pytest.raises(BackendError, match=r"weights are on the CPU.*move the model to a CUDA device"):
        tb.prepare(gm, {})


def test_cuda_weights_under_the_interpreter_are_refused(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert tb.unavailable_reason(torch.device("cpu")) is None
    reason = tb.unavailable_reason(torch.device("cuda", 0))
    assert reason is not None and "cuda:0 but TRITON_INTERPRET is set" in reason


@needs_interpreter
def test_bf16_under_the_interpreter_is_refused():
    x = stack_input(2, 5).bfloat16()
    gm = capture(_ConstantRoutes().eval().bfloat16(), (x,))
    with pytest.raises(BackendError, match=r"interpreter computes \['torch.bfloat16'\] wrongly.*fp32 graphs only"):
        tb.prepare(gm, {})


@needs_interpreter
def test_input_on_another_device_is_refused():
    x = stack_input(2, 5)
    run = tb.prepare(capture(_ConstantRoutes().eval(), (x,)), {})
    with pytest.raises(InputError, match=r"positional input 0 is on meta, the compiled model's weights are on cpu"):
        run(x.to("meta"))


# ---- CUDA (bf16, Inductor + the compiled kernels) -----------------------------------------------------------
# Depends on CUDA models compiling at all (issue 11: device handling in capture and calibration).

@pytest.mark.cuda
@needs_cuda
@pytest.mark.parametrize("policy", [routefx.policies.Dense(),
                                    routefx.policies.Duo(budget=0.5, router="random", small="nested")],
                         ids=["dense", "duo"])
def test_llama_cuda_bf16_equals_eager(policy):
    cm, routes = _check_llama(policy, TRITON_BF16_VS_EAGER, device="cuda", dtype=torch.bfloat16)
    run = cm.runner
    assert run.mode == "inductor" and run.device.type == "cuda"
    n_ffn = ZOO["llama"].expect.blocks
    assert run.stats.triton_ops == (n_ffn if isinstance(policy, routefx.policies.Duo) else 0)
    assert len(routes) == run.stats.triton_ops
    args, kwargs = _held_out(ZOO["llama"], "cuda")
    torch._dynamo.reset()
    explain = torch._dynamo.explain(run.graph_module)(**graph_kwargs(cm.graph_module, args, kwargs))
    assert explain.graph_break_count == 0 and explain.graph_count == 1, explain.break_reasons


def test_backend_options_are_checked_against_the_backend():
    model = ZOO["llama"].build()
    with pytest.raises(BackendError, match=r"backend 'eager' has no option\(s\) \['cudagraphs'\]; its options are none"):
        routefx.compile(model, routefx.policies.Dense(), backend="eager", backend_options={"cudagraphs": True})


@needs_interpreter
def test_cudagraphs_need_cuda_weights():
    entry = ZOO["llama"]
    args, kwargs = _held_out(entry)
    cm = routefx.compile(entry.build(), routefx.policies.Dense(), backend="triton",
                         backend_options={"cudagraphs": True})
    with pytest.raises(BackendError, match=r"cudagraphs=True needs the model on a CUDA device; its weights are on cpu"):
        cm(*args, **kwargs)


@pytest.mark.cuda
@needs_cuda
def test_llama_cuda_cudagraphs_replay_new_inputs_with_their_own_routes():
    """backend_options={"cudagraphs": True}: the Duo forward (routers, routing metadata, Triton kernels) replays
    as CUDA graphs with no fallback (Inductor counts a graph it could not capture as a cudagraph skip), and each
    replay on new inputs of the same shape equals the same lowered graph compiled without CUDA graphs (the same
    Inductor kernels, so the same routes: eager's own rounding could flip a near-tie route on some input)."""
    from torch._dynamo.utils import counters
    entry = ZOO["llama"]
    model = entry.build().to(device="cuda", dtype=torch.bfloat16)
    policy = routefx.policies.Duo(budget=0.5, router="random", small="nested")
    cm = routefx.compile(model, policy, calibration=_batches(entry, 2, 40, "cuda"), backend="triton",
                         backend_options={"cudagraphs": True})
    counters.clear()
    plain, outs = None, []
    for seed in range(4):  # warm-up, record, then replays
        args, kwargs = example_inputs(entry, batch=3, seq=13, left_pad=4, seed=50 + seed)
        args, kwargs = (args[0].cuda(),), {k: v.cuda() for k, v in kwargs.items()}
        logits = cm(*args, **kwargs).logits.clone()
        kw = graph_kwargs(cm.graph_module, args, kwargs)
        if plain is None:
            plain = tb.prepare(cm.graph_module, kw)
        ref = plain(**kw).logits
        assert_close_nonpad(logits, ref, kwargs["attention_mask"], TRITON_BF16_VS_EAGER)
        outs.append(logits)
    assert cm.runner.mode == "inductor-cudagraphs" and plain.mode == "inductor"
    assert cm.runner.stats.triton_ops == entry.expect.blocks
    assert counters["inductor"]["cudagraph_skips"] == 0, dict(counters["inductor"])
    assert not torch.equal(outs[2], outs[3])  # each replay read its own input
