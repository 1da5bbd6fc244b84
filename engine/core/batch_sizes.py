"""The sizes of the engine steps one phase of a request ran in: a few integers, updated per step."""
from __future__ import annotations

from dataclasses import dataclass


@dataclass(slots=True)
class BatchSizes:
    """The sizes of the engine steps one phase of a request ran in."""
    steps: int = 0
    total: int = 0
    smallest: int = 0
    largest: int = 0

    def add(self, size: int) -> None:
        self.smallest = size if not self.steps else min(self.smallest, size)
        self.largest = max(self.largest, size)
        self.steps += 1
        self.total += size

    def attributes(self) -> dict[str, int | float]:
        if not self.steps:
            return {}
        return {"lumen.batch.steps": self.steps, "lumen.batch.size.min": self.smallest,
                "lumen.batch.size.max": self.largest, "lumen.batch.size.mean": round(self.total / self.steps, 2)}
