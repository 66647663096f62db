"""Auto backend: prepares the candidate backends, times each on the example input and keeps the fastest.

Candidates: eager, onnx and inductor (one that cannot prepare is left out, with its reason). Each is warmed up
once, then called in `rounds` interleaved rounds (candidate order shuffled per round, so drift and other load on
the machine spread over all; each timed call right after `routefx.timing.CPU_WARM_EACH` untimed calls of the same
candidate); the median time decides. The result says what was measured in `notes`, which `routefx.compile` copies
into `cm.report.notes`. Preparing every candidate costs their compile times together.
"""
from __future__ import annotations

import dataclasses
from typing import Any

from torch import fx

from routefx.errors import BackendError
from routefx.timing import CPU_WARM_EACH, median_seconds

__all__ = ["prepare", "AutoRunner", "CANDIDATES"]

CANDIDATES = ("eager", "onnx", "inductor")


@dataclasses.dataclass
class AutoRunner:
    """The fastest candidate's runner (`runner`), its name (`chosen`), median ms per candidate (`ms`) and why
    candidates were left out (`skipped`)."""
    runner: Any
    chosen: str
    ms: dict[str, float]
    skipped: dict[str, str]

    def __call__(self, *args, **kwargs):
        return self.runner(*args, **kwargs)

    @property
    def notes(self) -> list[str]:
        timed = ", ".join(f"{k} {v:.2f} ms" for k, v in self.ms.items())
        lines = [f"backend auto chose {self.chosen} (median on the example input: {timed})"]
        lines += [f"backend auto left out {k}: {v}" for k, v in self.skipped.items()]
        return lines


def prepare(gm: fx.GraphModule, example_kwargs: dict, *, candidates=None, rounds: int = 5) -> AutoRunner:
    """Prepare `candidates` (default `CANDIDATES`), time them and return the fastest (see the module docstring).
    Raises `BackendError` when none can prepare the graph."""
    from routefx.backends import get_backend

    runners, skipped = {}, {}
    for name in candidates or CANDIDATES:
        try:
            runners[name] = get_backend(name).prepare(gm, example_kwargs)
        except BackendError as e:
            skipped[name] = str(e)
    if not runners:
        raise BackendError(f"backend auto: no candidate could prepare the graph: {skipped}")
    # warm-up once (first-call allocations, lazy compiles), then interleaved rounds in which each timed call follows
    # untimed calls of the same candidate, so that none is timed while another one's threads spin (routefx.timing)
    fns = {name: (lambda run=run: run(**example_kwargs)) for name, run in runners.items()}
    med = median_seconds(fns, warmup=1, reps=rounds, shuffle_seed=0, warm_each=CPU_WARM_EACH)
    ms = {name: round(t * 1e3, 3) for name, t in med.items()}
    chosen = min(ms, key=ms.get)
    return AutoRunner(runners[chosen], chosen, ms, skipped)
