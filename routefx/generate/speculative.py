"""Self-speculative decoding: a cheap routefx variant of the same model drafts, the full model verifies.

Greedy only; the output is identical to greedy decoding with the full model (up to the numerics of evaluating n+1
positions in one pass instead of one at a time). Each round:

    draft:   the draft model decodes n tokens d1..dn greedily from the last committed token c (its own cache)
    verify:  the full model runs [c, d1, ..., dn] in one decode pass (S = n+1): greedy tokens g0..gn
    accept:  the longest prefix with d(i+1) == g(i), a tokens (the same a for every row of the batch: the minimum
             over the rows still generating, so that the rows' caches keep one length), then the full model's
             own next token g(a): a+1 tokens per round, at least 1
    rewind:  both caches are cut back to the committed tokens (a growing cache rewinds by slicing)

`n` is fixed, or (`n=None`) chosen before each round to maximise the expected tokens per unit of time,
    E[tokens] / cost = ((1 - α^(n+1)) / (1 - α)) / (n · c_draft + c_verify)
from the acceptance rate α measured so far (per drafted token) and the measured seconds of a draft step and of a
verify pass (`choose_n`), between 1 and `n_max`.
"""
from __future__ import annotations

import dataclasses
import time

import torch

from routefx.errors import InputError, UnsupportedModelError
from routefx.generate.graphs import generation_graphs
from routefx.generate.loop import Stepper, _check
from routefx.generate.settings import resolve
from routefx.generate.step import position_dim

__all__ = ["speculative_generate", "SpeculativeStats", "choose_n", "tokens_per_time"]


@dataclasses.dataclass
class SpeculativeStats:
    rounds: int = 0
    drafted: int = 0             # draft tokens proposed (per row, summed over rounds)
    accepted: int = 0            # of which accepted
    draft_seconds: float = 0.0
    verify_seconds: float = 0.0
    n_chosen: list = dataclasses.field(default_factory=list)

    @property
    def acceptance(self) -> float:
        return self.accepted / self.drafted if self.drafted else 0.0

    @property
    def tokens_per_round(self) -> float:
        return (self.accepted + self.rounds) / self.rounds if self.rounds else 0.0


def tokens_per_time(alpha: float, n: int, draft_cost: float, verify_cost: float) -> float:
    """Expected accepted-plus-bonus tokens per unit of time with draft length n: ((1 - α^(n+1)) / (1 - α)) /
    (n · draft_cost + verify_cost), α clamped to [0, 0.999]."""
    alpha = min(max(alpha, 0.0), 0.999)
    return (1 - alpha ** (n + 1)) / (1 - alpha) / (n * draft_cost + verify_cost)


def choose_n(alpha: float, draft_cost: float, verify_cost: float, n_max: int = 8) -> int:
    """The draft length 1..n_max that maximises expected accepted-plus-bonus tokens per unit of time."""
    return max(range(1, n_max + 1), key=lambda n: tokens_per_time(alpha, n, draft_cost, verify_cost))


class _Rewindable(Stepper):
    """A stepper that can cut its cache back. The draft's and the full model's sessions alternate on the same cores:
    that costs nothing extra because ONNX Runtime's threads stop spinning when a run returns (backends/onnx.py).
    With ONNX Runtime's default (spinning on after a run) a step took 4x as long on 2 loaded cores; with no spinning
    at all, a speculative run on the trained d=256 LM took 1.6x as long."""

    def rewind(self, length: int) -> None:
        """Keep the first `length` positions of the cache (and mask, positions). The cache entries are sliced as
        they are (ONNX Runtime's arrays stay arrays: a round trip through torch tensors cost ~6% of a speculative
        run on the trained d=256 LM)."""
        cut = self.mask.shape[1] - length
        if cut:      # K/V [B, H, P, d]; indexer keys [B, P, d] (`routefx.generate.step.position_dim`)
            self._past = [t[:, :length] if position_dim(name) == 1 else t[:, :, :length]
                          for name, t in zip(self.g.past_names, self._past)]
            self.mask = self.mask[:, :length]
            self.pos = self.pos - cut


def speculative_generate(full, draft, input_ids, attention_mask=None, *, max_new_tokens: int = 20,
                         n: int | None = None, n_max: int = 8, eos_token_id=None, pad_token_id=None
                         ) -> tuple[torch.Tensor, SpeculativeStats]:
    """Greedy generation with `full` (a CompiledModel), drafted by `draft` (a CompiledModel of the same model,
    cheaper: pruned layers, Duo at a low budget). Returns ([B, S + new] like `generate`, stats)."""
    if full._model is not draft._model:
        raise InputError("the draft must be compiled from the same model as the full model (self-speculative)")
    if n is not None and not (isinstance(n, int) and n >= 1):
        raise InputError(f"n must be None (chosen from measured acceptance) or an int >= 1, got {n!r}")
    ids, mask = _check(input_ids, attention_mask, max_new_tokens)
    cfg = resolve(full._model, ids, mask, max_new_tokens=max_new_tokens, eos_token_id=eos_token_id,
                  pad_token_id=pad_token_id, do_sample=False)
    if cfg.processors:
        raise InputError(f"speculative decoding accepts the drafted tokens that equal plain greedy ones; the model's "
                         f"generation_config asks for logits processors {list(cfg.processors)}: set their settings "
                         "to the neutral values on model.generation_config, or use generate (which applies them)")
    eos, pad = cfg.eos, cfg.pad
    eos_t = torch.tensor(eos, dtype=torch.long, device=ids.device)
    B = ids.shape[0]
    graphs = generation_graphs(full)
    graphs.layout.refuse_recurrent(full._model, "speculative decoding (rewinding rejected drafts)", indexer_ok=True)
    if graphs.one_token:
        raise UnsupportedModelError(f"speculative decoding verifies n drafted tokens in one step; "
                                    f"{type(full._model).__name__}'s code takes one new token per cached step, so "
                                    "its decode graph takes one. Use generate")
    f, d = _Rewindable(full, mask), _Rewindable(draft, mask)
    stats = SpeculativeStats()
    unfinished = torch.ones(B, dtype=torch.bool, device=ids.device)
    out = [ids]
    if max_new_tokens == 0:
        return ids, stats
    cur = f.prefill(ids).argmax(-1)                         # [B] committed, in no cache yet
    d.prefill(ids)
    pending = cur[:, None]                                   # committed tokens the draft's cache lacks: [B, k]
    produced = 0
    t_draft, t_verify = None, None

    def commit(tokens):                                      # tokens: [B, k], in order
        nonlocal produced
        cols = []
        for j in range(tokens.shape[1]):
            if produced == max_new_tokens or not bool(unfinished.any()):
                break
            t = torch.where(unfinished, tokens[:, j], pad)
            cols.append(t)
            produced += 1
            if eos:
                unfinished.logical_and_(~torch.isin(t, eos_t))
        if cols:
            out.append(torch.stack(cols, dim=1))

    commit(cur[:, None])
    while produced < max_new_tokens and bool(unfinished.any()):
        k = n if n is not None else (4 if t_draft is None else
                                     choose_n(stats.acceptance if stats.drafted else 0.5, t_draft, t_verify, n_max))
        k = min(k, max_new_tokens - produced)                # no draft beyond what can still be committed
        stats.n_chosen.append(k)
        base = f.mask.shape[1]                               # cache length of both models before this round
        t0 = time.perf_counter()
        drafts = []
        logits = d.extend(pending)[:, -1]
        for i in range(k):
            drafts.append(logits.argmax(-1))
            if i + 1 < k:
                logits = d.decode(drafts[-1][:, None])
        drafts = torch.stack(drafts, dim=1)                  # [B, k]
        t1 = time.perf_counter()
        g = f.extend(torch.cat([cur[:, None], drafts], dim=1)).argmax(-1)   # [B, k+1]
        t2 = time.perf_counter()
        match = (drafts == g[:, :k]).long().cumprod(dim=1).sum(dim=1)      # [B] accepted prefix per row
        a = int(match[unfinished].min()) if bool(unfinished.any()) else k
        stats.rounds += 1
        stats.drafted += k
        stats.accepted += a
        t_draft = (t1 - t0) / k if t_draft is None else 0.8 * t_draft + 0.2 * (t1 - t0) / k
        t_verify = (t2 - t1) if t_verify is None else 0.8 * t_verify + 0.2 * (t2 - t1)
        bonus = g[:, a]
        commit(torch.cat([drafts[:, :a], bonus[:, None]], dim=1))
        f.rewind(base + 1 + a)                               # cur and the a accepted drafts
        d_len = d.mask.shape[1]                              # the draft's cache: c, d1..d(k-1)
        d.rewind(min(d_len, base + 1 + a))
        pending = torch.cat([drafts[:, d.mask.shape[1] - base - 1:a], bonus[:, None]], dim=1)
        cur = bonus
    stats.draft_seconds, stats.verify_seconds = t_draft or 0.0, t_verify or 0.0
    return torch.cat(out, dim=1), stats
