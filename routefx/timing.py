"""Latency measurement for benchmarks and the demo: medians of interleaved runs in one process.

Interleaving (A, B, C, A, B, C, ...) spreads machine drift (frequency, other load) over every candidate, so the
ratios between them are fair even when absolute times move.
"""
from __future__ import annotations

import statistics
import time
from typing import Callable

import torch

__all__ = ["median_seconds"]


def median_seconds(fns: dict[str, Callable[[], object]], *, warmup: int = 2, reps: int = 9) -> dict[str, float]:
    """Median wall time of each `fn()` over `reps` interleaved rounds after `warmup` rounds (no autograd)."""
    times: dict[str, list[float]] = {k: [] for k in fns}
    with torch.no_grad():
        for _ in range(warmup):
            for fn in fns.values():
                fn()
        for _ in range(reps):
            for k, fn in fns.items():
                t = time.perf_counter()
                fn()
                times[k].append(time.perf_counter() - t)
    return {k: statistics.median(v) for k, v in times.items()}
