"""`torch.compile(model, backend=routefx_backend)`: Dense equals the model, a Duo plan equals `routefx.compile` with that
plan, routing and new shapes cause no re-calibration, graph breaks, and discovery through the entry point."""
from __future__ import annotations

import logging
import os
import subprocess
import sys
import textwrap

import pytest
import torch
from torch import nn

import routefx
from routefx.compiler import dynamo_backend
from routefx.compiler.dynamo_backend import routefx_backend
from routefx.errors import BackendError
from routefx.policies import Dense, Duo
from tests.compare import assert_close_nonpad
from tests.runtime.artifacts import batches
from tests.tolerances import EXACT_REWRITE, MUST_DIFFER, ONNX_VS_EAGER
from tests.zoo import ZOO, example_inputs

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
# In this process the backend is passed as a function: the routefx installed here may predate the entry point
# (which the last test checks by name, in a fresh process).
SHAPES = [(2, 7, 0), (3, 11, 2), (1, 5, 0), (4, 3, 1)]    # (batch, length, left padding of row 0)


def _call(fn, entry, b, s, pad, seed=0):
    args, kwargs = example_inputs(entry, batch=b, seq=s, left_pad=pad, seed=seed)
    with torch.no_grad():
        return fn(*args, **kwargs), kwargs.get("attention_mask")


def _new_records(before: int):
    return dynamo_backend.compiled_pieces()[before:]


@pytest.mark.parametrize("name,target", [("llama", "eager"), ("gpt2", "eager"), ("plain_parallel", "eager"),
                                         ("plain_sandwich", "onnx")])
def test_dense_equals_the_model(name, target):
    torch._dynamo.reset()
    entry = ZOO[name]
    model = entry.build()
    before = len(dynamo_backend.compiled_pieces())
    opt = torch.compile(model, backend=routefx_backend, dynamic=True, options={"policy": Dense(), "target": target})
    for b, s, pad in SHAPES:
        out, mask = _call(opt, entry, b, s, pad, seed=b * s)
        ref, _ = _call(model, entry, b, s, pad, seed=b * s)
        assert type(out) is type(ref)
        assert_close_nonpad(out, ref, mask, EXACT_REWRITE if target == "eager" else ONNX_VS_EAGER)
    records = _new_records(before)
    assert records and all(r.compiled for r in records), [(r.inputs, r.reason) for r in records]
    assert f"{entry.expect.blocks} transformer blocks compiled by Dense() for target {target!r}" in records[0].reason
    assert records[0].model.backend == target
    assert sum("reused" not in r.reason for r in records) == 1          # routefx compiled the piece once


def test_duo_plan_equals_routefx_compile_without_recalibration(monkeypatch):
    torch._dynamo.reset()
    entry = ZOO["llama"]
    model = entry.build()
    cm = routefx.compile(model, Duo(budget=0.5, router="local", small="nested"), calibration=batches(entry))
    calls = []
    import routefx.compiler.compile as compile_module
    real = compile_module.calibrate
    monkeypatch.setattr(compile_module, "calibrate", lambda *a, **k: calls.append(1) or real(*a, **k))
    opt = torch.compile(model, backend=routefx_backend, dynamic=True, options={"policy": cm.plan})
    before = len(dynamo_backend.compiled_pieces())
    for b, s, pad in SHAPES:
        out, mask = _call(opt, entry, b, s, pad, seed=b + s)
        ref, _ = _call(cm, entry, b, s, pad, seed=b + s)
        dense, _ = _call(model, entry, b, s, pad, seed=b + s)
        assert_close_nonpad(out, ref, mask, EXACT_REWRITE)
        assert (out.logits - dense.logits).abs().max() > MUST_DIFFER       # the routing did run
    n = len(dynamo_backend.compiled_pieces())
    for seed in range(5):                        # other token ids at a seen shape: no new piece, no backend call
        _call(opt, entry, 3, 11, 2, seed=100 + seed)
    assert len(dynamo_backend.compiled_pieces()) == n
    assert calls == [] and n - before >= 1


def test_duo_calibrates_once_per_piece():
    torch._dynamo.reset()
    entry = ZOO["plain_parallel"]
    model = entry.build()
    cal = batches(entry)
    before = len(dynamo_backend.compiled_pieces())
    opt = torch.compile(model, backend=routefx_backend, dynamic=True,
                        options={"policy": Duo(budget=0.5, router="random", small="nested"), "calibration": cal})
    ref = routefx.compile(model, Duo(budget=0.5, router="random", small="nested"), calibration=cal)
    for b, s, pad in SHAPES:
        out, _ = _call(opt, entry, b, s, pad, seed=7)
        want, _ = _call(ref, entry, b, s, pad, seed=7)
        assert_close_nonpad(out, want, None, EXACT_REWRITE)
    records = _new_records(before)
    assert sum(r.compiled and "reused" not in r.reason for r in records) == 1
    assert records[0].model.plan.budget is not None                     # calibrated, on the data given


class _Chatty(nn.Module):
    """A causal LM whose forward prints between the embedding and the blocks: a graph break."""

    def __init__(self, lm):
        super().__init__()
        self.lm = lm

    def forward(self, input_ids, attention_mask):
        h = self.lm.get_input_embeddings()(input_ids)
        print("embedded", tuple(h.shape))
        return self.lm(inputs_embeds=h, attention_mask=attention_mask)


def test_graph_break_compiles_the_piece_with_blocks(caplog, capsys):
    torch._dynamo.reset()
    entry = ZOO["llama"]
    model = _Chatty(entry.build()).eval()
    before = len(dynamo_backend.compiled_pieces())
    opt = torch.compile(model, backend=routefx_backend, dynamic=True)
    with caplog.at_level(logging.INFO, logger="routefx.dynamo"):
        for b, s, pad in SHAPES[:2]:
            out, mask = _call(opt, entry, b, s, pad)
            ref, _ = _call(model, entry, b, s, pad)
            assert_close_nonpad(out, ref, mask, EXACT_REWRITE)
    assert "embedded" in capsys.readouterr().out
    records = _new_records(before)
    compiled = [r for r in records if r.compiled]
    as_is = [r for r in records if not r.compiled]
    assert compiled and "3 transformer blocks compiled" in compiled[0].reason
    assert "h" in compiled[0].inputs                                    # the embedded tokens, after the print
    assert as_is and all("NoBlocksError" in r.reason for r in as_is)    # the embedding alone
    assert "runs as Dynamo captured it" in caplog.text and "compiled a piece" in caplog.text


def _counting(calls: list):
    """routefx_backend, recording each graph Dynamo hands it (one per compile or recompile)."""
    def backend(gm, example_inputs, **kw):
        calls.append(gm)
        return routefx_backend(gm, example_inputs, **kw)
    return backend


def _count_calibrations(monkeypatch) -> list:
    import routefx.compiler.compile as compile_module
    calls, real = [], compile_module.calibrate
    monkeypatch.setattr(compile_module, "calibrate", lambda *a, **k: calls.append(1) or real(*a, **k))
    return calls


def test_default_torch_compile_recompiles_once_for_new_lengths(monkeypatch):
    """Without dynamic=True Dynamo first hands a graph specialised to the first call's shapes, then (automatic
    dynamic shapes) one graph with a dynamic length: four lengths cost two backend compiles, never one per call,
    and routing's data-dependent shapes (other token ids, other routes) cost none. A Duo plan runs on both graphs
    and equals routefx.compile with that plan, without calibrating again."""
    torch._dynamo.reset()
    entry = ZOO["llama"]
    model = entry.build()
    cm = routefx.compile(model, Duo(budget=0.5, router="local", small="nested"), calibration=batches(entry))
    calibrations = _count_calibrations(monkeypatch)
    graphs = []
    opt = torch.compile(model, backend=_counting(graphs), options={"policy": cm.plan})
    for i, s in enumerate([7, 11, 5, 13]):
        out, mask = _call(opt, entry, 2, s, 1, seed=i)
        ref, _ = _call(cm, entry, 2, s, 1, seed=i)
        dense, _ = _call(model, entry, 2, s, 1, seed=i)
        assert_close_nonpad(out, ref, mask, EXACT_REWRITE)
        assert (out.logits - dense.logits).abs().max() > MUST_DIFFER        # the routing did run
    assert len(graphs) == 2, [len(g.graph.nodes) for g in graphs]
    for seed in range(6):                        # other tokens, so other routes, at seen and unseen lengths
        out, mask = _call(opt, entry, 2, 3 + seed, 0, seed=50 + seed)
        ref, _ = _call(cm, entry, 2, 3 + seed, 0, seed=50 + seed)
        assert_close_nonpad(out, ref, mask, EXACT_REWRITE)
    assert len(graphs) == 2 and calibrations == []
    for b, s in [(1, 6), (3, 9), (4, 4)]:         # other batch sizes: Dynamo specialises a batch of 1 on its own
        out, mask = _call(opt, entry, b, s, 0, seed=b)
        ref, _ = _call(cm, entry, b, s, 0, seed=b)
        assert_close_nonpad(out, ref, mask, EXACT_REWRITE)
    assert len(graphs) <= 4 and calibrations == []
    reasons = [r.reason for r in dynamo_backend.compiled_pieces() if r.compiled]
    assert "attention_mask[2, 7]" in reasons[0]                           # the static graph first
    assert "recompiled with the plan of the same piece (no calibration)" in reasons[1]
    assert "attention_mask[2, *]" in reasons[1]                           # then a dynamic length


def test_static_piece_calibrates_once_and_the_recompile_reuses_its_plan(monkeypatch):
    """A first call at the calibration batches' shape: the static piece is calibrated on them; Dynamo's dynamic
    recompile reuses that plan (one calibration in all) and equals routefx.compile with the same policy."""
    torch._dynamo.reset()
    entry = ZOO["plain_parallel"]
    model = entry.build()
    cal = batches(entry)                                   # [4, 16] each
    ref = routefx.compile(model, Duo(budget=0.5, router="random", small="nested"), calibration=cal)
    calibrations = _count_calibrations(monkeypatch)
    graphs = []
    opt = torch.compile(model, backend=_counting(graphs),
                        options={"policy": Duo(budget=0.5, router="random", small="nested"), "calibration": cal})
    for s in (16, 9, 5, 12):
        out, _ = _call(opt, entry, 4, s, 0, seed=s)
        want, _ = _call(ref, entry, 4, s, 0, seed=s)
        assert_close_nonpad(out, want, None, EXACT_REWRITE)
    assert len(graphs) == 2 and len(calibrations) == 1


def test_static_piece_with_calibration_of_other_shapes_is_refused():
    torch._dynamo.reset()
    entry = ZOO["plain_parallel"]
    opt = torch.compile(entry.build(), backend=routefx_backend,
                        options={"policy": Duo(budget=0.5, router="random", small="nested"),
                                 "calibration": batches(entry)})
    with pytest.raises(Exception, match=r"Dynamo specialised a piece to the shapes of its first call \(input_ids"
                                        r"\[2, 7\]; \* = any size\) and Duo\(.*whose batches have shapes "
                                        r"input_ids\[4, 16\].*dynamic=True") as info:
        _call(opt, entry, 2, 7, 0)
    inner = getattr(info.value, "inner_exception", info.value)           # Dynamo may wrap backend errors
    assert isinstance(inner, BackendError)


def test_backend_found_through_the_entry_point_without_importing_routefx(tmp_path):
    """A fresh process where routefx is installed (here: a distribution on sys.path with the entry point from
    pyproject.toml) and never imported before torch.compile."""
    dist = tmp_path / "routefx_entrypoint_test-0.dist-info"
    dist.mkdir()
    (dist / "METADATA").write_text("Metadata-Version: 2.1\nName: routefx-entrypoint-test\nVersion: 0\n")
    (dist / "entry_points.txt").write_text("[torch_dynamo_backends]\n"
                                           "routefx = routefx.compiler.dynamo_backend:routefx_backend\n")
    script = textwrap.dedent("""
        import sys, torch
        from tests.zoo import ZOO, example_inputs
        entry = ZOO["plain_parallel"]
        model = entry.build()
        args, _ = example_inputs(entry, batch=3, seq=6)
        assert "routefx" not in sys.modules
        opt = torch.compile(model, backend="routefx", dynamic=True)
        with torch.no_grad():
            err = (opt(*args) - model(*args)).abs().max().item()
        from routefx.compiler.dynamo_backend import compiled_pieces
        assert [p.compiled for p in compiled_pieces()] == [True], compiled_pieces()
        print("err", err)
    """)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([ROOT, str(tmp_path)])}
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=env, cwd=ROOT,
                          timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    err = float(proc.stdout.split("err")[-1])
    assert err <= EXACT_REWRITE


def test_two_models_of_one_architecture_do_not_share_a_compiled_piece():
    torch._dynamo.reset()
    entry = ZOO["plain_parallel"]
    options = {"policy": Dense()}                                  # one options object for both
    a = entry.build()
    b = entry.build()
    with torch.no_grad():
        for p in b.parameters():
            p.add_(0.05 * torch.randn_like(p))
    outs = []
    for model in (a, b):
        opt = torch.compile(model, backend=routefx_backend, dynamic=True, options=options)
        out, _ = _call(opt, entry, 3, 6, 0)
        ref, _ = _call(model, entry, 3, 6, 0)
        assert_close_nonpad(out, ref, None, EXACT_REWRITE)
        outs.append(out)
    assert (outs[0] - outs[1]).abs().max() > MUST_DIFFER


def test_backend_options_reach_the_target_and_unknown_ones_are_refused():
    torch._dynamo.reset()
    entry = ZOO["plain_sandwich"]
    model = entry.build()
    before = len(dynamo_backend.compiled_pieces())
    opt = torch.compile(model, backend=routefx_backend, options={
        "target": "onnx", "backend_options": {"optimization_level": "basic"}})
    out, mask = _call(opt, entry, 2, 7, 1, seed=3)
    ref, _ = _call(model, entry, 2, 7, 1, seed=3)
    assert_close_nonpad(out, ref, mask, ONNX_VS_EAGER)
    records = _new_records(before)
    assert records and records[0].compiled
    assert records[0].model.backend_options == {"optimization_level": "basic"}
    torch._dynamo.reset()
    bad = torch.compile(entry.build(), backend=routefx_backend, options={"backend_options": {"cudagraphs": True}})
    with pytest.raises(Exception, match=r"backend 'eager' has no option\(s\) \['cudagraphs'\]") as info:
        _call(bad, entry, 2, 7, 0)
    assert isinstance(getattr(info.value, "inner_exception", info.value), BackendError)


def test_batch_of_one_piece_logs_no_traceback(monkeypatch):
    """Dynamo specialises a batch of 1 (a second graph after a first call of batch 2): capture first tries that
    piece widened to a dynamic batch, which fails inside a meta kernel, then captures it as given. torch logs the
    failed attempt's traceback at ERROR level unless told not to; the user must see nothing of it."""
    torch._dynamo.reset()
    model = ZOO["llama"].build()
    opt = torch.compile(model, backend=routefx_backend)
    errors, handle = [], logging.Logger.callHandlers          # torch's loggers write to their own handlers
    monkeypatch.setattr(logging.Logger, "callHandlers", lambda self, record: (
        errors.append(record.getMessage()) if record.levelno >= logging.ERROR else None, handle(self, record)))
    for b, s in [(2, 10), (1, 7)]:
        ids = torch.randint(0, model.config.vocab_size, (b, s), generator=torch.Generator().manual_seed(b))
        with torch.no_grad():
            assert torch.equal(opt(ids).logits, model(ids).logits)
    assert errors == []
    reasons = [r.reason for r in dynamo_backend.compiled_pieces() if r.compiled]
    assert "[1, *]" in reasons[-1]                                      # the batch-of-1 piece, captured
