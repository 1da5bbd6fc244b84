"""A proposal: the drafted tokens and, for a sampled draft, the distributions they came from."""
from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(slots=True)
class Draft:
    tokens: list[int]
    # [len(tokens), vocab]: row i is the draft's distribution q_i that tokens[i] was drawn from.
    # None for a deterministic proposal (greedy draft model, n-gram lookup): q_i is one-hot.
    probs: torch.Tensor | None = None

    def truncate(self, length: int) -> None:
        del self.tokens[length:]
        if self.probs is not None:
            self.probs = self.probs[:length]
