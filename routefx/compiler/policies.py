"""Policies: what the user wants, declared. Frozen dataclasses, validated on construction, JSON round-trip.

    Dense()                 every recognised dense FFN becomes one full-range routed_ffn (function unchanged)
    PruneLayers(layers=[i]) remove whole blocks (indices into ModelIR.blocks, or module paths: every block in it)
    PruneLayers(keep=0.75)  with calibration: remove the floor((1-keep)·L + 0.5) blocks of lowest Block Influence
    Duo(budget=0.5, ...)    each FFN gets a small and a big branch; per token: skip, small or big, under a budget
    MoEBudget(budget=0.5)   MoE blocks: per token, the fewest of the top-k experts the rule keeps, under a budget
    MoEfy(experts=8, top_k=2)  dense FFNs split into experts by neuron co-activation, a router picks top-k per token

JSON form: {"policy": "<ClassName>", "version": 1, <fields>}; unknown fields or policies raise `PolicyError`.
"""
from __future__ import annotations

import dataclasses
import json
from typing import Any, ClassVar

from routefx.errors import PolicyError

__all__ = ["Policy", "Dense", "PruneLayers", "Duo", "MoEBudget", "MoEfy", "ROUTERS", "policy_from_dict",
           "policy_from_json"]

_REGISTRY: dict[str, type["Policy"]] = {}


@dataclasses.dataclass(frozen=True)
class Policy:
    VERSION: ClassVar[int] = 1

    @property
    def needs_calibration(self) -> bool:
        return False

    def __init_subclass__(cls, **kw):
        super().__init_subclass__(**kw)
        _REGISTRY[cls.__name__] = cls

    def to_dict(self) -> dict[str, Any]:
        fields = {k: list(v) if isinstance(v, tuple) else v for k, v in dataclasses.asdict(self).items()}
        return {"policy": type(self).__name__, "version": self.VERSION, **fields}

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), sort_keys=True)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "Policy":
        return policy_from_dict(d if "policy" in d else {"policy": cls.__name__, **d})

    @classmethod
    def from_json(cls, s: str) -> "Policy":
        return cls.from_dict(json.loads(s))


def policy_from_dict(d: dict[str, Any]) -> Policy:
    d = dict(d)
    name = d.pop("policy", None)
    if name not in _REGISTRY:
        raise PolicyError(f"unknown policy {name!r}; supported: {', '.join(sorted(_REGISTRY))}")
    cls = _REGISTRY[name]
    version = d.pop("version", cls.VERSION)
    if version != cls.VERSION:
        raise PolicyError(f"{name} policy version {version} is not supported (this routefx reads {cls.VERSION})")
    fields = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(d) - fields)
    if unknown:
        raise PolicyError(f"unknown field(s) {', '.join(map(repr, unknown))} for policy {name}; its fields are: "
                          f"{', '.join(sorted(fields)) or '(none)'}")
    return cls(**d)


def policy_from_json(s: str) -> Policy:
    return policy_from_dict(json.loads(s))


def _layer_refs(name: str, layers, *, duplicates: bool) -> tuple:
    """A policy's `layers`: block indices (ints >= 0) and/or module paths (non-empty strings), resolved against the
    model at calibration (`routefx.calibrate.block_refs`). `duplicates`: an exact repeat is dropped (else refused).
    Indices alone come back sorted."""
    refs = tuple(layers) if isinstance(layers, (list, tuple)) else None
    if not refs or any(not ((isinstance(r, int) and not isinstance(r, bool) and r >= 0) or (isinstance(r, str) and r))
                       for r in refs):
        raise PolicyError(f"{name}: layers must be a non-empty list of block indices >= 0 (routefx.inspect's '#') or "
                          f"module paths such as 'model.layers.3', got {layers!r}")
    if len(set(refs)) != len(refs):
        if not duplicates:
            raise PolicyError(f"{name}: layers lists a block twice: {list(refs)}")
        refs = tuple(dict.fromkeys(refs))
    return tuple(sorted(refs)) if all(isinstance(r, int) for r in refs) else refs


@dataclasses.dataclass(frozen=True)
class Dense(Policy):
    """Every recognised dense FFN becomes `routed_ffn` with one full range: the reference compiled form."""


@dataclasses.dataclass(frozen=True)
class PruneLayers(Policy):
    """Remove whole blocks: the ones listed in `layers`, or, with calibration data, the
    `floor((1 - keep) * L + 0.5)` blocks of lowest Block Influence (1 - mean cosine similarity of the residual
    stream before and after the block, ShortGPT), keeping at least one.

    layers: block indices (`routefx.inspect`'s `#`) and/or module paths ("model.layers.3": every block in that
        module, so a decoder layer whatever number of blocks it reads as; `routefx.calibrate.block_refs`)."""

    layers: tuple[int | str, ...] | None = None
    keep: float | None = None

    def __post_init__(self):
        if (self.layers is None) == (self.keep is None):
            raise PolicyError("PruneLayers takes exactly one of layers=[block indices or module paths] or "
                              "keep=<fraction in (0, 1]>"
                              f"; got layers={self.layers!r}, keep={self.keep!r}")
        if self.keep is not None:
            if isinstance(self.keep, bool) or not isinstance(self.keep, (int, float)) or not 0 < self.keep <= 1:
                raise PolicyError(f"PruneLayers: keep must be a fraction in (0, 1], got {self.keep!r}")
        if self.layers is not None:
            object.__setattr__(self, "layers", _layer_refs("PruneLayers", self.layers, duplicates=False))

    @property
    def needs_calibration(self) -> bool:
        return self.keep is not None


ROUTERS = ("static", "random", "local", "imitation", "loss")
HOISTABLE_ROUTERS = ("random", "local")  # fitted at calibration; trained ones retrain on the local input


@dataclasses.dataclass(frozen=True)
class Duo(Policy):
    """Duo-LLM routing: each routed FFN gets a small branch (its `small_fraction` most important neurons, after
    an importance permutation that leaves the dense function unchanged) and the big branch (all neurons); each
    token, at each layer, goes to skip, small or big.

    budget: mean FFN compute fraction over the routed layers and real tokens (skip 0, small k/F, big 1), met
        within ±0.02 on the calibration data by one global price λ on branch cost.
    router: "static" (one branch per layer, chosen by importance), "random" (a seeded random linear router, a
        per-token baseline), "local" (a linear router trained on layer-local labels), "imitation" (a linear router
        fitted to oracle routes on the calibration data), "loss" (trained end-to-end on the frozen model with the
        language-model loss plus a compute price; `routefx/calibrate/trained_routers.py`).
    hoist: router hoisting (pre-gating, `routefx/passes/hoist_routers.py`): each routed layer but the first
        chooses its routes from the previous routed layer's FFN input, one layer ahead, with a router fitted on
        that input to this layer's labels. A hoisted router is a different (earlier-informed) router, not the
        local one moved. Off by default: measured not to pay on CPU (bench/RESULTS_MOE.md).
    layers: blocks to route, as block indices and/or module paths (every block with a dense FFN in that module;
        `routefx.calibrate.block_refs`); None: every dense FFN.
    small: "separate" (the default: an extra k-neuron branch appended to the weights, initialised from the top-k
        neurons and fitted by least squares on calibration activations to approximate the big branch; k·(2d+d)
        more weights per layer, i.e. +small_fraction of the FFN's) or "nested" (the small branch is the first k
        neurons of the big one; no extra weights). Separate is the default because it is far better at equal
        compute: on the trained benchmark LM at budget 0.5 held-out perplexity rises +0.4–0.7% with it against
        +4.0–4.8% nested, whatever the router (bench/QUALITY.md), and on the all-MiniLM-L6-v2 encoder its
        embeddings kept cosine 0.96 to the dense model's against 0.81 (issue 16).
    """

    budget: float = 0.5
    small_fraction: float = 0.25
    router: str = "local"
    layers: tuple[int | str, ...] | None = None
    seed: int = 0
    small: str = "separate"
    hoist: bool = False

    def __post_init__(self):
        if isinstance(self.budget, bool) or not isinstance(self.budget, (int, float)) or not 0 < self.budget <= 1:
            raise PolicyError(f"Duo: budget must be a compute fraction in (0, 1], got {self.budget!r}")
        if not isinstance(self.hoist, bool):
            raise PolicyError(f"Duo: hoist must be True or False, got {self.hoist!r}")
        if self.hoist and self.router not in HOISTABLE_ROUTERS:
            raise PolicyError(f"Duo: hoist=True needs a router fitted at calibration ({', '.join(HOISTABLE_ROUTERS)})"
                              f"; got router {self.router!r}")
        if isinstance(self.small_fraction, bool) or not isinstance(self.small_fraction, (int, float)) \
                or not 0 < self.small_fraction < 1:
            raise PolicyError(f"Duo: small_fraction must be in (0, 1), got {self.small_fraction!r}")
        if self.router not in ROUTERS:
            raise PolicyError(f"Duo: unknown router {self.router!r}; supported: {', '.join(ROUTERS)}")
        if self.layers is not None:
            object.__setattr__(self, "layers", _layer_refs("Duo", self.layers, duplicates=True))
        if self.small not in ("nested", "separate"):
            raise PolicyError(f"Duo: small must be 'nested' or 'separate', got {self.small!r}")
        if not isinstance(self.seed, int):
            raise PolicyError(f"Duo: seed must be an int, got {self.seed!r}")

    @property
    def needs_calibration(self) -> bool:
        return True


MOE_RULES = ("top_p", "threshold")


@dataclasses.dataclass(frozen=True)
class MoEBudget(Policy):
    """Adaptive expert counts in MoE blocks: per token, keep the fewest of its top-k experts whose normalised gate
    mass reaches p (rule "top_p"), or those whose normalised gate is at least τ (rule "threshold"); the largest
    gate is always kept and the kept gates are rescaled to the captured gates' sum. p = 1 - λ or τ = λ, with one
    global λ fitted so that the budget is met within ±0.02 on the calibration data.

    budget: mean fraction of the top-k experts computed, over MoE layers and real tokens (1 = the captured model,
        1/k = top-1 everywhere, the least the rule can reach). Shared experts and dense layers are not counted.
    hoist: pre-gating (Read-ME-style router hoisting, `routefx/passes/hoist_moe_routers.py`): each MoE block but
        the first computes its expert choice and gates from the previous MoE block's router input, one block
        ahead, with a router fitted at calibration to reproduce its own router's logits there
        (`routefx/calibrate/moe_hoist.py`). A different, earlier-informed router: outputs change. budget=1 with
        hoist=True is the captured model with pre-gated routers. Off by default: measured not to pay on CPU
        (bench/RESULTS_MOE.md).
    """

    budget: float = 0.5
    rule: str = "top_p"
    hoist: bool = False

    def __post_init__(self):
        if isinstance(self.budget, bool) or not isinstance(self.budget, (int, float)) or not 0 < self.budget <= 1:
            raise PolicyError(f"MoEBudget: budget must be a fraction of the top-k experts in (0, 1], got "
                              f"{self.budget!r}")
        if self.rule not in MOE_RULES:
            raise PolicyError(f"MoEBudget: unknown rule {self.rule!r}; supported: {', '.join(MOE_RULES)}")
        if not isinstance(self.hoist, bool):
            raise PolicyError(f"MoEBudget: hoist must be True or False, got {self.hoist!r}")

    @property
    def needs_calibration(self) -> bool:
        return True


@dataclasses.dataclass(frozen=True)
class MoEfy(Policy):
    """Dense -> MoE (MoEfication): each dense FFN's F neurons are split into `experts` clusters of F/experts
    neurons by balanced k-means on their calibration co-activation, permuted so that each expert is a contiguous
    neuron range, and a linear router fitted per layer picks experts per token (gate 1 each, so that all experts
    together are the dense FFN). `routefx/calibrate/moefy.py`, `routefx/passes/moefy.py`.

    top_k: experts per token in every layer (top_k = experts reproduces the dense model).
    budget: instead of top_k, the mean FFN compute fraction (experts run / experts, over MoEfied layers and real
        tokens). Without `rule`, a static top-k per layer, the slots spread over layers where the router's experts
        hold least of the activation mass, as near the budget as whole experts allow; with `rule` ("top_p" or
        "threshold", as in MoEBudget, on the router's softmax), per token, with one global price fitted to meet the
        budget within ±0.02 on the calibration data.
    layers: blocks to MoEfy, as indices and/or module paths (None: every dense FFN). steps: the router's training
        steps (Adam, full batch).
    """

    experts: int = 8
    top_k: int | None = None
    budget: float | None = None
    rule: str | None = None
    layers: tuple[int | str, ...] | None = None
    steps: int = 300
    seed: int = 0

    def __post_init__(self):
        def whole(v):
            return isinstance(v, int) and not isinstance(v, bool)
        if not whole(self.experts) or self.experts < 2:
            raise PolicyError(f"MoEfy: experts must be an int >= 2, got {self.experts!r}")
        if self.top_k is not None and self.budget is not None:
            raise PolicyError(f"MoEfy takes top_k or budget, not both; got top_k={self.top_k!r}, "
                              f"budget={self.budget!r}")
        if self.top_k is None and self.budget is None:
            object.__setattr__(self, "top_k", 2)
        if self.top_k is not None and (not whole(self.top_k) or not 1 <= self.top_k <= self.experts):
            raise PolicyError(f"MoEfy: top_k must be an int in [1, experts={self.experts}], got {self.top_k!r}")
        if self.budget is not None and (isinstance(self.budget, bool) or not isinstance(self.budget, (int, float))
                                        or not 0 < self.budget <= 1):
            raise PolicyError(f"MoEfy: budget must be an FFN compute fraction in (0, 1], got {self.budget!r}")
        if self.rule is not None:
            if self.rule not in MOE_RULES:
                raise PolicyError(f"MoEfy: unknown rule {self.rule!r}; supported: {', '.join(MOE_RULES)} (or None "
                                  "for a static top-k)")
            if self.budget is None:
                raise PolicyError(f"MoEfy: rule={self.rule!r} chooses experts per token under a budget; give "
                                  "budget=<fraction> instead of top_k")
            if self.budget < 1.0 / self.experts - 1e-9:
                raise PolicyError(f"MoEfy: budget {self.budget} is below 1/experts = {1.0 / self.experts:.3f}: the "
                                  "rule always keeps a token's first expert")
        if self.layers is not None:
            object.__setattr__(self, "layers", _layer_refs("MoEfy", self.layers, duplicates=True))
        if not whole(self.steps) or self.steps < 0:
            raise PolicyError(f"MoEfy: steps must be an int >= 0, got {self.steps!r}")
        if not whole(self.seed):
            raise PolicyError(f"MoEfy: seed must be an int, got {self.seed!r}")

    @property
    def needs_calibration(self) -> bool:
        return True
