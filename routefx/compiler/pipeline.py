"""The pass pipeline, declared in one place: policy -> ordered passes."""
from __future__ import annotations

from routefx.compiler.policies import Dense, Policy
from routefx.errors import PolicyError
from routefx.passes.base import Pass
from routefx.passes.raise_ffn import RaiseFFN

__all__ = ["build_pipeline"]


def build_pipeline(policy: Policy) -> list[Pass]:
    if isinstance(policy, Dense):
        return [RaiseFFN()]
    raise PolicyError(f"no pipeline for policy {type(policy).__name__}")
