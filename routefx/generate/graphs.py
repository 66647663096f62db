"""The compiled generation graphs of a `CompiledModel`: its plan applied to the prefill and decode captures.

One plan for every graph: calibration runs once (on the calibration data's form, as for any other input form),
and the prefill and decode captures are rewritten by the same passes from that plan (Duo routers, small branches,
pruned blocks). Routing an FFN leaves attention and the cache untouched; a pruned block's layer has no cache
entry (see `routefx.generate.step`). The graphs are then lowered by the model's backend.
"""
from __future__ import annotations

import dataclasses
import time

from torch import fx

from routefx.calibrate.stage import calibrate
from routefx.compiler.pipeline import build_pipeline, recognize_for
from routefx.compiler.plan import Plan
from routefx.compiler.plan_io import fingerprint
from routefx.errors import CaptureError, PlanMismatchError, UnsupportedModelError
from routefx.generate.split import drop_empty_cats_
from routefx.generate.step import CacheLayout, cache_names, capture_decode, capture_prefill, probe_cache
from routefx.ir.model_ir import ModelIR
from routefx.passes.manager import PassManager

__all__ = ["GenerationGraphs", "generation_graphs"]


@dataclasses.dataclass
class Graph:
    """A rewritten generation graph; lowered by the backend on first use of `run` (a decode policy runs the
    decode graph's pieces instead, and never needs the whole decode graph lowered)."""

    gm: fx.GraphModule
    ir: ModelIR
    seconds: float               # capture, passes and (once done) lowering
    _lower: object = dataclasses.field(default=None, repr=False)
    _run: object = dataclasses.field(default=None, repr=False)

    @property
    def run(self):
        """The backend's callable: run(**kwargs) -> (logits, key_i, value_i, ...)."""
        if self._run is None:
            t0 = time.perf_counter()
            self._run = self._lower()
            self.seconds += time.perf_counter() - t0
        return self._run


@dataclasses.dataclass
class GenerationGraphs:
    layout: CacheLayout
    kept: list[int]              # cached layers that keep a cache entry (not pruned), in order
    prefill: Graph
    decode: Graph
    plan: Plan

    @property
    def past_names(self) -> list[str]:
        return cache_names(self.kept, "past_")


def _plan(cm, gm: fx.GraphModule, ir: ModelIR) -> Plan:
    """The model's plan: the one it has; else calibrated once on the calibration data's form; else (policies
    without calibration data) made from this capture."""
    if cm._plan is None and cm._calibration is not None:
        cm._entry(cm._calibration[0])
    if cm._plan is None:
        plan = calibrate(cm.policy, gm, ir, None)
        plan.fingerprint = fingerprint(cm._model)
        cm._plan = plan
    return cm._plan


def _check_fits(plan: Plan, ir: ModelIR, layout: CacheLayout) -> None:
    paths = [b.path for b in ir.blocks]
    if paths != list(plan.block_paths):
        raise PlanMismatchError(f"the generation graph has blocks {paths}; the plan was made for "
                                f"{list(plan.block_paths)}")
    if plan.pruned and len(ir.blocks) != layout.layers:
        raise PlanMismatchError(f"{len(ir.blocks)} blocks but {layout.layers} cached layers: routefx cannot tell "
                                "which cache entry a pruned block owns")


def _lower(cm, gm: fx.GraphModule, example: dict, plan: Plan, layout: CacheLayout) -> Graph:
    t0 = time.perf_counter()
    ir_before, blockless = recognize_for(cm.policy, gm)
    _check_fits(plan, ir_before, layout)
    ir = ir_before if blockless else PassManager(build_pipeline(cm.policy).passes, debug_dir=None).run(
        gm, ir_before, plan)[0]
    drop_empty_cats_(gm)          # the cache seeded with the past: cat([empty, past]) copied the past every step
    return Graph(gm, ir, time.perf_counter() - t0, lambda: cm._backend.prepare(gm, example))


def generation_graphs(cm) -> GenerationGraphs:
    """The prefill and decode graphs of `cm` (compiled on first use, then kept on `cm`)."""
    cached = cm.__dict__.get("_generation_graphs")
    if cached is not None:
        return cached
    if (failed := cm.__dict__.get("_generation_graphs_error")) is not None:
        raise failed  # the model's cache could not be captured before: not again on every generate call
    model = cm._model
    try:
        layout = probe_cache(model)
        # the plan first (pruned layers decide the cache's inputs and outputs); an unpruned capture to make it
        gm, example = capture_prefill(model, layout, list(range(layout.layers)))
        plan = _plan(cm, gm, recognize_for(cm.policy, gm)[0])
        kept = [i for i in range(layout.layers) if i not in set(plan.pruned)]
        if plan.pruned:
            gm, example = capture_prefill(model, layout, kept)
        decode_capture = capture_decode(model, layout, kept)
    except (UnsupportedModelError, CaptureError) as e:
        cm.__dict__["_generation_graphs_error"] = e
        raise
    prefill = _lower(cm, gm, example, plan, layout)
    decode = _lower(cm, *decode_capture, plan, layout)
    graphs = GenerationGraphs(layout, kept, prefill, decode, plan)
    cm.__dict__["_generation_graphs"] = graphs
    return graphs
