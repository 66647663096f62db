"""Token difficulty: does the oracle spend its compute on the tokens the dense model finds hard?

Per valid token: the oracle's compute fraction, the dense next-token loss and the dense predictive entropy;
their Pearson and Spearman correlations; per layer, the share of tokens the oracle sends to each route (where it
spends its big branches). Shapes: N valid tokens, L layers, R routes.
"""
from __future__ import annotations

import dataclasses

import torch
import torch.nn.functional as F

from routefx.analysis.forced import ForcedRoutes
from routefx.analysis.oracle import OracleResult

__all__ = ["Difficulty", "token_difficulty", "pearson", "spearman", "route_shares"]


def pearson(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.double() - a.double().mean(), b.double() - b.double().mean()
    den = (a.norm() * b.norm()).item()
    return float((a * b).sum() / den) if den > 0 else float("nan")


def _ranks(a: torch.Tensor) -> torch.Tensor:
    """Average ranks (ties share their mean rank)."""
    a = a.double()
    order = torch.argsort(a, stable=True)
    sorted_a = a[order]
    ranks = torch.empty_like(a)
    i, n = 0, len(a)
    while i < n:
        j = i
        while j + 1 < n and sorted_a[j + 1] == sorted_a[i]:
            j += 1
        ranks[order[i:j + 1]] = (i + j) / 2
        i = j + 1
    return ranks


def spearman(a: torch.Tensor, b: torch.Tensor) -> float:
    return pearson(_ranks(a), _ranks(b))


def route_shares(results: list[OracleResult], routes_count: int) -> torch.Tensor:
    """[L, R] share of valid tokens per route at each layer."""
    counts = None
    for res in results:
        r = res.routes[:, res.valid]                                   # [L, N]
        c = torch.stack([torch.bincount(row, minlength=routes_count) for row in r]).double()
        counts = c if counts is None else counts + c
    return counts / counts.sum(dim=1, keepdim=True).clamp_min(1)


@dataclasses.dataclass
class Difficulty:
    compute: torch.Tensor       # [N] oracle compute fraction per token
    dense_loss: torch.Tensor    # [N]
    entropy: torch.Tensor       # [N] dense predictive entropy (nats)
    shares: torch.Tensor        # [L, R] oracle route shares per layer

    @property
    def correlations(self) -> dict:
        return {"pearson_loss": pearson(self.compute, self.dense_loss),
                "spearman_loss": spearman(self.compute, self.dense_loss),
                "pearson_entropy": pearson(self.compute, self.entropy),
                "spearman_entropy": spearman(self.compute, self.entropy)}


def token_difficulty(forced: ForcedRoutes, batches: list[dict], results: list[OracleResult]) -> Difficulty:
    comp, loss, ent = [], [], []
    for batch, res in zip(batches, results):
        logits = forced(batch, forced.all_big(res.valid.shape)).double()   # [B, S, V]
        logp = F.log_softmax(logits, -1)
        h = -(logp.exp() * logp).sum(-1)                                   # [B, S]
        comp.append(res.cost[res.valid])
        loss.append(res.dense_loss[res.valid])
        ent.append(h[res.valid])
    return Difficulty(torch.cat(comp), torch.cat(loss), torch.cat(ent),
                      route_shares(results, forced.costs.shape[1]))
