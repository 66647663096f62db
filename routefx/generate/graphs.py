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
from routefx.generate.arrays import as_torch
from routefx.generate.split import drop_empty_cats_
from routefx.generate.step import CacheLayout, cache_names, capture_decode, capture_prefill, probe_cache
from routefx.ir.guards import InputGuards, input_guards
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
    guards: InputGuards = dataclasses.field(default_factory=lambda: InputGuards(None), repr=False)

    def fits(self, feeds: dict) -> bool:
        """Whether the inputs `feeds` (name -> tensor or array) are within the sizes the capture holds for
        (torch.export's guards: `routefx.ir.guards`)."""
        return self.outside(feeds) is None

    def outside(self, feeds: dict) -> str | None:
        """None where `feeds` are within the capture's guards; else the guard they fail."""
        return self.guards.check({k: as_torch(v) for k, v in feeds.items()})

    @property
    def run(self):
        """The backend's callable: run(**kwargs) -> (logits, key_i, value_i, ...)."""
        if self._run is None:
            t0 = time.perf_counter()
            self._run = self._lower()
            self.seconds += time.perf_counter() - t0
        return self._run


MAX_CAPTURES = 8   # prefill (or decode) graphs kept per compiled model for inputs outside the first one's guards


@dataclasses.dataclass
class GenerationGraphs:
    layout: CacheLayout
    kept: list[int]              # cached layers that keep a cache entry (not pruned), in order
    prefill: Graph               # the first capture of each (valid for every size within its guards: a model's
    decode: Graph                # code may branch on a length, e.g. attention over the top 2048 keys past 2048)
    plan: Plan
    _cm: object = dataclasses.field(default=None, repr=False)
    one_token: bool = False      # the decode graph takes one new token per row (the model's code takes no more)
    _more: dict = dataclasses.field(default_factory=dict, repr=False)   # "prefill" / "decode" -> later captures

    @property
    def past_names(self) -> list[str]:
        return cache_names(self.layout, self.kept, "past_")

    def prefill_for(self, feeds: dict) -> Graph:
        """A prefill graph valid for the sizes of `feeds` (captured again at those sizes where the first is not)."""
        return self._for("prefill", feeds)

    def decode_for(self, feeds: dict) -> Graph:
        return self._for("decode", feeds)

    def _for(self, kind: str, feeds: dict) -> Graph:
        first = getattr(self, kind)
        if first.fits(feeds):
            return first
        more = self._more.setdefault(kind, [])
        for g in more:
            if g.fits(feeds):
                return g
        model = self._cm._model
        capture = capture_prefill if kind == "prefill" else capture_decode
        example = {k: as_torch(v).clone() for k, v in feeds.items()}
        try:
            gm, example = capture(model, self.layout, self.kept, example)
        except (UnsupportedModelError, CaptureError) as e:
            raise CaptureError(f"the {kind} graph is valid for other input sizes than {_sizes(feeds)} and could "
                               f"not be captured again for these: {e}") from e
        g = _lower(self._cm, gm, example, self.plan, self.layout)
        if not g.fits(feeds):
            raise CaptureError(f"the {kind} graph captured for input sizes {_sizes(feeds)} does not accept them")
        more.append(g)
        del more[:-MAX_CAPTURES]
        return g


def _sizes(feeds: dict) -> dict:
    return {k: list(as_torch(v).shape) for k, v in list(feeds.items())[:3]}


def _known_plan(cm) -> Plan | None:
    """The model's plan where it has one or calibration data makes it (calibrated once, on that data's form)."""
    if cm._plan is None and cm._calibration is not None:
        cm._entry(cm._calibration[0])
    return cm._plan


def _plan(cm, gm: fx.GraphModule, ir: ModelIR) -> Plan:
    """The model's plan: the one it has; else calibrated once on the calibration data's form; else (policies
    without calibration data) made from this capture."""
    if _known_plan(cm) is None:
        plan = calibrate(cm.policy, gm, ir, None)
        plan.fingerprint = fingerprint(cm._model)
        cm._plan = plan
    return cm._plan


def _check_fits(plan: Plan, ir: ModelIR, layout: CacheLayout) -> None:
    if not plan.pruned and not plan.layers:
        return   # the plan rewrites no block (Dense): a step read as other blocks (a recurrent layer's one-token
        # update, a scan without a product of two activations, reads as an FFN) runs as it was captured
    paths = [b.path for b in ir.blocks]
    if paths != list(plan.block_paths):
        raise PlanMismatchError(f"the generation graph has blocks {paths}; the plan was made for "
                                f"{list(plan.block_paths)}")
    if plan.pruned and len(ir.blocks) != layout.layers:
        raise PlanMismatchError(f"{len(ir.blocks)} blocks but {layout.layers} cached layers: routefx cannot tell "
                                "which cache entry a pruned block owns")


def _lower(cm, gm: fx.GraphModule, example: dict, plan: Plan, layout: CacheLayout) -> Graph:
    t0 = time.perf_counter()
    guards = input_guards(gm)
    ir_before, blockless = recognize_for(cm.policy, gm)
    _check_fits(plan, ir_before, layout)
    ir = ir_before if blockless else PassManager(build_pipeline(cm.policy).passes, debug_dir=None).run(
        gm, ir_before, plan)[0]
    drop_empty_cats_(gm)          # the cache seeded with the past: cat([empty, past]) copied the past every step
    return Graph(gm, ir, time.perf_counter() - t0, lambda: cm._backend.prepare(gm, example), guards=guards)


def _decode_capture(model, layout: CacheLayout, kept: list[int]) -> tuple[tuple, bool]:
    """(the decode capture, whether it takes one new token only). A step of several new tokens (what speculative
    decoding verifies) that the model's code refuses (ProphetNet asserts one token per cached step) is captured
    on one token, as for recurrent layers."""
    try:
        return capture_decode(model, layout, kept), layout.recurrent
    except CaptureError as e:
        if layout.recurrent:
            raise
        try:
            return capture_decode(model, layout, kept, one_token=True), True
        except (UnsupportedModelError, CaptureError):
            raise e from None


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
        # the plan first (pruned layers decide the cache's inputs and outputs): the model's own, else made from an
        # unpruned capture
        every = list(range(layout.layers))
        gm = None
        if (plan := _known_plan(cm)) is None:
            gm, example = capture_prefill(model, layout, every)
            try:
                plan = _plan(cm, gm, recognize_for(cm.policy, gm)[0])
            except UnsupportedModelError:
                if not layout.recurrent:
                    raise
                # a recurrent state is a side output of its layer (a convolution's last inputs), which reads as a
                # value a later block reads when that layer is pruned: the plan from a capture without the cache
                # outputs
                bare, _ = capture_prefill(model, layout, [])
                plan = _plan(cm, bare, recognize_for(cm.policy, bare)[0])
        kept = [i for i in every if i not in set(plan.pruned)]
        if gm is None or plan.pruned:
            gm, example = capture_prefill(model, layout, kept)
        decode_capture, one_token = _decode_capture(model, layout, kept)
    except (UnsupportedModelError, CaptureError) as e:
        cm.__dict__["_generation_graphs_error"] = e
        raise
    try:
        prefill = _lower(cm, gm, example, plan, layout)
        decode = _lower(cm, *decode_capture, plan, layout)
    except PlanMismatchError as e:
        if not layout.recurrent:
            raise
        # a recurrent layer's one-token update can read as other blocks than its whole-sequence scan (OLMo-Hybrid's
        # delta rule step multiplies no two activations by a matmul: it reads as an FFN): generate runs uncached
        err = UnsupportedModelError(f"the plan cannot be applied to the generation graphs: {e}")
        cm.__dict__["_generation_graphs_error"] = err
        raise err from e
    graphs = GenerationGraphs(layout, kept, prefill, decode, plan, cm, one_token=one_token)
    cm.__dict__["_generation_graphs"] = graphs
    return graphs
