"""`routefx.compile(..., backend="onnx")` on the zoo: the ONNX Runtime output equals the eager backend on the same
rewritten graph, at a batch size and length unlike the export example, with left padding; with ORT's graph
optimizations on (the backend's default) and off (`OnnxRunner.at_level("disable")`, no re-export)."""
from __future__ import annotations

import onnx
import pytest
import torch

import routefx
from routefx.backends import onnx as onnx_backend
from routefx.backends.onnx_opset import export_opset
from routefx.ir.capture import capture
from tests.compare import assert_close_nonpad, graph_kwargs
from tests.tolerances import MUST_DIFFER, ONNX_FP16_VS_EAGER, ONNX_VS_EAGER
from tests.zoo import DENSE, ZOO, example_inputs


def _check(name: str, policy) -> routefx.CompiledModel:
    entry = ZOO[name]
    args, kwargs = example_inputs(entry, batch=2, seq=7)
    cm = routefx.compile(entry.build(), policy, example_inputs=args, example_kwargs=kwargs, backend="onnx")
    args, kwargs = example_inputs(entry, batch=3, seq=13, left_pad=4, seed=5)
    out = cm(*args, **kwargs)
    gm = cm.graph_module
    with torch.no_grad():
        ref = gm(**graph_kwargs(gm, args, kwargs))  # the eager backend runs the graph module itself
    assert type(out) is type(ref)
    assert_close_nonpad(out, ref, kwargs.get("attention_mask"), ONNX_VS_EAGER)
    _unoptimized_equals(cm, gm, args, kwargs, ref)
    args1, kwargs1 = example_inputs(entry, batch=2, seq=11, seed=6)   # no padding: causal attention may take
    with torch.no_grad():                                             # another kernel (onnx_attention)
        ref1 = gm(**graph_kwargs(gm, args1, kwargs1))
    assert_close_nonpad(cm(*args1, **kwargs1), ref1, None, ONNX_VS_EAGER)
    if hasattr(ref, "to_tuple"):  # a Hugging Face ModelOutput: the same fields set, None where eager has None
        assert [k for k, v in out.items() if v is not None] == [k for k, v in ref.items() if v is not None]
        assert all(getattr(out, k) is None for k in type(ref).__dataclass_fields__ if getattr(ref, k) is None)
    return cm


@pytest.mark.parametrize("name", DENSE)
def test_dense_onnx_equals_eager(name):
    cm = _check(name, routefx.policies.Dense())
    assert cm.report.backend == "onnx"
    # one full range per FFN: plain MatMuls on all rows, no per-route dispatch
    run = cm.runner
    ops = {n.op_type for n in onnx.load_from_string(run.onnx_model).graph.node}
    assert not ops & {"TopK", "NonZero", "ScatterND"}, ops
    if name == "llama" and export_opset() is not None:  # ORT runs opset 23's Attention: fused, no NaN guard
        assert "Attention" in ops and not ops & {"IsNaN", "Softmax"}, ops


@pytest.mark.parametrize("name", ["gpt2", "plain_parallel"])
def test_prune_layers_onnx_equals_eager(name):
    cm = _check(name, routefx.policies.PruneLayers(layers=[1]))
    assert len(cm.ir.blocks) == len(ZOO[name].expect.kinds) - 1


def _unoptimized_equals(cm, gm, args, kwargs, ref) -> None:
    plain = cm.runner.at_level("disable")
    assert plain.session.get_session_options().graph_optimization_level.name == "ORT_DISABLE_ALL"
    assert_close_nonpad(plain(**graph_kwargs(gm, args, kwargs)), ref, kwargs.get("attention_mask"), ONNX_VS_EAGER)


def _duo(name: str, router: str) -> routefx.CompiledModel:
    entry = ZOO[name]
    cal = []
    for i in range(2):
        args, kwargs = example_inputs(entry, batch=3, seq=12, left_pad=2, seed=40 + i)
        cal.append({"input_ids": args[0], **kwargs})
    cm = routefx.compile(entry.build(), routefx.policies.Duo(budget=0.5, router=router, small="nested"),
                         calibration=cal,
                         backend="onnx")
    args, kwargs = example_inputs(entry, batch=3, seq=13, left_pad=4, seed=5)
    gm = cm.graph_module
    with torch.no_grad():
        ref = gm(**graph_kwargs(gm, args, kwargs))
    # a token routed differently would differ by a whole branch (far above the tolerance); route ids
    # themselves are compared output by output on the hand-built routed stack (test_onnx_routed.py)
    assert_close_nonpad(cm(*args, **kwargs), ref, kwargs.get("attention_mask"), ONNX_VS_EAGER)
    _unoptimized_equals(cm, gm, args, kwargs, ref)
    if router != "static":
        mix = [layer["mix"] for layer in cm.route_stats([{"input_ids": args[0], **kwargs}]).layers]
        assert sum(sum(f > 0 for f in m) >= 2 for m in mix) >= 1  # routes really are mixed on this input
    return cm


@pytest.mark.parametrize("name,router", [("llama", "static"), ("llama", "random"), ("llama", "local"),
                                         ("gpt2", "local"), ("bert", "random")])
def test_duo_onnx_equals_eager(name, router):
    cm = _duo(name, router)
    ops = {n.op_type for n in onnx.load_from_string(cm.runner.onnx_model).graph.node}
    if router != "static":
        assert {"TopK", "ScatterElements", "ArgMax"} <= ops, ops
    else:  # constant route ids: plain MatMuls on each layer's fixed range, no routing ops at all
        assert not ops & {"TopK", "NonZero", "ScatterND", "ScatterElements", "ArgMax"}, ops


def test_sessions_stop_spinning_when_a_run_returns():
    """Two compiled models called in alternation (dense and Duo) give their own results, and their sessions' threads
    stop spin-waiting when a run returns, at either optimization level (see the backend's docstring)."""
    entry = ZOO["llama"]
    args, kwargs = example_inputs(entry, batch=2, seq=7)
    cal = [{"input_ids": args[0], **kwargs}]
    cms = [routefx.compile(entry.build(), p, calibration=cal, backend="onnx")
           for p in (routefx.policies.Dense(), routefx.policies.Duo(budget=0.5, router="random"))]
    args, kwargs = example_inputs(entry, batch=3, seq=9, left_pad=2, seed=4)
    with torch.no_grad():
        refs = [cm.graph_module(**graph_kwargs(cm.graph_module, args, kwargs)) for cm in cms]
    for _ in range(2):
        for cm, ref in zip(cms, refs):
            assert_close_nonpad(cm(*args, **kwargs), ref, kwargs["attention_mask"], ONNX_VS_EAGER)
    for cm in cms:
        for runner in (cm.runner, cm.runner.at_level("disable")):
            opts = runner.session.get_session_options()
            assert opts.get_session_config_entry("session.force_spinning_stop") == "1"


def test_lowered_from_the_captured_graph_without_tracing():
    """The backend lowers the graph routefx captured as it is (no torch.export of it again, no decomposition
    trace); the exporter's own path (decompose, then translate: `direct=False`) gives the same outputs, and both
    equal the eager backend."""
    entry = ZOO["llama"]
    args, kwargs = example_inputs(entry, batch=2, seq=7)
    cm = routefx.compile(entry.build(), routefx.policies.Dense(), example_inputs=args, example_kwargs=kwargs,
                         backend="onnx")
    assert cm.runner.export_path == "direct"
    gm = cm.graph_module
    slow = onnx_backend.prepare(gm, graph_kwargs(gm, args, kwargs), direct=False)
    assert slow.export_path == "decomposed"
    args, kwargs = example_inputs(entry, batch=3, seq=13, left_pad=4, seed=5)
    with torch.no_grad():
        ref = gm(**graph_kwargs(gm, args, kwargs))
    mask = kwargs.get("attention_mask")
    assert_close_nonpad(cm(*args, **kwargs), ref, mask, ONNX_VS_EAGER)
    assert_close_nonpad(slow(**graph_kwargs(gm, args, kwargs)), ref, mask, ONNX_VS_EAGER)


class _Shrink(torch.nn.Module):
    """aten.hardshrink has no ONNX implementation in torch's registry, only a decomposition."""

    def __init__(self):
        super().__init__()
        self.w = torch.nn.Parameter(torch.randn(6, 5, generator=torch.Generator().manual_seed(0)))

    def forward(self, x):
        return torch.nn.functional.hardshrink(x, 0.3) @ self.w


def test_op_without_onnx_implementation_goes_through_decomposition():
    """Must-not-fire case of the direct lowering: a graph holding an op the exporter's registry lacks is lowered
    by the exporter's decomposition instead, still without tracing the model again, and still correct."""
    x = torch.randn(3, 4, 6, generator=torch.Generator().manual_seed(1))
    gm = capture(_Shrink(), (x,))
    run = onnx_backend.prepare(gm, {"x": x})
    assert run.export_path == "decomposed"
    x2 = torch.randn(2, 9, 6, generator=torch.Generator().manual_seed(2))
    torch.testing.assert_close(run(x=x2), _Shrink()(x2), atol=ONNX_VS_EAGER, rtol=0)


class _PackedIds(torch.nn.Module):
    """transformers' packed-sequence detection (`(diff(position_ids) != 1).cumsum(-1)`, which every padded or
    position-id batch computes) and a top-k renormalised in place (Mixtral's `topk_weights /= sum`)."""

    def __init__(self):
        super().__init__()
        self.w = torch.nn.Parameter(torch.randn(6, 5, generator=torch.Generator().manual_seed(0)))

    def forward(self, x, position_ids):
        seq = (torch.diff(position_ids, prepend=position_ids[:, :1] - 1, dim=-1) != 1).cumsum(-1)
        second = torch.diff(position_ids.float(), n=2, dim=-1).sum(-1, keepdim=True)
        flip = torch.diff(position_ids > 2, dim=-1)
        top = torch.topk(x @ self.w, 2, dim=-1).values
        top /= top.sum(-1, keepdim=True)
        return top * seq.unsqueeze(-1) + second.unsqueeze(-1) + flip.sum(-1, keepdim=True).unsqueeze(-1)


class _FilledBuffer(torch.nn.Module):
    """MLA attention's key assembly (a fresh buffer filled through slices, one piece broadcast), BitNet's
    torch.square, CPM-Ant's binary torch.min and torch.eye of a symbolic size."""

    def forward(self, x, y):
        k = x.new_empty(x.shape[0], x.shape[1], 6)
        k[..., :4] = x
        k[..., 4:] = y[:, :1, :]   # [B, 1, 2] broadcast over the sequence
        eye = torch.eye(x.shape[1], dtype=x.dtype) @ x                       # Bailing-hybrid's torch.eye
        band = torch.eye(x.shape[1], 6, dtype=torch.bool)                      # eye(n, m), bool
        return torch.min(torch.square(k), k + 0.5) * 2 + eye.sum(-1, keepdim=True) + band.float()


class _ViewWrite(torch.nn.Module):
    def forward(self, x):
        y = x * 2
        y[:, :1].mul_(3)   # an in-place write into a view of y: y = slice_scatter(y, mul(y[:, :1], 3))
        top = torch.topk(x, 2, dim=-1).values
        flat = top.view(-1)   # a view made before the write and read after it: the write stays a write
        top /= 2
        return y + 1, flat * 1


def _in_place(gm) -> list[str]:
    """The in-place ops left in a captured graph (overload names)."""
    return [f"{n.target._opname}.{n.target._overloadname}" for n in gm.graph.nodes
            if n.op == "call_function" and isinstance(n.target, torch._ops.OpOverload)
            and n.target._schema.is_mutable]


def test_ops_hugging_face_graphs_carry_lower_directly():
    """aten.diff, aten.square, the binary aten.min (no translation in torch's registry), a cumsum of a bool (a type
    promotion), an in-place division of a fresh top-k result and a fresh buffer filled through slices (capture
    makes them functional: an ExportedProgram holds functional ops only) no longer send the graph through
    decomposition or a new trace: lowered as captured, equal to torch, at another batch and length; a write whose
    tensor is read afterwards through a view made before it stays a write (and is still right)."""
    def inputs(b, s, seed):
        g = torch.Generator().manual_seed(seed)
        pos = torch.arange(s).repeat(b, 1)
        pos[0, s // 2:] -= s // 2   # a second packed sequence in row 0
        return torch.randn(b, s, 6, generator=g), pos
    x, pos = inputs(2, 7, 1)
    gm = capture(_PackedIds(), (x, pos))
    assert _in_place(gm) == []   # capture made the writes functional, for every backend
    run = onnx_backend.prepare(gm, {"x": x, "position_ids": pos})
    assert run.export_path == "direct"
    x2, pos2 = inputs(3, 10, 2)
    with torch.no_grad():
        ref = _PackedIds()(x2, pos2)
    torch.testing.assert_close(run(x=x2, position_ids=pos2), ref, atol=ONNX_VS_EAGER, rtol=0)
    a, b = (torch.randn(2, 5, n, generator=torch.Generator().manual_seed(n)) for n in (4, 2))
    gm = capture(_FilledBuffer(), (a, b))
    assert _in_place(gm) == []
    filled = onnx_backend.prepare(gm, {"x": a, "y": b})
    assert filled.export_path == "direct"
    a2, b2 = (torch.randn(3, 8, n, generator=torch.Generator().manual_seed(10 + n)) for n in (4, 2))
    torch.testing.assert_close(filled(x=a2, y=b2), _FilledBuffer()(a2, b2), atol=ONNX_VS_EAGER, rtol=0)
    y = torch.randn(2, 4, generator=torch.Generator().manual_seed(3))
    gm = capture(_ViewWrite(), (y,))
    assert _in_place(gm) == ["div_.Tensor"]   # y's write through a slice became a slice_scatter; top's stays
    view_write = onnx_backend.prepare(gm, {"x": y})
    y2 = torch.randn(3, 5, generator=torch.Generator().manual_seed(4))
    torch.testing.assert_close(view_write(x=y2), _ViewWrite()(y2), atol=ONNX_VS_EAGER, rtol=0)


def test_saved_with_external_data_runs_in_a_plain_session(tmp_path):
    """`runner.save(path, external_data=True)` writes the graph and one weight file that ONNX Runtime loads on
    its own, with the weights the in-memory session was given."""
    import numpy as np
    import onnxruntime as ort

    x = torch.randn(3, 4, 6, generator=torch.Generator().manual_seed(1))
    gm = capture(_Shrink(), (x,))
    run = onnx_backend.prepare(gm, {"x": x})
    run.save(str(tmp_path / "m.onnx"), external_data=True)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m.onnx", "m.onnx.data"]
    sess = ort.InferenceSession(str(tmp_path / "m.onnx"), providers=["CPUExecutionProvider"])
    (got,) = sess.run(None, {"x": x.numpy()})
    np.testing.assert_allclose(got, _Shrink()(x).detach().numpy(), atol=ONNX_VS_EAGER, rtol=0)


@pytest.mark.parametrize("dtype,why", [(torch.float64, "fused CPU kernels take float32 and float16 only"),
                                       (torch.bfloat16, "no bfloat16 MatMul")])
def test_float64_and_bfloat16_models_are_refused_before_export(dtype, why):
    """The onnx backend runs float32 and float16 models; others get a BackendError that says why, before any export
    (a float64 model used to fail to load in ONNX Runtime, a bfloat16 one with ORT's NOT_IMPLEMENTED)."""
    entry = ZOO["llama"]
    args, kwargs = example_inputs(entry, batch=2, seq=9, left_pad=3, seed=2)
    with pytest.raises(routefx.errors.BackendError, match=f"{str(dtype).removeprefix('torch.')} weights; .*{why}"):
        routefx.compile(entry.build().to(dtype), routefx.policies.Dense(), example_inputs=args,
                        example_kwargs=kwargs, backend="onnx")


@pytest.mark.parametrize("name,policy", [("gpt2", "dense"), ("gpt2", "duo"), ("gemma", "dense")])
def test_float16_models_run_on_onnx(name, policy):
    """fp16 models lower with every constant in the model's type: routed_ffn's activations (GPT-2's and Gemma's
    tanh GELU: a float32 constant made ONNX Runtime refuse the graph, `Mul bound to different types`) and
    Gemma's norm, whose scale stays float32 (the fused skip-norm kernel takes one type: not fused there)."""
    entry = ZOO[name]
    model = entry.build().half()
    args, kwargs = example_inputs(entry, batch=2, seq=9, left_pad=3, seed=2)
    if policy == "dense":
        cm = routefx.compile(model, routefx.policies.Dense(), example_inputs=args, example_kwargs=kwargs,
                             backend="onnx")
        with torch.no_grad():
            ref = model(*args, **kwargs)
    else:
        cal = [dict(input_ids=args[0]) | kwargs]
        eager = routefx.compile(model, routefx.policies.Duo(budget=0.5, small="nested"), calibration=cal)
        cm = routefx.compile(model, eager.plan, backend="onnx")
        ref = eager(*args, **kwargs)
        with torch.no_grad():       # routes taken: not the dense model
            dense = model(*args, **kwargs).logits.float()
        assert (ref.logits.float() - dense)[kwargs["attention_mask"].bool()].abs().max() > MUST_DIFFER
    out = cm(*args, **kwargs)
    assert out.logits.dtype == torch.float16
    assert_close_nonpad(out.logits.float(), ref.logits.float(), kwargs["attention_mask"], ONNX_FP16_VS_EAGER)


class _HalfOps(torch.nn.Module):
    """fp16 ops that torch's promotion rules compute in float32 and return in fp16 (BitNet's squared ReLU,
    Llama 4's expert sum), and a max with a float32 0-dim tensor (XGLM's attention floor)."""

    def __init__(self):
        super().__init__()
        self.w = torch.nn.Linear(8, 8)

    def forward(self, x):
        h = self.w(x)
        floor = torch.max(h, torch.tensor(-0.5))          # a float32 0-dim floor (XGLM's): the result is fp16
        return torch.relu(h).square() * h + h.sum(-1, keepdim=True) + floor


def test_float16_ops_computed_in_float32_come_back_in_float16():
    """The casts routefx inserts for torch's type promotion (in place of the exporter's slower pass) cast the
    result of an op computed in another dtype back to the graph's (an fp16 `square` or `sum` left float32 made
    ONNX Runtime refuse the next Mul/Add: `bound to different types`), and cast `max.other`'s operands as for
    `maximum` (the promotion table has no entry for it: ONNX Runtime refused the Max)."""
    model = _HalfOps().half()
    x = torch.randn(2, 5, 8, generator=torch.Generator().manual_seed(0)).half()
    gm = capture(model, (x,))
    run = onnx_backend.prepare(gm, {"x": x})
    got = run(x=x)
    got = got[0] if isinstance(got, (tuple, list)) else got
    assert got.dtype == torch.float16
    with torch.no_grad():
        torch.testing.assert_close(got.float(), model(x).float(), atol=ONNX_FP16_VS_EAGER, rtol=ONNX_FP16_VS_EAGER)
