"""Plans: the concrete decisions calibration turns a policy into. Passes read plans, never raw data."""
from __future__ import annotations

import dataclasses
from typing import Any

import torch

__all__ = ["Plan", "LayerPlan", "BudgetRecord", "LayerBudget"]


@dataclasses.dataclass
class LayerBudget:
    """One routed layer on the calibration data: its share of tokens per route and its compute fraction."""

    key: str
    mix: list[float]                            # fraction of real tokens per route (skip, small, big)
    fraction: float                             # compute fraction (route costs weighted by the mix)
    fraction_at_lambda_0: float | None = None   # the same before the price λ was fitted (per-token routers)


@dataclasses.dataclass
class BudgetRecord:
    """What the budget step measured on the rewritten graph over the calibration data (real tokens)."""

    target: float                               # the policy's budget
    realised: float                             # mean compute fraction over routed layers and tokens
    lam: float | None = None                    # the fitted price (None: static routes, nothing to fit)
    at_lambda_0: float | None = None            # realised fraction before fitting (per-token routers)
    layers: list[LayerBudget] = dataclasses.field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "BudgetRecord":
        return cls(**{**d, "layers": [LayerBudget(**layer) for layer in d.get("layers", [])]})


@dataclasses.dataclass
class LayerPlan:
    """Routing decisions for one FFN (keyed by its module path in `Plan.layers`).

    Route ids: 0 skip (empty range), 1 small, 2 big [0, F), after permuting neurons by `perm`. The small branch
    is nested ([0, k): the k most important neurons) or separate ([F, F + k): its own fitted weights, appended).
    """

    F: int
    k: int
    perm: torch.Tensor | None = None            # [F] int64: new neuron i is old neuron perm[i]
    router: str = "static"                      # "static" | "random" | "local" | ...
    static_route: int | None = None             # static router: the one route every token takes
    weight: torch.Tensor | None = None          # [3, d] router weight (per-token routers)
    bias: torch.Tensor | None = None            # [3]
    small: str = "nested"                       # "nested" | "separate"
    small_up: torch.Tensor | None = None        # separate branch: [k, d]
    small_gate: torch.Tensor | None = None      # [k, d] (gated FFNs)
    small_down: torch.Tensor | None = None      # [d, k]
    small_b_up: torch.Tensor | None = None      # [k]
    small_b_gate: torch.Tensor | None = None    # [k]

    @property
    def ranges(self) -> list[int]:
        if self.small == "separate":
            return [0, 0, self.F, self.F + self.k, 0, self.F]
        return [0, 0, 0, self.k, 0, self.F]

    @property
    def added_bytes(self) -> int:
        """Weight bytes the separate small branch adds (0 when nested)."""
        return sum(t.numel() * t.element_size() for t in (self.small_up, self.small_gate, self.small_down,
                                                          self.small_b_up, self.small_b_gate) if t is not None)

    @property
    def costs(self) -> list[float]:
        return [0.0, self.k / self.F, 1.0]

    def summary(self) -> dict[str, Any]:
        return {"F": self.F, "k": self.k, "router": self.router, "static_route": self.static_route,
                "small": self.small, "added_bytes": self.added_bytes,
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
    budget: BudgetRecord | None = None                             # measured by the budget step
    calibration: dict[str, Any] = dataclasses.field(default_factory=dict)  # other figures measured while calibrating
    fingerprint: dict[str, Any] | None = None                      # the model it was calibrated on

    def save(self, directory: str) -> None:
        """Write `plan.json` + `tensors.safetensors` into `directory` (format: routefx/compiler/plan_io.py)."""
        from routefx.compiler.plan_io import save_plan
        save_plan(self, directory)

    @classmethod
    def load(cls, directory: str) -> "Plan":
        from routefx.compiler.plan_io import load_plan
        return load_plan(directory)

    def to_dict(self) -> dict[str, Any]:
        """A JSON summary (tensors left out; `save` writes them)."""
        return {"policy": self.policy, "pruned": self.pruned, "block_influence": self.block_influence,
                "block_paths": self.block_paths, "lam": self.lam, "calibration": self.calibration,
                "budget": None if self.budget is None else self.budget.to_dict(),
                "layers": {k: v.summary() for k, v in self.layers.items()}}
