"""The pipeline, declared in one place: policy -> the rewrite passes, then the steps measured on their result.

    capture -> recognise -> calibrate (plan) -> rewrite (passes) -> tune (budget step) -> lower (backend) -> run

`passes` rewrite the graph from the plan alone (the pass manager checks each one's contract and removes dead code
after it); `tune` steps run once, on the first rewritten graph and the calibration data, and complete the plan
(the price λ). A plan that is given or reused for another input form is not tuned again.
"""
from __future__ import annotations

import dataclasses

from routefx.calibrate.budget import FitBudget
from routefx.calibrate.moe_budget import FitMoEBudget
from routefx.calibrate.moefy import FitMoEfyBudget
from routefx.calibrate.trained_routers import TRAINED_ROUTERS, TrainRouters
from routefx.compiler.policies import Dense, Duo, MoEBudget, MoEfy, Policy, PruneLayers
from routefx.errors import NoBlocksError, PolicyError
from routefx.ir.model_ir import ModelIR
from routefx.ir.recognize import recognize
from routefx.passes.adapt_experts import AdaptExperts
from routefx.passes.append_small_branch import AppendSmallBranch
from routefx.passes.base import Pass
from routefx.passes.hoist_moe_routers import HoistMoERouters
from routefx.passes.hoist_routers import HoistRouters
from routefx.passes.insert_routers import InsertRouters
from routefx.passes.moefy import MoEfyFFN
from routefx.passes.permute_neurons import PermuteNeurons
from routefx.passes.prune_blocks import PruneBlocks
from routefx.passes.raise_ffn import RaiseFFN
from routefx.passes.raise_moe import RaiseMoE

__all__ = ["Pipeline", "build_pipeline", "recognize_for"]


@dataclasses.dataclass(frozen=True)
class Pipeline:
    passes: list[Pass]
    tune: list = dataclasses.field(default_factory=list)


def build_pipeline(policy: Policy) -> Pipeline:
    # every policy: MoE blocks' expert dispatch -> routed_ffn (RaiseMoE), then dense FFNs -> routed_ffn (RaiseFFN)
    raise_ = [RaiseMoE(), RaiseFFN()]
    if isinstance(policy, Dense):
        return Pipeline(raise_)
    if isinstance(policy, PruneLayers):
        return Pipeline(raise_ + [PruneBlocks()])
    if isinstance(policy, Duo):
        train = [TrainRouters()] if policy.router in TRAINED_ROUTERS else []
        hoist = [HoistRouters()] if policy.hoist else []
        return Pipeline(raise_ + [PermuteNeurons(), AppendSmallBranch(), InsertRouters()] + hoist,
                        train + [FitBudget()])
    if isinstance(policy, MoEBudget):
        # hoisting after the keep rule, so that the rule moves ahead with the routes it rewrites
        hoist = [HoistMoERouters()] if policy.hoist else []
        return Pipeline(raise_ + [AdaptExperts(policy.rule)] + hoist, [FitMoEBudget()])
    if isinstance(policy, MoEfy):
        return Pipeline(raise_ + [PermuteNeurons(), MoEfyFFN()], [FitMoEfyBudget()] if policy.rule else [])
    raise PolicyError(f"no pipeline for policy {type(policy).__name__}")


def recognize_for(policy: Policy, gm) -> tuple[ModelIR, str | None]:
    """The blocks of `gm`, and a note where there are none and the policy (Dense) needs none: such a graph is
    compiled as captured, with no pass run, as Dense would leave it; every other policy refuses it
    (NoBlocksError)."""
    try:
        return recognize(gm), None
    except NoBlocksError as e:
        if not isinstance(policy, Dense):
            raise
        return ModelIR(hidden_size=0, blocks=[]), f"{e}. Dense compiles the graph as captured"
