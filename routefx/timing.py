"""Latency measurement for benchmarks and the demo: medians of interleaved runs in one process.

Interleaving (A, B, C, A, B, C, ...) spreads machine drift (frequency, other load) over every candidate, so the
ratios between them are fair even when absolute times move; with `shuffle_seed` the order is shuffled in every
round, so no candidate always runs right after the same other one (caches, allocator state).
"""
from __future__ import annotations

import random
import statistics
import time
from typing import Callable

import torch

__all__ = ["median_seconds"]


def median_seconds(fns: dict[str, Callable[[], object]], *, warmup: int = 2, reps: int = 9,
                   shuffle_seed: int | None = None) -> dict[str, float]:
    """Median wall time of each `fn()` over `reps` interleaved rounds after `warmup` rounds (no autograd); the
    order within each timed round is shuffled when `shuffle_seed` is given."""
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
                t = time.perf_counter()
                fn()
                times[k].append(time.perf_counter() - t)
    return {k: statistics.median(v) for k, v in times.items()}
