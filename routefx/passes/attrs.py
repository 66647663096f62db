"""Registering new tensors (copies of weights, router weights) on a GraphModule."""
from __future__ import annotations

import re

import torch
from torch import fx

__all__ = ["add_tensor_attr", "is_own_copy", "PREFIX"]

PREFIX = "routefx_"  # every tensor a pass registers starts with it


def add_tensor_attr(gm: fx.GraphModule, base: str, value: torch.Tensor) -> str:
    """Register `value` as a buffer of `gm` under a fresh name derived from `base`; returns the name."""
    name = re.sub(r"[^0-9a-zA-Z_]", "_", base)
    cand, i = name, 0
    while hasattr(gm, cand):
        i += 1
        cand = f"{name}_{i}"
    gm.register_buffer(cand, value.detach())
    return cand


def is_own_copy(gm: fx.GraphModule, n) -> bool:
    """`n` reads a tensor a pass registered (a copy), not one of the user's weights."""
    return isinstance(n, fx.Node) and n.op == "get_attr" and n.target.startswith(PREFIX)
