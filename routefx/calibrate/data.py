"""Calibration data: a re-iterable sequence of batches, each a dict of the model's keyword arguments.

A bare tensor stands for `{"input_ids": tensor}`. Padding positions (attention_mask == 0) are excluded from
every statistic: `token_mask(batch)` says which positions count. Batches may differ in which inputs they carry
only where a default is defined: a batch without `attention_mask`, beside batches with one, gets a mask of ones
(`complete_batches`); calls to the compiled model may use yet another input set (the plan does not depend on it).
"""
from __future__ import annotations

from collections.abc import Iterable, Iterator, Mapping

import torch

from routefx.errors import CalibrationError

__all__ = ["normalize_calibration", "complete_batches", "token_mask"]

MASK = "attention_mask"


def normalize_calibration(calibration) -> list[dict]:
    """Validate and return the batches as dicts. Raises `CalibrationError` with what was found."""
    if calibration is None:
        raise CalibrationError("this policy needs calibration data; pass calibration=[batch, ...] where a batch "
                               "is a dict of the model's keyword arguments or an input_ids tensor")
    if isinstance(calibration, (torch.Tensor, Mapping)):
        raise CalibrationError(f"calibration must be a sequence of batches, got a single "
                               f"{type(calibration).__name__}; wrap it in a list")
    if isinstance(calibration, Iterator) or not isinstance(calibration, Iterable):
        raise CalibrationError(f"calibration must be re-iterable (a list, tuple or Dataset-like sequence), got "
                               f"{type(calibration).__name__}")
    batches = []
    for i, b in enumerate(calibration):
        if isinstance(b, torch.Tensor):
            b = {"input_ids": b}
        if not isinstance(b, Mapping) or not b:
            raise CalibrationError(f"calibration batch {i} is a {type(b).__name__}; expected a non-empty dict of "
                                   "keyword arguments or an input_ids tensor")
        batches.append(dict(b))
    if not batches:
        raise CalibrationError("calibration is empty: give at least one batch")
    return batches


def _tensor_keys(batch: Mapping) -> set[str]:
    return {k for k, v in batch.items() if isinstance(v, torch.Tensor)}


def complete_batches(batches: list[dict]) -> list[dict]:
    """Give every batch the same inputs: a missing attention_mask (when another batch has one) becomes all
    ones; any other difference in tensor inputs or constants is a `CalibrationError`."""
    union = set().union(*(_tensor_keys(b) for b in batches))
    like = next((b[MASK] for b in batches if isinstance(b.get(MASK), torch.Tensor)), None)
    consts = {k: v for k, v in batches[0].items() if not isinstance(v, torch.Tensor)}
    out = []
    for i, b in enumerate(batches):
        b = dict(b)
        if MASK in union and MASK not in b:
            b[MASK] = torch.ones(token_mask(b).shape, dtype=like.dtype, device=like.device)
        missing = sorted(union - _tensor_keys(b))
        if missing:
            raise CalibrationError(f"calibration batch {i} lacks {missing}, which other batches carry; only "
                                   f"{MASK!r} has a default (all ones)")
        here = {k: v for k, v in b.items() if not isinstance(v, torch.Tensor)}
        if repr(sorted(here.items())) != repr(sorted(consts.items())):
            raise CalibrationError(f"calibration batch {i} has constant inputs {here}; batch 0 has {consts}: "
                                   "give every batch the same non-tensor arguments")
        out.append(b)
    return out


def token_mask(batch: Mapping) -> torch.Tensor:
    """[B, S] bool on CPU (it indexes values on any device): True where the position is a real token."""
    mask = batch.get(MASK)
    if isinstance(mask, torch.Tensor):
        return mask.bool().cpu()
    ref = next(v for v in batch.values() if isinstance(v, torch.Tensor))
    return torch.ones(ref.shape[:2], dtype=torch.bool)
