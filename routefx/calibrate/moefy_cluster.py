"""MoEfy's two fits: balanced clusters of neurons (the experts) and a linear expert router.

Shapes: N = calibration tokens (real ones), F = neurons of one FFN, E = experts, W = F / E neurons per expert,
d = hidden. Both fits run on CPU in fp32/fp64 and are deterministic for a given generator.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

__all__ = ["balanced_kmeans", "balanced_assign", "fit_expert_router", "top_k_targets"]


def balanced_assign(scores: torch.Tensor, capacity: int) -> torch.Tensor:
    """[F] cluster of each row of `scores` [F, E] (higher = closer), every cluster taking exactly `capacity` rows.

    Greedy on the pairs in decreasing score: a pair is taken when its row is free and its cluster not full. With
    F = E * capacity every row finds a place (a free cluster always remains while a row is free).
    """
    n_rows, n_clusters = scores.shape
    assert n_rows == n_clusters * capacity, (n_rows, n_clusters, capacity)
    order = torch.argsort(scores.reshape(-1), descending=True, stable=True).tolist()
    assign = [-1] * n_rows
    left = [capacity] * n_clusters
    placed = 0
    for flat in order:
        row, c = divmod(flat, n_clusters)
        if assign[row] < 0 and left[c] > 0:
            assign[row] = c
            left[c] -= 1
            placed += 1
            if placed == n_rows:
                break
    return torch.tensor(assign, dtype=torch.int64)


def balanced_kmeans(features: torch.Tensor, experts: int, gen: torch.Generator, iters: int = 30) -> torch.Tensor:
    """[F] expert of each neuron: spherical k-means on `features` [F, N] (a neuron's activation pattern over the
    calibration tokens), centred per neuron so that similarity is the correlation of two neurons' patterns
    (co-activation, not shared magnitude), with clusters of exactly F / experts neurons (balanced assignment at
    every step). Seeding is k-means++ on that distance, from `gen`; the loop stops when the assignment no longer
    changes.
    """
    n = features.shape[0]
    f = features.double()
    z = F.normalize(f - f.mean(1, keepdim=True), dim=1)                    # [F, N] unit rows: correlation
    first = int(torch.randint(n, (1,), generator=gen))
    centres = [z[first]]
    for _ in range(experts - 1):                                           # k-means++ seeding
        sim = torch.stack([z @ c for c in centres], 1).max(1).values       # [F]
        dist = (1 - sim).clamp_min(0) + 1e-12
        centres.append(z[int(torch.multinomial(dist, 1, generator=gen))])
    c = torch.stack(centres)                                               # [E, N]
    assign = None
    for _ in range(iters):
        new = balanced_assign(z @ c.T, n // experts)                       # [F]
        if assign is not None and torch.equal(new, assign):
            break
        assign = new
        onehot = F.one_hot(assign, experts).double()                       # [F, E]
        c = F.normalize(onehot.T @ z, dim=1)                               # [E, N] mean direction per cluster
    return assign


def top_k_targets(mass: torch.Tensor, k: int) -> torch.Tensor:
    """[N, E] router targets: uniform over each token's k experts of largest activation mass (`mass` [N, E])."""
    top = mass.topk(k, dim=-1).indices                                     # [N, k]
    return torch.zeros_like(mass, dtype=torch.float64).scatter_(-1, top, 1.0 / k)


def fit_expert_router(x: torch.Tensor, targets: torch.Tensor, steps: int, lr: float = 0.02,
                      weight_decay: float = 1e-4) -> tuple[torch.Tensor, torch.Tensor]:
    """A linear router (logits = x·Wᵀ + b, W [E, d], b [E]) trained by full-batch Adam for `steps` steps on the
    cross-entropy against `targets` [N, E] (rows sum to 1), on standardised features; returned for raw x.
    The bias starts at the log of the targets' prior, W at 0 (no randomness: the fit is deterministic)."""
    x64 = x.double()                                                       # [N, d]
    mu, sd = x64.mean(0), x64.std(0).clamp_min(1e-6)
    z = ((x64 - mu) / sd).float()
    t = targets.float()
    n_experts = t.shape[1]
    w = torch.zeros(n_experts, x.shape[1], requires_grad=True)
    b = torch.log(t.mean(0).clamp_min(1e-6)).requires_grad_(True)
    opt = torch.optim.Adam([w, b], lr=lr)
    with torch.enable_grad():
        for _ in range(steps):
            opt.zero_grad()
            logits = z @ w.T + b                                           # [N, E]
            loss = -(t * F.log_softmax(logits, -1)).sum(-1).mean() + weight_decay * w.pow(2).sum()
            loss.backward()
            opt.step()
    # fold the standardisation back: (x - mu)/sd · wᵀ + b = x·(w/sd)ᵀ + (b - (mu/sd)·wᵀ)
    w64, b64 = w.detach().double(), b.detach().double()
    return (w64 / sd).to(x.dtype), (b64 - (mu / sd) @ w64.T).to(x.dtype)
