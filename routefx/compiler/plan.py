"""Plans: the concrete decisions calibration turns a policy into. Passes read plans, never raw data."""
from __future__ import annotations

import dataclasses
from typing import Any

import torch

__all__ = ["Plan", "LayerPlan"]


@dataclasses.dataclass
class LayerPlan:
    """Routing decisions for one FFN (keyed by its module path in `Plan.layers`).

    Route ids: 0 skip (empty range), 1 small [0, k), 2 big [0, F), after permuting neurons by `perm`.
    """

    F: int
    k: int
    perm: torch.Tensor | None = None            # [F] int64: new neuron i is old neuron perm[i]
    router: str = "static"                      # "static" | "random" | "local" | ...
    static_route: int | None = None             # static router: the one route every token takes
    weight: torch.Tensor | None = None          # [3, d] router weight (per-token routers)
    bias: torch.Tensor | None = None            # [3]

    @property
    def ranges(self) -> list[int]:
        return [0, 0, 0, self.k, 0, self.F]

    @property
    def costs(self) -> list[float]:
        return [0.0, self.k / self.F, 1.0]

    def summary(self) -> dict[str, Any]:
        return {"F": self.F, "k": self.k, "router": self.router, "static_route": self.static_route,
                "permuted": self.perm is not None, "router_shape": None if self.weight is None
                else list(self.weight.shape)}


@dataclasses.dataclass
class Plan:
    policy: dict[str, Any]
    pruned: list[int] = dataclasses.field(default_factory=list)   # block indices of the captured ModelIR
    block_influence: list[float] | None = None                     # per block, when calibration scored them
    block_paths: list[str | None] = dataclasses.field(default_factory=list)
    layers: dict[str, LayerPlan] = dataclasses.field(default_factory=dict)
    lam: float | None = None                                       # global price on branch cost (routers)
    calibration: dict[str, Any] = dataclasses.field(default_factory=dict)  # figures measured while calibrating

    def to_dict(self) -> dict[str, Any]:
        """A JSON summary (tensors are left out; `save` in a later release writes them)."""
        return {"policy": self.policy, "pruned": self.pruned, "block_influence": self.block_influence,
                "block_paths": self.block_paths, "lam": self.lam, "calibration": self.calibration,
                "layers": {k: v.summary() for k, v in self.layers.items()}}
