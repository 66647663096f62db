"""One-dimensional search used by calibration (label threshold τ, price λ)."""
from __future__ import annotations

import dataclasses
from typing import Callable, Generic, TypeVar

__all__ = ["Bisection", "bisect_decreasing"]

T = TypeVar("T")


@dataclasses.dataclass
class Bisection(Generic[T]):
    lo: float            # last bracket: f(lo) > target >= f(hi)
    hi: float
    best_x: float        # the probed x whose key was nearest the target
    best: T              # f(best_x)


def bisect_decreasing(f: Callable[[float], T], target: float, lo: float, hi: float, iters: int,
                      key: Callable[[T], float] = float, tol: float = 0.0) -> Bisection[T]:
    """Bisect [lo, hi] for a non-increasing `key(f(x))` crossing `target`; stop early within `tol` (> 0)."""
    best_x, best = None, None
    for _ in range(iters):
        mid = (lo + hi) / 2
        y = f(mid)
        if best is None or abs(key(y) - target) < abs(key(best) - target):
            best_x, best = mid, y
        if tol > 0 and abs(key(y) - target) <= tol:
            break
        if key(y) > target:
            lo = mid
        else:
            hi = mid
    return Bisection(lo, hi, best_x, best)
