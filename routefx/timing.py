"""Latency measurement for benchmarks and the demo: medians of interleaved runs in one process.

Interleaving (A, B, C, A, B, C, ...) spreads machine drift (frequency, other load) over every candidate, so the
ratios between them are fair even when absolute times move; with `shuffle_seed` the order is shuffled in every
round, so no candidate always runs right after the same other one (caches, allocator state).

On CPU, candidates on different engines also slow each other through threads that spin-wait after their work,
on the cores the next candidate needs: torch's OpenMP threads after a parallel region, and ONNX Runtime's after a
run unless the session stops them (routefx's sessions do, ONNX Runtime's default sessions do not). Measured on 2
cores (AMD EPYC, chains of 1024 x 1024 MatMuls, 2 threads each): a torch chain of 80 ms took 115 ms right after a
default session's run, 93 ms 20 ms after it and 76 ms 100 ms after it; a routefx-style session's 49 ms run took
55 ms right after the torch chain. CPU benchmarks therefore pass `settle_s=CPU_SETTLE_S`: an idle gap before every
timed call (not timed), so that each candidate is measured as it runs alone, the way a user runs it.
"""
from __future__ import annotations

import random
import statistics
import time
from typing import Callable

import torch

__all__ = ["CPU_SETTLE_S", "median_seconds"]

CPU_SETTLE_S = 0.1  # idle seconds before each timed call in CPU benchmarks (see the module docstring)


def median_seconds(fns: dict[str, Callable[[], object]], *, warmup: int = 2, reps: int = 9,
                   shuffle_seed: int | None = None, settle_s: float = 0.0) -> dict[str, float]:
    """Median wall time of each `fn()` over `reps` interleaved rounds after `warmup` rounds (no autograd); the
    order within each timed round is shuffled when `shuffle_seed` is given; `settle_s` idle seconds before each
    timed call."""
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
                if settle_s:
                    time.sleep(settle_s)
                t = time.perf_counter()
                fn()
                times[k].append(time.perf_counter() - t)
    return {k: statistics.median(v) for k, v in times.items()}
