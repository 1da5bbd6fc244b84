"""Moves sequences between `waiting` and `running` and decides what each step computes.

One token-budget rule, no separate prefill and decode phases: each scheduled
sequence's computed tokens catch up to its known tokens, as far as the step's
budget allows (long prompts are split into chunks); a speculative draft adds its
tokens to its sequence's share, cut or dropped first when budget or blocks run short. Running sequences go first,
in admission order; when KV blocks run out, the most recently admitted one is
preempted (its blocks freed, its tokens recomputed later). Waiting sequences are
admitted in arrival order while blocks, budget and the running limit allow.
"""
from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field
from typing import Collection

from lumen.engine.core.block_manager import BlockManager
from lumen.engine.core.sequence import Sequence


@dataclass(slots=True)
class SchedulerConfig:
    max_running: int = 16           # sequences computed together in one step
    max_tokens_per_step: int = 512  # the token budget of one step (prefill chunks + decodes)
    max_waiting: int = 256          # queued requests beyond the running ones; past it, submit fails fast

    def __post_init__(self) -> None:
        for name in ("max_running", "max_tokens_per_step", "max_waiting"):
            if getattr(self, name) < (0 if name == "max_waiting" else 1):
                raise ValueError(f"{name} must be positive, got {getattr(self, name)}")


@dataclass(slots=True)
class ScheduledSeq:
    seq: Sequence
    num_new: int  # tokens computed for it this step


@dataclass(slots=True)
class SchedulerOutput:
    scheduled: list[ScheduledSeq] = field(default_factory=list)
    preempted: list[Sequence] = field(default_factory=list)
    admitted: list[Sequence] = field(default_factory=list)
    cached_tokens: int = 0  # prompt tokens new admissions found in the prefix cache
    prefix_hits: int = 0    # new admissions that found any

    @property
    def num_tokens(self) -> int:
        return sum(s.num_new for s in self.scheduled)


class Scheduler:
    def __init__(self, config: SchedulerConfig, blocks: BlockManager) -> None:
        self.config = config
        self.blocks = blocks
        self.waiting: deque[Sequence] = deque()
        self.running: list[Sequence] = []
        self.num_preemptions = 0

    def add(self, seq: Sequence) -> None:
        self.waiting.append(seq)

    def schedule(self, held: Collection[str] = ()) -> SchedulerOutput:
        """This step's work; sequences whose request id is in `held` are left as they are
        (their clients have not read their output yet), running or waiting."""
        out = SchedulerOutput()
        if held:
            self._yield_held_slots(out, held)
        yielded = len(out.preempted)
        budget = self._schedule_running(out, self.config.max_tokens_per_step, held)
        if len(out.preempted) == yielded:  # no preemption for lack of blocks: there is room to admit
            self._admit_waiting(out, budget, held)
        return out

    def _yield_held_slots(self, out: SchedulerOutput, held: Collection[str]) -> None:
        """A held sequence gives its running slot and blocks to a waiting one that can use them
        (a client that stops reading must not keep others waiting); it resumes, recomputing
        what the prefix cache no longer holds, once its client catches up."""
        ready = sum(seq.request_id not in held for seq in self.waiting)
        for seq in [s for s in reversed(self.running) if s.request_id in held][:ready]:
            self.running.remove(seq)
            self._preempt(seq)
            out.preempted.append(seq)

    def _schedule_running(self, out: SchedulerOutput, budget: int, held: Collection[str]) -> int:
        i = 0
        while i < len(self.running) and budget > 0:
            seq = self.running[i]
            if seq.request_id in held:
                i += 1
                continue
            num_new = self._fit_draft(seq, budget)
            while not self.blocks.can_grow(seq, seq.num_computed + num_new):
                if seq.draft is not None:  # drop a speculative draft before preempting anyone
                    seq.draft = None
                    num_new = min(seq.num_pending, budget)
                    continue
                victim = self.running.pop()  # the most recently admitted
                self._preempt(victim)
                out.preempted.append(victim)
                if victim is seq:
                    return budget
            self.blocks.grow(seq, seq.num_computed + num_new)
            out.scheduled.append(ScheduledSeq(seq, num_new))
            budget -= num_new
            i += 1
        return budget

    @staticmethod
    def _fit_draft(seq: Sequence, budget: int) -> int:
        """Tokens to compute for a running sequence: its pending ones, plus as much of its
        speculative draft as the budget leaves room for (the draft is cut to match)."""
        num_new = min(seq.num_pending, budget)
        if seq.draft is not None:
            room = budget - num_new if num_new == seq.num_pending else 0
            seq.draft.truncate(room)
            if not seq.draft.tokens:
                seq.draft = None
            else:
                num_new += len(seq.draft.tokens)
        return num_new

    def _admit_waiting(self, out: SchedulerOutput, budget: int, held: Collection[str]) -> None:
        i = 0
        while i < len(self.waiting) and budget > 0 and len(self.running) < self.config.max_running:
            seq = self.waiting[i]
            if seq.request_id in held:
                i += 1
                continue
            use_cache = not seq.request.prompt_logprobs  # cached tokens would have no logprobs
            admitted = self.blocks.admit(seq, budget, use_cache)
            if admitted is None:
                return  # not enough free blocks: it waits (in order) until some are released
            cached_tokens, num_new = admitted
            del self.waiting[i]
            seq.num_computed = cached_tokens
            if not seq.has_sampled and seq.num_preemptions == 0:  # a first admission, not a resume
                seq.num_cached_tokens = cached_tokens
                out.cached_tokens += cached_tokens
                out.prefix_hits += cached_tokens > 0
            seq.mark_scheduled()
            self.running.append(seq)
            out.admitted.append(seq)
            out.scheduled.append(ScheduledSeq(seq, num_new))
            budget -= num_new

    def _preempt(self, seq: Sequence) -> None:
        self.blocks.release(seq)
        seq.reset_for_recompute()
        self.waiting.appendleft(seq)
        self.num_preemptions += 1

    def finish(self, seq: Sequence) -> None:
        """A finished sequence leaves running; its full blocks stay cached for later prefixes."""
        self.running.remove(seq)
        self.blocks.release(seq)

    def remove(self, request_id: str) -> Sequence | None:
        """Abort: take the sequence out wherever it is and free its blocks at once."""
        for queue in (self.running, self.waiting):
            for seq in queue:
                if seq.request_id == request_id:
                    queue.remove(seq)
                    self.blocks.release(seq)
                    return seq
        return None

    def active(self) -> list[Sequence]:
        return list(self.running) + list(self.waiting)

    def __len__(self) -> int:
        return len(self.waiting) + len(self.running)
