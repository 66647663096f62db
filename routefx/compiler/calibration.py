"""Calibration data: a re-iterable sequence of batches, each a dict of the model's keyword arguments.

A bare tensor stands for `{"input_ids": tensor}`. Padding positions (attention_mask == 0) are excluded from
every statistic: `token_mask(batch)` says which positions count.
"""
from __future__ import annotations

from collections.abc import Iterable, Iterator, Mapping

import torch

from routefx.errors import CalibrationError

__all__ = ["normalize_calibration", "token_mask"]


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


def token_mask(batch: Mapping) -> torch.Tensor:
    """[B, S] bool on CPU (it indexes values on any device): True where the position is a real token."""
    mask = batch.get("attention_mask")
    ref = next(v for v in batch.values() if isinstance(v, torch.Tensor))
    if mask is None:
        return torch.ones(ref.shape[:2], dtype=torch.bool)
    return mask.bool().cpu()
