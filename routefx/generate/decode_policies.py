"""Decode-time layer-skip policies: which layers each generated token runs, per row.

    cm.generate(ids, mask, max_new_tokens=64, decode_policy=DepthDecay(alpha=0.9, min_layers=4))

A decode policy is applied on top of the compiled model's own policy (Dense, PruneLayers, Duo: a Duo model keeps
routing the FFNs of the layers that run). Layer indices are the compiled graph's blocks (after pruning). The prompt
(prefill) always runs every layer; decode step t (t = 1, 2, ...: the forward pass of the t-th generated token,
which writes its K/V and yields token t + 1) runs the layers the policy chooses:

    DepthDecay(alpha, min_layers)   D^3-style depth decay: the first max(min_layers, floor(L * alpha^t)) layers.
    ActivationSkip(budget | threshold)
                                    LAC / "voids"-style: during prefill, per row and layer, the relative change the
                                    layer makes to the residual stream, ||S_(l+1) - S_l|| / ||S_l|| averaged over
                                    the row's real prompt tokens; the row's decode skips every layer whose change is
                                    below the threshold. `budget` (the fraction of layers run) fits the threshold
                                    on the compile's calibration data (`fit_threshold`).
    LayerSubset(skip)               FiRST-style static subsets chosen before decoding: the same layers for every
                                    row (`skip=(2, 5)`), or one tuple per row (`skip=((2,), (1, 5))`).

Cache rule (every policy): a skipped layer still writes K/V for the new position, computed by its own K/V
projections (input norm, K and V projections, rotary) from the residual stream that reaches it, i.e. the output
of the last layer that ran (CALM-style state propagation). Its attention, output projection and FFN do not run.
Why this choice: the cache stays complete and consistent (every layer holds K/V for every position, so a later token
that runs the layer attends to all earlier positions, as in the dense model), at the cost of the K/V projections
only (2·d·d_kv weights per layer, 3-10 % of a layer's bytes with grouped-query attention); recomputing a skipped
layer's K/V lazily from its true input would need that layer's whole computation later, which is what skipping
avoids.

Frozen, validated on construction, JSON round-trip (`to_json` / `decode_policy_from_json`).
"""
from __future__ import annotations

import dataclasses
import json
import math
from typing import Any, ClassVar

import torch

from routefx.errors import PolicyError

__all__ = ["DecodePolicy", "DepthDecay", "ActivationSkip", "LayerSubset", "decode_policy_from_dict",
           "decode_policy_from_json"]

_REGISTRY: dict[str, type["DecodePolicy"]] = {}


def _number(x) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool)


@dataclasses.dataclass(frozen=True)
class DecodePolicy:
    VERSION: ClassVar[int] = 1
    needs_prefill_stats: ClassVar[bool] = False   # the per-layer stream changes of the prompt (ActivationSkip)

    def __init_subclass__(cls, **kw):
        super().__init_subclass__(**kw)
        _REGISTRY[cls.__name__] = cls

    def check(self, layers: int, batch: int) -> None:
        """Raise `PolicyError` when the policy does not fit a model of `layers` blocks and a batch of `batch`."""

    def at_prefill(self, layers: int, batch: int, changes: torch.Tensor | None) -> torch.Tensor | None:
        """Per-sequence decisions taken once after the prompt (changes: [B, L] or None) -> run mask [B, L] or
        None."""
        return None

    def run_mask(self, step: int, layers: int, batch: int, chosen: torch.Tensor | None) -> torch.Tensor:
        """Layers that decode step `step` (>= 1) runs: bool [B, L]."""
        raise NotImplementedError

    def to_dict(self) -> dict[str, Any]:
        fields = {k: _plain(v) for k, v in dataclasses.asdict(self).items()}
        return {"decode_policy": type(self).__name__, "version": self.VERSION, **fields}

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), sort_keys=True)


def _plain(v):
    return [_plain(x) for x in v] if isinstance(v, (tuple, list)) else v


def _tuples(v):
    return tuple(_tuples(x) for x in v) if isinstance(v, (tuple, list)) else v


def decode_policy_from_dict(d: dict[str, Any]) -> DecodePolicy:
    d = dict(d)
    name = d.pop("decode_policy", None)
    if name not in _REGISTRY:
        raise PolicyError(f"unknown decode policy {name!r}; supported: {', '.join(sorted(_REGISTRY))}")
    cls = _REGISTRY[name]
    if d.pop("version", cls.VERSION) != cls.VERSION:
        raise PolicyError(f"{name} decode policy version is not supported (this routefx reads {cls.VERSION})")
    unknown = sorted(set(d) - {f.name for f in dataclasses.fields(cls)})
    if unknown:
        raise PolicyError(f"unknown field(s) {unknown} for decode policy {name}")
    return cls(**{k: _tuples(v) for k, v in d.items()})


def decode_policy_from_json(s: str) -> DecodePolicy:
    return decode_policy_from_dict(json.loads(s))


@dataclasses.dataclass(frozen=True)
class DepthDecay(DecodePolicy):
    """Decode step t runs the first max(min_layers, floor(L * alpha^t)) layers (alpha = 1: every layer)."""

    alpha: float = 0.9
    min_layers: int = 1

    def __post_init__(self):
        if not _number(self.alpha) or not 0 < self.alpha <= 1:
            raise PolicyError(f"DepthDecay: alpha must be in (0, 1], got {self.alpha!r}")
        if isinstance(self.min_layers, bool) or not isinstance(self.min_layers, int) or self.min_layers < 1:
            raise PolicyError(f"DepthDecay: min_layers must be an int >= 1, got {self.min_layers!r}")

    def check(self, layers: int, batch: int) -> None:
        if self.min_layers > layers:
            raise PolicyError(f"DepthDecay: min_layers={self.min_layers} but the compiled model has {layers} layers")

    def depth(self, step: int, layers: int) -> int:
        # alpha^t in floating point; floor(L·alpha^t) with a small guard so that alpha = 1 gives exactly L
        return max(self.min_layers, min(layers, math.floor(layers * self.alpha ** step + 1e-9)))

    def run_mask(self, step, layers, batch, chosen):
        mask = torch.zeros(batch, layers, dtype=torch.bool)
        mask[:, :self.depth(step, layers)] = True
        return mask

    def layer_fraction(self, layers: int, steps: int) -> float:
        """Mean fraction of layers run over decode steps 1..steps (the prefill excluded)."""
        return sum(self.depth(t, layers) for t in range(1, steps + 1)) / (layers * steps)


@dataclasses.dataclass(frozen=True)
class ActivationSkip(DecodePolicy):
    """Skip, for a row's whole decode, the layers whose relative change of the residual stream over the row's
    prompt is below `threshold`; or give `budget` (fraction of layers run, in (0, 1]) and let `fit_threshold` find
    the threshold on the compile's calibration data."""

    budget: float | None = None
    threshold: float | None = None
    needs_prefill_stats: ClassVar[bool] = True

    def __post_init__(self):
        if (self.budget is None) == (self.threshold is None):
            raise PolicyError(f"ActivationSkip takes exactly one of budget=<fraction of layers run> or "
                              f"threshold=<relative change>; got budget={self.budget!r}, threshold={self.threshold!r}")
        if self.budget is not None and (not _number(self.budget) or not 0 < self.budget <= 1):
            raise PolicyError(f"ActivationSkip: budget must be a fraction of layers in (0, 1], got {self.budget!r}")
        if self.threshold is not None and (not _number(self.threshold) or not self.threshold >= 0):
            raise PolicyError(f"ActivationSkip: threshold must be a number >= 0, got {self.threshold!r}")

    def at_prefill(self, layers, batch, changes):
        if self.threshold is None:
            raise PolicyError("ActivationSkip(budget=...) has no threshold yet: fit it with "
                              "routefx.generate.fit_threshold(cm, policy) (cm.generate does this itself)")
        return changes >= self.threshold

    def run_mask(self, step, layers, batch, chosen):
        return chosen


@dataclasses.dataclass(frozen=True)
class LayerSubset(DecodePolicy):
    """Decode skips the layers in `skip`: one tuple for every row, or a tuple of tuples, one per row."""

    skip: tuple = ()

    def __post_init__(self):
        skip = _tuples(self.skip)
        per_row = bool(skip) and all(isinstance(s, tuple) for s in skip)
        rows = skip if per_row else (skip,)
        for r in rows:
            if not isinstance(r, tuple) or any(isinstance(i, bool) or not isinstance(i, int) or i < 0 for i in r):
                raise PolicyError(f"LayerSubset: skip must be layer indices >= 0, or one tuple of them per row; got "
                                  f"{self.skip!r}")
        object.__setattr__(self, "skip", skip)

    @property
    def rows(self) -> tuple | None:
        return self.skip if self.skip and isinstance(self.skip[0], tuple) else None

    def check(self, layers: int, batch: int) -> None:
        rows = self.rows
        if rows is not None and len(rows) != batch:
            raise PolicyError(f"LayerSubset gives {len(rows)} rows of skipped layers for a batch of {batch}")
        bad = sorted({i for r in (rows or (self.skip,)) for i in r if i >= layers})
        if bad:
            raise PolicyError(f"LayerSubset skips layers {bad}; the compiled model has layers 0..{layers - 1}")

    def at_prefill(self, layers, batch, changes):
        run = torch.ones(batch, layers, dtype=torch.bool)
        for b, r in enumerate(self.rows or (self.skip,) * batch):
            run[b, list(r)] = False
        return run

    def run_mask(self, step, layers, batch, chosen):
        return chosen
