"""Block Influence (ShortGPT): BI_i = 1 - mean over real tokens of cos(h_in, h_out), h_in / h_out the residual
stream before and after block i. Padding positions are excluded."""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import fx

from routefx.calibrate.data import token_mask
from routefx.calibrate.record import run_recording
from routefx.errors import CalibrationError
from routefx.ir.model_ir import ModelIR

__all__ = ["block_influence"]


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
