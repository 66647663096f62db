"""Oracle routing: per token, the cheapest routes over layers whose next-token loss stays within ε of the dense
loss (`eps` mode), or the lowest loss within a per-token compute budget (`budget` mode). An analysis and label
tool, never an inference path: it needs the targets.

Search: a beam over layers, in order 0..L-1, kept per token. A candidate fixes the routes of layers < l and
leaves the rest big; expanding layer l tries every route there; each token keeps its `beam` best candidates
(eps mode: feasible ones first, by cost then loss; infeasible ones after, by loss. budget mode: those within
the budget, by loss). The last layer's best candidate is the answer. Cost: L · (R − 1) · beam forward passes of
the batch (one pass per candidate slot, all tokens at once).

Approximation (stated): (1) with beam < R^(L−1) the beam can drop the optimum (beam 1 is greedy coordinate
descent, layer by layer); (2) tokens interact through attention, and all tokens move at once: token t's loss
for a candidate is measured while every other token also runs its own candidate of the same slot, so the ε bound
is exact only where tokens do not interact (each token its own sequence, or attention restricted to the token
itself). `OracleResult.loss` is re-measured in one joint run of the chosen routes, so `violations` says how
often the bound broke because of (2). With beam >= R^(L−1) and non-interacting tokens the search is exhaustive.
"""
from __future__ import annotations

import dataclasses

import torch
import torch.nn.functional as F

from routefx.analysis.forced import ForcedRoutes
from routefx.errors import PolicyError

__all__ = ["OracleResult", "oracle_routes", "token_losses", "shifted_labels"]

IGNORE = -100


def shifted_labels(batch: dict) -> torch.Tensor:
    """[B, S] next-token targets of a causal LM: ids shifted left; the last position and padding are IGNORE."""
    ids = batch["input_ids"]
    labels = torch.full_like(ids, IGNORE)
    labels[:, :-1] = ids[:, 1:]
    mask = batch.get("attention_mask")
    if isinstance(mask, torch.Tensor):
        labels[:, :-1][~mask[:, 1:].bool()] = IGNORE
        labels[~mask.bool()] = IGNORE
    return labels


def token_losses(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """[..., S] cross-entropy per position (0 where the label is IGNORE), in float64."""
    flat = F.cross_entropy(logits.reshape(-1, logits.shape[-1]).double(), labels.reshape(-1),
                           ignore_index=IGNORE, reduction="none")
    return flat.view(labels.shape)


@dataclasses.dataclass
class OracleResult:
    """Shapes: L layers, B batch, S sequence. Positions with IGNORE labels keep all-big routes."""

    routes: torch.Tensor        # [L, B, S] int64 chosen routes
    loss: torch.Tensor          # [B, S] loss of the chosen routes, one joint run (float64)
    dense_loss: torch.Tensor    # [B, S] loss with every layer big
    cost: torch.Tensor          # [B, S] mean compute fraction over layers of the chosen routes
    valid: torch.Tensor         # [B, S] bool: positions with a target
    search_loss: torch.Tensor   # [B, S] loss of the chosen candidate as measured during the search

    @property
    def violations(self) -> float:
        """Fraction of valid tokens whose joint-run loss differs from the search's by more than 1e-6 nats."""
        d = (self.loss - self.search_loss).abs()[self.valid]
        return float((d > 1e-6).double().mean()) if d.numel() else 0.0


def _rank(feasible, primary, secondary, beam):
    """Per token, indices of the `beam` best candidates: feasible first, then by `primary`, then `secondary`.
    All [..., C]; returns [..., beam]."""
    order = torch.argsort(secondary, dim=-1, stable=True)
    order = order.gather(-1, torch.argsort(primary.gather(-1, order), dim=-1, stable=True))
    order = order.gather(-1, torch.argsort((~feasible).gather(-1, order).to(torch.int8), dim=-1, stable=True))
    return order[..., :beam]


def oracle_routes(forced: ForcedRoutes, batch: dict, labels: torch.Tensor | None = None, *, eps: float | None = None,
                  budget: float | None = None, beam: int = 1, chunk: int = 4) -> OracleResult:
    """Oracle routes for one batch (see the module docstring). Exactly one of `eps` (nats above the dense loss)
    or `budget` (per-token mean compute fraction over layers) is given. `chunk` candidate slots run per forward
    pass (stacked along the batch)."""
    if (eps is None) == (budget is None):
        raise PolicyError(f"oracle_routes takes exactly one of eps= or budget=; got eps={eps!r}, budget={budget!r}")
    if beam < 1:
        raise PolicyError(f"oracle_routes: beam must be >= 1, got {beam!r}")
    labels = shifted_labels(batch) if labels is None else labels
    valid = labels != IGNORE
    L, R = forced.costs.shape
    B, S = labels.shape
    costs = forced.costs                                                  # [L, R] float64
    big = forced.all_big((B, S))                                          # [L, B, S]
    dense = token_losses(forced(batch, big), labels)                      # [B, S]

    # beam state per token: W slots of (routes [W, L, B, S], loss [W, B, S], cost so far [W, B, S], alive)
    routes = big.unsqueeze(0)                                             # [1, L, B, S]
    loss = dense.unsqueeze(0)                                             # [1, B, S]
    spent = torch.zeros(1, B, S, dtype=torch.float64)                    # cost of layers decided so far
    alive = torch.ones(1, B, S, dtype=torch.bool)
    for layer in range(L):
        cand_routes, cand_loss, cand_spent, cand_alive = [], [], [], []
        for r in range(R):
            rr = routes.clone()
            rr[:, layer] = r                                              # [W, L, B, S]
            if r == int(forced.big[layer]):
                lr = loss                                                 # the slot itself: already measured
            else:
                lr = _run_slots(forced, batch, rr, labels, chunk)         # [W, B, S]
            cand_routes.append(rr)
            cand_loss.append(lr)
            cand_spent.append(spent + costs[layer, r])
            cand_alive.append(alive)
        rs = torch.cat(cand_routes)                                       # [C, L, B, S], C = R·W
        ls, sp, al = torch.cat(cand_loss), torch.cat(cand_spent), torch.cat(cand_alive)
        if eps is not None:
            total = sp + costs[layer + 1:].max(dim=1).values.sum()        # the rest big
            feasible = al & (ls <= dense + eps)
            primary = torch.where(feasible, total.round(decimals=9), ls)
            secondary = torch.where(feasible, ls, total)
        else:
            feasible = al & (sp.round(decimals=9) <= round(budget * L, 9))
            primary, secondary = ls, sp
        # dead slots (copies) rank last
        primary = torch.where(al, primary, torch.full_like(primary, float("inf")))
        keep = _rank(feasible.movedim(0, -1), primary.movedim(0, -1), secondary.movedim(0, -1),
                     min(beam, rs.shape[0]))                              # [B, S, W']
        keep = keep.movedim(-1, 0)                                        # [W', B, S]
        routes = rs.gather(0, keep.unsqueeze(1).expand(-1, L, -1, -1))
        loss, spent = ls.gather(0, keep), sp.gather(0, keep)
        alive = al.gather(0, keep)
    chosen = torch.where(valid.unsqueeze(0), routes[0], big)              # positions without a target: big
    final = token_losses(forced(batch, chosen), labels)
    cost = costs.gather(1, chosen.reshape(L, -1)).reshape(L, B, S).mean(0)
    return OracleResult(chosen, final, dense, cost, valid, torch.where(valid, loss[0], dense))


def _run_slots(forced: ForcedRoutes, batch: dict, routes: torch.Tensor, labels: torch.Tensor, chunk: int):
    """Losses [W, B, S] of W route slots [W, L, B, S], `chunk` slots per forward pass stacked along the batch."""
    W = routes.shape[0]
    out = []
    for s in range(0, W, chunk):
        rr = routes[s:s + chunk]                                          # [c, L, B, S]
        c = rr.shape[0]
        stacked = {k: (v.repeat(c, *([1] * (v.dim() - 1))) if isinstance(v, torch.Tensor) else v)
                   for k, v in batch.items()}
        r2 = rr.permute(1, 0, 2, 3).reshape(rr.shape[1], -1, rr.shape[-1])  # [L, c·B, S]
        logits = forced(stacked, r2)                                      # [c·B, S, V]
        out.append(token_losses(logits, labels.repeat(c, 1)).view(c, *labels.shape))
    return torch.cat(out)


def fit_oracle(forced: ForcedRoutes, batches: list[dict], budget: float, *, beam: int = 1, tol: float = 0.01,
               iters: int = 12, progress: bool = False) -> tuple[float, list[OracleResult]]:
    """The ε whose oracle routes meet a global `budget` (mean compute fraction over layers and valid tokens of
    `batches`) within `tol`, by bisection (the fraction falls as ε rises); returns (ε, results per batch)."""
    from tqdm.auto import tqdm

    from routefx.calibrate.search import bisect_decreasing

    def at(eps):
        res = [oracle_routes(forced, b, eps=eps, beam=beam) for b in batches]
        return res

    def fraction(res):
        c = torch.cat([r.cost[r.valid] for r in res])
        return float(c.mean())

    hi = 0.05
    with tqdm(total=iters, desc=f"oracle ε for budget {budget}", leave=False, disable=not progress) as bar:
        while fraction(at(hi)) > budget and hi < 64:
            hi *= 4
        found = bisect_decreasing(lambda e: (bar.update(1), at(e))[1], budget, -1.0, hi, iters,
                                  key=fraction, tol=tol)
    return found.best_x, found.best
