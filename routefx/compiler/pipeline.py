"""The pass pipeline, declared in one place: policy -> ordered passes."""
from __future__ import annotations

from routefx.compiler.policies import Dense, Duo, Policy, PruneLayers
from routefx.errors import PolicyError
from routefx.passes.base import Pass
from routefx.passes.append_small_branch import AppendSmallBranch
from routefx.passes.insert_routers import InsertRouters
from routefx.passes.permute_neurons import PermuteNeurons
from routefx.passes.prune_blocks import PruneBlocks
from routefx.passes.raise_ffn import RaiseFFN

__all__ = ["build_pipeline"]


def build_pipeline(policy: Policy) -> list[Pass]:
    if isinstance(policy, Dense):
        return [RaiseFFN()]
    if isinstance(policy, PruneLayers):
        return [RaiseFFN(), PruneBlocks()]
    if isinstance(policy, Duo):
        return [RaiseFFN(), PermuteNeurons(), AppendSmallBranch(), InsertRouters()]
    raise PolicyError(f"no pipeline for policy {type(policy).__name__}")
