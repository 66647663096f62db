"""`routefx.compile`: capture, calibrate, rewrite by a policy, hand the graph to a backend.

The compiled model is called like the original and returns the same output structure; it is inference-only
and never modifies the user's model (passes that change weights work on copies).
"""
from __future__ import annotations

import dataclasses
import inspect as _inspect
import time
import warnings

import torch
from torch import fx, nn

from routefx.backends import configure
from routefx.calibrate.budget import RouteStats, route_stats
from routefx.calibrate.data import complete_batches, normalize_calibration
from routefx.calibrate.record import data_dependent_sizes, observe_routes
from routefx.calibrate.stage import calibrate
from routefx.compiler.pipeline import build_pipeline, recognize_for
from routefx.compiler.plan import Plan
from routefx.compiler.plan_io import check_fingerprint, fingerprint
from routefx.compiler.policies import Policy, policy_from_dict
from routefx.compiler.report import CompileReport
from routefx.compiler.validate import check_inputs
from routefx.errors import (BackendError, CalibrationError, CaptureError, InputError, NotCompiledError,
                            PlanMismatchError, PolicyError)
from routefx.ir.capture import capture, normalize_inputs
from routefx.ir.flops import FlopCount, count_flops, data_dependent_symbols, dynamic_routed, realised_flops
from routefx.ir.guards import InputGuards, input_guards
from routefx.ir.model_ir import ModelIR
from routefx.passes.manager import PassManager

__all__ = ["compile", "CompiledModel"]


@dataclasses.dataclass
class _Entry:
    gm: fx.GraphModule
    ir: ModelIR
    plan: Plan
    flops: FlopCount
    report: CompileReport
    run: object
    guards: InputGuards = dataclasses.field(default_factory=lambda: InputGuards(None))


def _canonical(model: nn.Module, args, kwargs) -> dict:
    """All inputs as keyword arguments (HF models get use_cache=False)."""
    args, kwargs = normalize_inputs(model, args, kwargs)
    sig = _inspect.signature(model.forward)
    try:
        bound = sig.bind(*args, **kwargs)
    except TypeError as e:
        raise InputError(f"inputs do not match {type(model).__name__}.forward{sig}: {e}") from None
    out = {}
    for name, value in bound.arguments.items():
        kind = sig.parameters[name].kind
        if kind is _inspect.Parameter.VAR_KEYWORD:
            out.update(value)
        elif kind is _inspect.Parameter.VAR_POSITIONAL:
            if value:
                raise InputError(f"{type(model).__name__}.forward takes *{name}; routefx needs named inputs")
        else:
            out[name] = value
    return out


def _form(kwargs: dict) -> tuple:
    """What decides whether a captured graph can serve a call: tensor keyword names and constant values."""
    consts = tuple(sorted((k, repr(v)) for k, v in kwargs.items() if not isinstance(v, torch.Tensor)))
    return tuple(sorted(k for k, v in kwargs.items() if isinstance(v, torch.Tensor))), consts


def _check_fits(plan: Plan, ir: ModelIR) -> None:
    missing = sorted(set(plan.layers) - {b.key for b in ir.blocks})
    if missing or len(plan.block_paths) != len(ir.blocks):
        raise PlanMismatchError(f"plan does not fit this graph: layers {missing} not found, or "
                                f"{len(plan.block_paths)} blocks planned vs {len(ir.blocks)} found")


def _flops_summary(before: FlopCount, after: FlopCount, seq: int, realised: dict | None) -> dict:
    b, a = before.at(seq), after.at(seq)
    return {"realised": realised, "S": seq, "before": b["total"], "after": a["total"], "ratio": a["total"] / b["total"] if b["total"] else None,
            "before_expr": str(before.total), "after_expr": str(after.total),
            "dynamic_routes": after.dynamic_routes, "blocks_before": b["blocks"], "blocks_after": a["blocks"]}


def _without_values(model: nn.Module) -> bool:
    return any(p.device.type == "meta" for p in model.parameters())


class CompiledModel:
    """A model compiled by routefx. Call it like the original model."""

    def __init__(self, model: nn.Module, policy: Policy | Plan, *, calibration=None, backend: str = "eager",
                 debug_dir: str | None = None, backend_options: dict | None = None):
        self._model = model
        self._plan: Plan | None = None            # calibrated once, then reused for every input form
        self._plan_given = isinstance(policy, Plan)
        if self._plan_given:
            check_fingerprint(policy.fingerprint or {"params": {}}, model)
            self._plan, policy = policy, policy_from_dict(policy.policy)
        self.policy = policy
        self.backend = backend
        self.backend_options = dict(backend_options or {})
        self._backend = configure(backend, self.backend_options)
        self._calibration = None
        if calibration is not None:
            batches = normalize_calibration(calibration)
            self._calibration = complete_batches([_canonical(model, (), b) for b in batches])
        if _without_values(model) and backend != "eager":
            raise BackendError(f"the model's parameters are on the meta device (shapes without values): only the "
                               f"eager backend runs such a model (it computes output shapes), not {backend!r}")
        if policy.needs_calibration and self._plan is None and _without_values(model):
            raise CalibrationError(f"{policy!r} calibrates on the model's weights, but its parameters are on the "
                                   "meta device (shapes without values); calibration needs real weights: load "
                                   "them first, or compile with a policy that needs none (Dense(), "
                                   "PruneLayers(layers=[...])) or with a plan made on the real model")
        if policy.needs_calibration and self._calibration is None and self._plan is None:
            raise CalibrationError(f"{policy!r} needs calibration data: pass calibration=[batch, ...] (dicts of "
                                   "the model's keyword arguments, or input_ids tensors)")
        self._debug_dir = debug_dir
        self._entries: dict[tuple, _Entry] = {}
        self._fixed: dict[tuple, dict[str, set[int]]] = {}   # form -> {input: dims its capture fixed}
        self._guarded: dict[tuple, list[_Entry]] = {}   # key -> entries for sizes outside its entry's guards
        self._last: _Entry | None = None

    # -- compilation ---------------------------------------------------------------------------------------
    def _compile(self, kwargs: dict) -> _Entry:
        """Capture for this input form; plan (calibrate the first time only); rewrite; tune; lower."""
        t0 = time.perf_counter()
        gm = capture(self._model, (), kwargs)
        guards = input_guards(gm)     # before any pass: the sizes this capture holds for
        if guards.check(kwargs) is not None:
            gm, guards = self._capture_as_given(kwargs, gm, guards)
        ir_before, blockless = recognize_for(self.policy, gm)
        sizes = data_dependent_sizes(gm, kwargs)   # None, and no run, where every size is the batch's or length's
        flops_before = count_flops(gm, ir_before, sizes)
        t1 = time.perf_counter()
        fresh = self._plan is None
        batches = self._calibration if fresh else None     # fresh: kwargs has the calibration data's form
        if fresh:
            plan = calibrate(self.policy, gm, ir_before, batches)
            plan.fingerprint = fingerprint(self._model)
        else:
            plan = self._plan
            _check_fits(plan, ir_before)
        t2 = time.perf_counter()
        pipeline = build_pipeline(self.policy)
        if blockless is None:
            ir, reports = PassManager(pipeline.passes, debug_dir=self._debug_dir).run(gm, ir_before, plan)
        else:  # nothing for a pass to read
            ir, reports = ir_before, []
        t3 = time.perf_counter()
        notes = [] if blockless is None else [blockless]
        if getattr(gm.meta.get("routefx"), "reused_export", False):
            notes.append("capture reused torch.export's result of an earlier capture of this model, or of one built "
                         "the same way, with inputs of this form, bound to this model's tensors "
                         "(routefx.clear_capture_cache() forgets it)")
        written = getattr(gm.meta.get("routefx"), "state_writes", None)
        if written:
            notes.append(f"the forward writes {len(written)} buffer(s) in place ({', '.join(written[:3])}"
                         f"{', ...' if len(written) > 3 else ''}: a cache kept in module state); the compiled graph "
                         "reads the written values back within each call and leaves the model's buffers unchanged")
        if fresh and batches is not None:
            for step in pipeline.tune:
                notes += step(gm, ir, plan, batches, self.policy.budget)
        elif not fresh:
            notes.append("rebuilt from a plan: no calibration" if self._plan_given else
                         f"plan reused for inputs {sorted(_form(kwargs)[0])}: no calibration")
        self._plan = plan
        t4 = time.perf_counter()
        if not data_dependent_symbols(gm) <= (sizes or {}).keys():   # sizes a pass made: one more run
            sizes = data_dependent_sizes(gm, kwargs)
        flops = count_flops(gm, ir, sizes)
        if sizes is not None:
            notes.append("some matrix products' sizes depend on the data (experts' rows): their FLOPs are counted "
                         "at the example input's run")
        realised = None
        t5 = time.perf_counter()
        if flops.dynamic_routes and batches is not None:    # runs the graph on the calibration data: calibration
            routed = dynamic_routed(gm, flops)
            realised = {"calibration": realised_flops(flops, observe_routes(gm, routed, batches)),
                        "dense_calibration": realised_flops(flops_before, observe_routes(gm, [], batches))}
        t6 = time.perf_counter()
        moe = [b.index for b in ir.blocks if b.ffn is not None and b.ffn.kind == "moe" and b.ffn.routed is None]
        if moe:
            notes.append(f"MoE blocks {moe} run as captured (not yet compiled to routed_ffn)")
        seq = next(v for v in kwargs.values() if isinstance(v, torch.Tensor)).shape[-1]
        report = CompileReport(policy=self.policy.to_dict(), backend=self.backend, ir_before=ir_before.to_dict(),
                               ir_after=ir.to_dict(), passes=reports, notes=notes, plan=plan.to_dict(),
                               flops_per_token=_flops_summary(flops_before, flops, int(seq), realised),
                               capture_seconds=round(t1 - t0, 3),
                               calibration_seconds=round(t2 - t1 + t4 - t3 + t6 - t5, 3),
                               compile_seconds=round(t3 - t2 + t5 - t4 + time.perf_counter() - t6, 3))
        run = self._backend.prepare(gm, kwargs)
        report.notes += list(getattr(run, "notes", ()))  # backend "auto" says which candidate it kept
        return _Entry(gm, ir, plan, flops, report, run, guards)

    def _capture_as_given(self, kwargs: dict, gm, guards: InputGuards):
        """A capture that holds for `kwargs`, where the one that exported a batch or length of 1 at 2 does not:
        the model's code fixed that size at 2 (Jamba fixes its length). The length kept as given first, then the
        batch, then both; the first capture where none holds (the caller says why)."""
        b, s = gm.meta["routefx"].widened
        for widen in [(True, False), (False, True), (False, False)]:
            if (widen[0] or b) and (widen[1] or s) and widen != (True, True):
                again = capture(self._model, (), kwargs, widen=widen)
                held = input_guards(again)
                if held.check(kwargs) is None:
                    return again, held
        return gm, guards

    def _key(self, kwargs: dict) -> tuple:
        """The entry key of a call: its form, and the sizes of the dims an earlier capture of that form found
        fixed by the model's code (`CaptureInfo.fixed_dims`; one graph per size then)."""
        form = _form(kwargs)
        fixed = self._fixed.get(form)
        if not fixed:
            return form
        return form, tuple((n, d, int(kwargs[n].shape[d])) for n, dims in sorted(fixed.items())
                           for d in sorted(dims) if isinstance(kwargs.get(n), torch.Tensor) and kwargs[n].dim() > d)

    def _entry(self, kwargs: dict) -> _Entry:
        key = self._key(kwargs)
        if key not in self._entries:
            if self._plan is None and self._calibration is not None and _form(kwargs) != _form(self._calibration[0]):
                self._entry(self._calibration[0])      # calibrate once, on the calibration data's own form
                key = self._key(kwargs)
        if key not in self._entries:
            entry = self._compile(kwargs)
            fixed = getattr(entry.gm.meta.get("routefx"), "fixed_dims", None)
            form = _form(kwargs)
            if form in self._fixed:
                sizes = fixed or {n: {d: int(kwargs[n].shape[d]) for d in dims}
                                  for n, dims in self._fixed[form].items() if isinstance(kwargs.get(n), torch.Tensor)}
                warnings.warn(f"{type(self._model).__name__}: the captured graph fixes input sizes "
                              f"{sizes} (the model's code turns them into constants), so routefx compiled it "
                              "again for these sizes; each new size compiles once more", RuntimeWarning,
                              stacklevel=3)
            if fixed:
                self._fixed.setdefault(form, {}).update({n: set(d) for n, d in fixed.items()})
                key = self._key(kwargs)
            self._entries[key] = entry
        entry = self._entries[key]
        why = entry.guards.check(kwargs)
        if why is not None:
            check_inputs(entry.gm, kwargs, fixed_sizes=False)   # a malformed input is refused, not recompiled
            entry = self._within_guards(key, kwargs, why)
        self._last = entry
        return self._last

    def _within_guards(self, key: tuple, kwargs: dict, why: str) -> _Entry:
        """An entry whose capture holds for these inputs' sizes, where the key's first one does not (export's
        guards: `routefx.ir.guards`): an earlier one, else one compiled for these sizes (the plan reused)."""
        others = self._guarded.setdefault(key, [])
        for e in others:
            if e.guards.check(kwargs) is None:
                return e
        warnings.warn(f"{type(self._model).__name__}: the graph captured for earlier inputs holds for other sizes "
                      f"than these (torch.export's guard: {why.removeprefix('Guard failed: ')}), so routefx "
                      "compiled it again for these sizes", RuntimeWarning, stacklevel=4)
        entry = self._compile(kwargs)
        if (still := entry.guards.check(kwargs)) is not None:
            raise CaptureError(f"{type(self._model).__name__}: the graph captured for these inputs does not hold "
                               f"for them (torch.export's guard: {still})")
        others.append(entry)
        return entry

    # -- calling -------------------------------------------------------------------------------------------
    def __call__(self, *args, **kwargs):
        kwargs = _canonical(self._model, args, kwargs)
        entry = self._entry(kwargs)
        kwargs = check_inputs(entry.gm, kwargs)  # same checks on every backend, before running
        with torch.no_grad():
            return entry.run(**kwargs)

    def generate(self, input_ids, attention_mask=None, **kwargs) -> torch.Tensor:
        """Greedy or sampled generation with a KV cache (`routefx.generate`); returns [B, S + new] token ids."""
        from routefx.generate import generate
        return generate(self, input_ids, attention_mask, **kwargs)

    def _batch_entry(self, batches) -> tuple[_Entry, list[dict]]:
        batches = complete_batches([_canonical(self._model, (), b) for b in normalize_calibration(batches)])
        return self._entry(batches[0]), batches

    def flops_per_token(self, batches) -> float:
        """Mean FLOPs per real (non-padding) token on `batches`, with the routes the model takes on them."""
        entry, batches = self._batch_entry(batches)
        return realised_flops(entry.flops, observe_routes(entry.gm, dynamic_routed(entry.gm, entry.flops), batches))

    def route_stats(self, batches) -> RouteStats:
        """Run the routers on `batches`: realised budget and per-layer mix of routes, over real tokens."""
        entry, batches = self._batch_entry(batches)
        return route_stats(entry.gm, entry.ir, batches)

    # -- introspection -------------------------------------------------------------------------------------
    def _require(self, what: str = "the compiled graph, plan and report do not exist yet") -> _Entry:
        if self._last is None:
            raise NotCompiledError(f"{what}: this model compiles on its first call (no example_inputs were given to "
                                   "routefx.compile); call it once first, e.g. cm(input_ids, attention_mask=mask), or "
                                   "compile with example_inputs")
        return self._last

    @property
    def graph_module(self) -> fx.GraphModule:
        return self._require().gm

    @property
    def ir(self) -> ModelIR:
        return self._require().ir

    @property
    def runner(self):
        """What the backend runs (the fx graph for eager, an `OnnxRunner` for onnx, an `InductorRunner` for
        inductor, an `AutoRunner` wrapping the fastest candidate for auto)."""
        return self._require().run

    @property
    def plan(self) -> Plan:
        return self._require().plan

    @property
    def report(self) -> CompileReport:
        return self._require().report

    def __repr__(self) -> str:
        state = "compiled" if self._last else "not yet compiled"
        return f"CompiledModel({type(self._model).__name__}, {self.policy!r}, backend={self.backend!r}, {state})"




def _warn_if_training(model: nn.Module) -> None:
    """A model in training mode whose output depends on it (dropout with p > 0, as a module or a config's
    probability; a batch norm) is compiled as in eval mode: say so, once, rather than differ from it silently."""
    if not model.training:
        return
    why = [f"{type(m).__name__}(p={m.p})" if isinstance(m, nn.modules.dropout._DropoutNd) else type(m).__name__
           for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)
           or isinstance(m, nn.modules.dropout._DropoutNd) and m.p > 0]
    cfg = getattr(model, "config", None)
    if cfg is not None and hasattr(cfg, "to_dict"):
        why += [f"config.{k}={v}" for k, v in cfg.to_dict().items()
                if ("dropout" in k or "pdrop" in k) and isinstance(v, float) and v > 0]
    if why:
        shown = ", ".join(sorted(set(why))[:4]) + (", ..." if len(set(why)) > 4 else "")
        warnings.warn(f"{type(model).__name__} is in training mode ({shown}): routefx compiles for inference and "
                      "runs it as model.eval() would (no dropout); call model.eval() first to compare outputs with "
                      "it", UserWarning, stacklevel=3)


def compile(model: nn.Module, policy: Policy, *, example_inputs=None, example_kwargs=None, calibration=None,
            backend: str = "eager", debug_dir: str | None = None,
            backend_options: dict | None = None) -> CompiledModel:
    """Compile `model` by `policy`.

    Without `example_inputs` the model is captured on the first calibration batch if there is calibration data,
    else on its first call (and again whenever the keyword arguments change form). `calibration` is a
    re-iterable sequence of batches (dicts of keyword arguments; a bare tensor means input_ids); padding
    positions are excluded from every statistic. `debug_dir` receives the graph after each pass.
    `backend_options` are keyword options of the backend's `prepare` (e.g. `{"cudagraphs": True}` for backend
    "triton"); an option the backend does not have raises `BackendError`.
    """
    if not isinstance(policy, (Policy, Plan)):
        raise PolicyError(f"policy must be a routefx policy (e.g. routefx.policies.Dense()) or a Plan, got "
                          f"{type(policy).__name__}")
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    _warn_if_training(model)
    cm = CompiledModel(model, policy, calibration=calibration, backend=backend, debug_dir=debug_dir,
                       backend_options=backend_options)
    if example_inputs is not None:
        kwargs = _canonical(model, example_inputs, example_kwargs)
        for k, v in kwargs.items():
            if isinstance(v, torch.Tensor) and v.dim() == 0:
                raise InputError(f"example input {k!r} is a scalar tensor; routefx needs [batch, seq, ...] inputs")
        cm._entry(kwargs)
    elif cm._calibration is not None:
        cm._entry(cm._calibration[0])
    return cm
