"""Plans: the concrete decisions calibration turns a policy into. Passes read plans, never raw data."""
from __future__ import annotations

import dataclasses
from typing import Any

__all__ = ["Plan"]


@dataclasses.dataclass
class Plan:
    policy: dict[str, Any]
    pruned: list[int] = dataclasses.field(default_factory=list)   # block indices of the captured ModelIR
    block_influence: list[float] | None = None                     # per block, when calibration scored them
    block_paths: list[str | None] = dataclasses.field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)
