"""`routefx.compile`: capture, rewrite by a policy, hand the graph to a backend.

The compiled model is called like the original and returns the same output structure; it is inference-only
and never modifies the user's model (passes that change weights work on copies).
"""
from __future__ import annotations

import dataclasses
import time

import torch
from torch import fx, nn

from routefx.backends import get_backend
from routefx.compiler.calibration import normalize_calibration
from routefx.compiler.pipeline import build_pipeline
from routefx.compiler.policies import Policy
from routefx.compiler.report import CompileReport
from routefx.errors import InputError, PolicyError
from routefx.ir.capture import CaptureInfo, capture, normalize_inputs
from routefx.ir.model_ir import ModelIR
from routefx.ir.recognize import recognize
from routefx.passes.manager import PassManager

__all__ = ["compile", "CompiledModel"]


@dataclasses.dataclass
class _Entry:
    gm: fx.GraphModule
    ir: ModelIR
    report: CompileReport
    run: object


def _form(model: nn.Module, args: tuple, kwargs: dict) -> tuple:
    """What decides whether a captured graph can serve a call: arg count, keyword names, constant values."""
    consts = tuple(sorted((k, repr(v)) for k, v in kwargs.items() if not isinstance(v, torch.Tensor)))
    return (len(args), tuple(sorted(k for k, v in kwargs.items() if isinstance(v, torch.Tensor))), consts)


class CompiledModel:
    """A model compiled by routefx. Call it like the original model."""

    def __init__(self, model: nn.Module, policy: Policy, *, calibration=None, backend: str = "eager",
                 debug_dir: str | None = None):
        self._model = model
        self.policy = policy
        self.backend = backend
        self._backend = get_backend(backend)
        self._calibration = None if calibration is None else normalize_calibration(calibration)
        if policy.needs_calibration and self._calibration is None:
            normalize_calibration(None)  # raises with the explanation
        self._debug_dir = debug_dir
        self._entries: dict[tuple, _Entry] = {}
        self._last: _Entry | None = None

    # -- compilation ---------------------------------------------------------------------------------------
    def _compile(self, args: tuple, kwargs: dict) -> _Entry:
        t0 = time.perf_counter()
        gm = capture(self._model, args, kwargs)
        t1 = time.perf_counter()
        ir_before = recognize(gm)
        manager = PassManager(build_pipeline(self.policy), debug_dir=self._debug_dir)
        ir, reports = manager.run(gm, policy=self.policy)
        notes = []
        moe = [b.index for b in ir.blocks if b.ffn is not None and b.ffn.kind == "moe"]
        if moe:
            notes.append(f"MoE blocks {moe} run as captured (not yet compiled to routed_ffn)")
        report = CompileReport(policy=self.policy.to_dict(), backend=self.backend, ir_before=ir_before.to_dict(),
                               ir_after=ir.to_dict(), passes=reports, notes=notes,
                               capture_seconds=round(t1 - t0, 3), compile_seconds=round(time.perf_counter() - t1, 3))
        return _Entry(gm, ir, report, self._backend.prepare(gm))

    def _entry(self, args: tuple, kwargs: dict) -> _Entry:
        key = _form(self._model, args, kwargs)
        if key not in self._entries:
            self._entries[key] = self._compile(args, kwargs)
        self._last = self._entries[key]
        return self._last

    # -- calling -------------------------------------------------------------------------------------------
    def __call__(self, *args, **kwargs):
        args, kwargs = normalize_inputs(self._model, args, kwargs)
        entry = self._entry(args, kwargs)
        _check_inputs(entry.gm, args, kwargs)
        with torch.no_grad():
            return entry.run(*args, **kwargs)

    # -- introspection -------------------------------------------------------------------------------------
    def _require(self) -> _Entry:
        if self._last is None:
            raise RuntimeError("this model compiles on its first call (no example_inputs were given); call it "
                               "once first")
        return self._last

    @property
    def graph_module(self) -> fx.GraphModule:
        return self._require().gm

    @property
    def ir(self) -> ModelIR:
        return self._require().ir

    @property
    def report(self) -> CompileReport:
        return self._require().report

    def __repr__(self) -> str:
        state = "compiled" if self._last else "not yet compiled"
        return f"CompiledModel({type(self._model).__name__}, {self.policy!r}, backend={self.backend!r}, {state})"


def _check_inputs(gm: fx.GraphModule, args: tuple, kwargs: dict) -> None:
    info: CaptureInfo = gm.meta["routefx"]
    given = dict(zip(info.arg_names, args)) | kwargs
    for n in gm.graph.nodes:
        if n.op != "placeholder":
            continue
        v = n.meta.get("val")
        x = given.get(n.target)
        if not isinstance(v, torch.Tensor) or x is None:
            continue
        if not isinstance(x, torch.Tensor):
            raise InputError(f"input {n.target!r} is a {type(x).__name__}; the compiled model takes a tensor of "
                             f"dtype {v.dtype} and rank {v.dim()}")
        if x.dtype != v.dtype or x.dim() != v.dim():
            raise InputError(f"input {n.target!r} has dtype {x.dtype} and rank {x.dim()}; the compiled model "
                             f"takes dtype {v.dtype} and rank {v.dim()} (as in the example it was captured from)")


def compile(model: nn.Module, policy: Policy, *, example_inputs=None, example_kwargs=None, calibration=None,
            backend: str = "eager", debug_dir: str | None = None) -> CompiledModel:
    """Compile `model` by `policy`.

    Without `example_inputs` the model is captured on its first call (and again if the keyword arguments change
    form). `calibration` is a re-iterable sequence of batches (dicts of keyword arguments; a bare tensor means
    input_ids). `debug_dir` receives the graph after each pass.
    """
    if not isinstance(policy, Policy):
        raise PolicyError(f"policy must be a routefx policy (e.g. routefx.policies.Dense()), got "
                          f"{type(policy).__name__}")
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    cm = CompiledModel(model, policy, calibration=calibration, backend=backend, debug_dir=debug_dir)
    if example_inputs is not None:
        args, kwargs = normalize_inputs(model, example_inputs, example_kwargs)
        _check_example(args, kwargs)
        cm._entry(args, kwargs)
    return cm


def _check_example(args, kwargs):
    for k, v in list(zip(range(len(args)), args)) + list(kwargs.items()):
        if isinstance(v, torch.Tensor) and v.dim() == 0:
            raise InputError(f"example input {k!r} is a scalar tensor; routefx needs [batch, seq, ...] inputs")


