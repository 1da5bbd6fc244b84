"""Moves sequences between `waiting` and `running`; decides what each step computes.

In this version every running sequence computes all its pending tokens each step
(its whole prompt on admission, then one token). Token budgets, chunked prefill
and preemption belong to the paged-KV scheduler of the batching issue.
"""
from __future__ import annotations

from collections import deque

from engine.sequence import Sequence


class Scheduler:
    def __init__(self, max_running: int) -> None:
        if max_running < 1:
            raise ValueError(f"max_running must be >= 1, got {max_running}")
        self.max_running = max_running
        self.waiting: deque[Sequence] = deque()
        self.running: list[Sequence] = []

    def add(self, seq: Sequence) -> None:
        self.waiting.append(seq)

    def schedule(self) -> list[Sequence]:
        """Admit waiting sequences in arrival order while there is room; return this step's sequences."""
        while self.waiting and len(self.running) < self.max_running:
            self.running.append(self.waiting.popleft())
        return list(self.running)

    def remove(self, request_id: str) -> Sequence | None:
        for queue in (self.running, self.waiting):
            for seq in queue:
                if seq.request_id == request_id:
                    queue.remove(seq)
                    return seq
        return None

    def __len__(self) -> int:
        return len(self.waiting) + len(self.running)
