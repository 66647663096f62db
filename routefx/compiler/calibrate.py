"""Calibration: policy + captured graph + data -> Plan.

Block Influence (ShortGPT): BI_i = 1 - mean over real tokens of cos(h_in, h_out), h_in / h_out the residual stream
before and after block i. Padding positions are excluded.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import fx

from routefx.compiler.calibration import token_mask
from routefx.compiler.observe import run_recording
from routefx.compiler.plan import Plan
from routefx.compiler.policies import Dense, Duo, Policy, PruneLayers
from routefx.errors import CalibrationError, PolicyError
from routefx.ir.model_ir import ModelIR

__all__ = ["calibrate", "block_influence"]


def _rows(value: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """[..., d] -> [N, d] rows at real tokens."""
    flat = value.reshape(-1, value.shape[-1])
    m = mask.reshape(-1)
    if m.numel() != flat.shape[0]:
        raise CalibrationError(f"stream value of shape {tuple(value.shape)} does not match the token mask "
                               f"{tuple(mask.shape)}")
    return flat[m]


def block_influence(gm: fx.GraphModule, ir: ModelIR, batches: list[dict]) -> list[float]:
    wanted = {n for b in ir.blocks for n in (b.stream_in, b.stream_out)}
    sums = [0.0] * len(ir.blocks)
    count = 0
    for batch in batches:
        values = run_recording(gm, batch, wanted)
        mask = token_mask(batch)
        count += int(mask.sum())
        for i, b in enumerate(ir.blocks):
            h_in, h_out = _rows(values[b.stream_in], mask), _rows(values[b.stream_out], mask)
            sums[i] += F.cosine_similarity(h_in.double(), h_out.double(), dim=-1).sum().item()
    if count == 0:
        raise CalibrationError("calibration batches hold no real token (every attention_mask is 0)")
    return [1.0 - s / count for s in sums]


def calibrate(policy: Policy, gm: fx.GraphModule, ir: ModelIR, batches: list[dict] | None) -> Plan:
    plan = Plan(policy=policy.to_dict(), block_paths=[b.path for b in ir.blocks])
    if isinstance(policy, Dense):
        return plan
    if isinstance(policy, PruneLayers):
        L = len(ir.blocks)
        if policy.layers is not None:
            bad = [i for i in policy.layers if i >= L]
            if bad:
                raise PolicyError(f"PruneLayers: block {bad[0]} does not exist; the model has {L} blocks "
                                  f"(0..{L - 1})")
            pruned = sorted(policy.layers)
        else:
            plan.block_influence = block_influence(gm, ir, batches)
            n = min(math.floor((1 - policy.keep) * L + 0.5), L - 1)
            order = sorted(range(L), key=lambda i: (plan.block_influence[i], i))
            pruned = sorted(order[:n])
        if len(pruned) >= L:
            raise PolicyError(f"PruneLayers would remove all {L} blocks; keep at least one")
        plan.pruned = pruned
        return plan
    if isinstance(policy, Duo):
        from routefx.compiler.duo import calibrate_duo
        calibrate_duo(policy, gm, ir, batches, plan)
        return plan
    raise PolicyError(f"no calibration for policy {type(policy).__name__}")
