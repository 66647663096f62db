"""Pass manager: runs a declared pipeline, checking each pass's contract and verifying the graph after it.

For every pass: its `requires` on the graph it receives; the pass; `Cleanup` (dead code); `graph.lint()`,
`recompile()`, fake-tensor shape re-propagation and a fresh `ModelIR`; then the pass's `ensures` on the result.
A failure anywhere raises `PassFailedError` naming the pass and the passes that ran before it (a typed routefx
error from inside a pass keeps its type, with the pass named). With `debug_dir`, the graph is written after each
pass (`00_capture.txt`, `01_<pass>.txt`, ...).
"""
from __future__ import annotations

import dataclasses
import os
import time
from typing import Sequence

from torch import fx

from routefx.errors import RoutefxError
from routefx.ir.model_ir import ModelIR
from routefx.ir.recognize import recognize
from routefx.passes.base import Pass, PassContext
from routefx.passes.cleanup import Cleanup
from routefx.passes.fake_prop import propagate_changed_, propagate_shapes_

__all__ = ["PassManager", "PassReport", "PassFailedError"]


class PassFailedError(RoutefxError, RuntimeError):
    """A pass raised, broke its contract, or left a graph that fails verification."""


@dataclasses.dataclass
class PassReport:
    name: str
    rewrites: int
    misses: list[dict]
    notes: list[str]
    seconds: float
    dead_nodes_removed: int = 0     # by the cleanup after the pass

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


def _signature(gm: fx.GraphModule) -> dict[str, tuple]:
    """Each node's structure (kind, target, arguments) by name, to tell which nodes a pass added or changed."""
    return {n.name: (n.op, str(n.target), str(n.args), str(n.kwargs)) for n in gm.graph.nodes}


def _verify(gm: fx.GraphModule, changed: set[str] | None = None) -> ModelIR:
    """Lint, recompile, re-propagate shapes (all of them, or from the `changed` nodes on) and recognise."""
    gm.graph.lint()
    gm.recompile()
    if changed is None:
        propagate_shapes_(gm)
    else:
        propagate_changed_(gm, changed)
    return recognize(gm)


def _dump(debug_dir: str | None, i: int, name: str, gm: fx.GraphModule, ir: ModelIR) -> None:
    if debug_dir is None:
        return
    os.makedirs(debug_dir, exist_ok=True)
    with open(os.path.join(debug_dir, f"{i:02d}_{name}.txt"), "w") as f:
        f.write(f"# after {name}\n{ir}\n\n{gm.graph}\n")


class PassManager:
    """Runs `passes` in order on a graph it owns (passes rewrite it in place)."""

    def __init__(self, passes: Sequence[Pass], debug_dir: str | None = None):
        self.passes = list(passes)
        self.debug_dir = debug_dir
        self.cleanup = Cleanup()

    def run(self, gm: fx.GraphModule, ir: ModelIR | None = None, plan=None) -> tuple[ModelIR, list[PassReport]]:
        """Rewrite `gm` (recognised as `ir`, recognised here when None); returns the final IR and the reports."""
        ir = recognize(gm) if ir is None else ir
        _dump(self.debug_dir, 0, "capture", gm, ir)
        reports = []
        for i, p in enumerate(self.passes):
            where = f"pass '{p.name}'{_after([q.name for q in self.passes[:i]])}"
            t0 = time.perf_counter()
            ctx = PassContext(ir=ir, plan=plan)
            try:
                _check(where, "requires", p.requires(gm, ctx))
                before = _signature(gm)
                res = p.run(gm, ctx)
                removed = self.cleanup.run(gm, ctx).rewrites
                after = _signature(gm)
                changed = {k for k, v in after.items() if before.get(k) != v}
                # shapes re-propagated from what the pass changed only (a whole-graph propagation was most of a
                # pass's time: 0.7 s at 12 layers); a pass that only removed nodes is still linted and recognised
                if changed or before.keys() - after.keys():
                    ir = _verify(gm, changed)
                _check(where, "ensures", p.ensures(gm, ctx, ir))
            except RoutefxError as e:
                if isinstance(e, PassFailedError):
                    raise
                raise type(e)(f"{e} (in {where})") from e
            except Exception as e:
                msg = str(e).strip().splitlines()[0] if str(e).strip() else ""
                raise PassFailedError(f"{where} failed: {type(e).__name__}: {msg}") from e
            reports.append(PassReport(p.name, res.rewrites, [dataclasses.asdict(m) for m in res.misses],
                                      res.notes, round(time.perf_counter() - t0, 4), removed))
            _dump(self.debug_dir, i + 1, p.name, gm, ir)
        return ir, reports


def _check(where: str, which: str, reason: str | None) -> None:
    if reason is not None:
        raise PassFailedError(f"{where}: contract broken ({which}): {reason}")


def _after(done: list[str]) -> str:
    return f", after {', '.join(done)}" if done else ", the first pass"
