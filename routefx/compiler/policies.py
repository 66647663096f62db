"""Policies: what the user wants, declared. Frozen dataclasses, validated on construction, JSON round-trip.

    Dense()      every recognised dense FFN becomes one full-range routed_ffn (the model's function unchanged)

JSON form: {"policy": "<ClassName>", "version": 1, <fields>}; unknown fields or policies raise `PolicyError`.
"""
from __future__ import annotations

import dataclasses
import json
from typing import Any, ClassVar

from routefx.errors import PolicyError

__all__ = ["Policy", "Dense", "policy_from_dict", "policy_from_json"]

_REGISTRY: dict[str, type["Policy"]] = {}


@dataclasses.dataclass(frozen=True)
class Policy:
    VERSION: ClassVar[int] = 1
    needs_calibration: ClassVar[bool] = False

    def __init_subclass__(cls, **kw):
        super().__init_subclass__(**kw)
        _REGISTRY[cls.__name__] = cls

    def to_dict(self) -> dict[str, Any]:
        return {"policy": type(self).__name__, "version": self.VERSION, **dataclasses.asdict(self)}

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


@dataclasses.dataclass(frozen=True)
class Dense(Policy):
    """Every recognised dense FFN becomes `routed_ffn` with one full range: the reference compiled form."""
