"""Router trainers: per routed layer, turn calibration data into a linear router (logits = x·Wᵀ + b over routes).

A trainer is a class with `name`, `needs_labels` and `fit(x, labels, generator) -> (weight [R, d], bias [R])`;
`ROUTER_TRAINERS` maps names to them, so new routers (oracle-labelled, loss-trained) slot in by registering.
Shapes: N = calibration tokens (real ones only), d = hidden, R = routes (3: skip, small, big).
Fits run on CPU in fp64 whatever the model's device (`x` arrives on CPU; the plan holds CPU tensors and the
router pass moves them to the weights' device and dtype).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

__all__ = ["RouterTrainer", "RandomRouter", "LocalRouter", "ROUTER_TRAINERS"]


class RouterTrainer:
    name = "router"
    needs_labels = False

    def fit(self, x: torch.Tensor, labels: torch.Tensor | None, gen: torch.Generator, routes: int = 3):
        raise NotImplementedError


class RandomRouter(RouterTrainer):
    """A seeded random linear router: a per-token baseline that ignores difficulty."""

    name = "random"

    def fit(self, x, labels, gen, routes=3):
        d = x.shape[-1]
        scale = x.float().pow(2).mean().sqrt().clamp_min(1e-6)         # logits ~ N(0, 1) on this data
        w = torch.randn(routes, d, generator=gen, dtype=torch.float64) / (d ** 0.5 * scale.double())
        return w.to(x.dtype), torch.zeros(routes, dtype=x.dtype)


class LocalRouter(RouterTrainer):
    """Multinomial logistic regression on layer-local labels (L2-regularised, full batch, L-BFGS)."""

    name = "local"
    needs_labels = True

    def __init__(self, l2: float = 1e-3, max_iter: int = 60):
        self.l2, self.max_iter = l2, max_iter

    def fit(self, x, labels, gen, routes=3):
        x64 = x.double()                                              # [N, d]
        mu, sd = x64.mean(0), x64.std(0).clamp_min(1e-6)
        z = (x64 - mu) / sd                                           # standardised features
        w = torch.zeros(routes, x.shape[-1], dtype=torch.float64, requires_grad=True)
        b = torch.zeros(routes, dtype=torch.float64, requires_grad=True)
        counts = torch.bincount(labels, minlength=routes).double()
        with torch.no_grad():                                         # start from the label prior
            b.copy_(torch.log((counts + 1) / (counts.sum() + routes)))
        opt = torch.optim.LBFGS([w, b], max_iter=self.max_iter, line_search_fn="strong_wolfe")

        def closure():
            opt.zero_grad()
            loss = F.cross_entropy(z @ w.T + b, labels) + self.l2 * w.pow(2).sum()
            loss.backward()
            return loss

        with torch.enable_grad():
            opt.step(closure)
        # fold the standardisation back: (x - mu)/sd · wᵀ + b = x·(w/sd)ᵀ + (b - (mu/sd)·wᵀ)
        w_x = (w / sd).detach()
        b_x = (b - (mu / sd) @ w.T).detach()
        return w_x.to(x.dtype), b_x.to(x.dtype)


# "imitation" and "loss" start from the local router; the rewritten graph trains them (trained_routers.py)
ROUTER_TRAINERS: dict[str, RouterTrainer] = {"random": RandomRouter(), "local": LocalRouter(),
                                             "imitation": LocalRouter(), "loss": LocalRouter()}
