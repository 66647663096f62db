"""Latency measurement for benchmarks and the demo: medians of interleaved runs in one process.

Interleaving (A, B, C, A, B, C, ...) spreads machine drift (frequency, other load) over every candidate, so the
ratios between them are fair even when absolute times move; with `shuffle_seed` the order is shuffled in every
round, so no candidate always runs right after the same other one (caches, allocator state).

On CPU, a candidate's time also depends on what ran just before it: threads that spin-wait after their work on
the cores the next candidate needs (torch's OpenMP threads after a parallel region; ONNX Runtime's after a run unless
the session stops them, as routefx's do), and caches holding another model's weights. Measured on 2 cores (AMD
EPYC): a chain of torch MatMuls of 80 ms took 115 ms right after a default ONNX Runtime session's run; the trained
d=256 LM (weights within the L3 cache) ran dense / Duo / pruned in 3.1 / 2.7 / 3.9 ms interleaved with one another,
and in 1.9 / 1.9 / 1.0 ms when each call followed calls of the same model. An idle gap before each call instead
made it worse (8.3 / 6.0 / 5.0 ms: the first call after idling is cold). CPU benchmarks therefore pass
`warm_each=CPU_WARM_EACH`: each timed call right after untimed calls of the same function, so that each candidate
is measured warm and as it runs alone, the way a user runs it repeatedly; the order stays shuffled per round.
"""
from __future__ import annotations

import random
import statistics
import time
from typing import Callable

import torch

__all__ = ["CPU_WARM_EACH", "median_seconds"]

CPU_WARM_EACH = 2  # untimed calls right before each timed call in CPU benchmarks (see the module docstring)


def median_seconds(fns: dict[str, Callable[[], object]], *, warmup: int = 2, reps: int = 9,
                   shuffle_seed: int | None = None, warm_each: int = 0) -> dict[str, float]:
    """Median wall time of each `fn()` over `reps` interleaved rounds after `warmup` rounds (no autograd); the
    order within each timed round is shuffled when `shuffle_seed` is given; each timed call comes right after
    `warm_each` untimed calls of the same function."""
    times: dict[str, list[float]] = {k: [] for k in fns}
    order = list(fns)
    rng = None if shuffle_seed is None else random.Random(shuffle_seed)
    with torch.no_grad():
        for _ in range(warmup):
            for fn in fns.values():
                fn()
        for _ in range(reps):
            if rng is not None:
                rng.shuffle(order)
            for k in order:
                fn = fns[k]
                for _ in range(warm_each):
                    fn()
                t = time.perf_counter()
                fn()
                times[k].append(time.perf_counter() - t)
    return {k: statistics.median(v) for k, v in times.items()}
