"""The global price λ on branch cost: one graph buffer that every per-token router reads.

A router picks route argmax(x·Wᵀ + b − λ·cost) (cost = (0, k/F, 1) for skip / small / big), so raising λ moves
tokens to cheaper routes. `passes/insert_routers.py` creates the buffer from `plan.lam`; the budget step of
calibration (`calibrate/budget.py`) sets it while it searches; nothing else reads or writes it.
"""
from __future__ import annotations

import torch
from torch import fx

__all__ = ["LAMBDA_ATTR", "ALL_BIG", "has_price", "add_price_", "set_price_", "get_price"]

LAMBDA_ATTR = "routefx_lambda"
ALL_BIG = -1e30  # the λ of budget 1.0: every token takes the big branch, whatever the router says


def has_price(gm: fx.GraphModule) -> bool:
    return hasattr(gm, LAMBDA_ATTR)


def add_price_(gm: fx.GraphModule, lam: float, device: torch.device | None = None) -> str:
    """Register the λ buffer (once, on `device`: the graph's inputs') and return its attribute name."""
    if not has_price(gm):
        gm.register_buffer(LAMBDA_ATTR, torch.tensor(lam, dtype=torch.float32, device=device))
    return LAMBDA_ATTR


def set_price_(gm: fx.GraphModule, lam: float) -> None:
    getattr(gm, LAMBDA_ATTR).fill_(lam)


def get_price(gm: fx.GraphModule) -> float:
    return float(getattr(gm, LAMBDA_ATTR))
