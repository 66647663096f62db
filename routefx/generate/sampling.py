"""Choosing the next token from the logits of the last position: greedy, or sampling with a temperature and top-k.

The order of the sampling steps is Hugging Face's (temperature, then top-k, then softmax and one multinomial
draw), so that the same logits and the same random stream give the same tokens.
"""
from __future__ import annotations

import dataclasses

import torch

from routefx.errors import InputError

__all__ = ["Sampler"]


@dataclasses.dataclass(frozen=True)
class Sampler:
    do_sample: bool = False
    temperature: float = 1.0
    top_k: int | None = None
    generator: torch.Generator | None = None

    def __post_init__(self):
        if not (isinstance(self.temperature, (int, float)) and self.temperature > 0):
            raise InputError(f"temperature must be a number > 0, got {self.temperature!r}")
        if self.top_k is not None and not (isinstance(self.top_k, int) and self.top_k >= 1):
            raise InputError(f"top_k must be None or an int >= 1, got {self.top_k!r}")

    def __call__(self, logits: torch.Tensor) -> torch.Tensor:
        """logits: [B, V] -> token ids [B] (int64)."""
        if not self.do_sample:
            return logits.argmax(dim=-1)
        scores = logits.float() / self.temperature
        if self.top_k is not None and self.top_k < scores.shape[-1]:
            kth = torch.topk(scores, self.top_k, dim=-1).values[..., -1:]      # [B, 1]
            scores = scores.masked_fill(scores < kth, float("-inf"))
        probs = torch.softmax(scores, dim=-1)
        return torch.multinomial(probs, num_samples=1, generator=self.generator).squeeze(1)
