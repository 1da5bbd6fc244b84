"""Per-step statistics the engine reports to whoever observes it (telemetry, tests, benchmarks)."""
from __future__ import annotations

from dataclasses import dataclass


@dataclass(slots=True, frozen=True)
class StepStats:
    batch_size: int          # sequences computed in this step
    num_tokens: int          # tokens computed in this step (prefill chunks + decodes)
    num_running: int
    num_waiting: int
    kv_blocks_used: int
    kv_blocks_free: int      # includes cached blocks that are free to evict
    preemptions: int         # in this step
    admitted: int            # sequences admitted in this step
    cached_tokens: int       # prompt tokens the admitted sequences found in the prefix cache
    prefix_hits: int         # admitted sequences that found any
    duration_s: float
    spec_drafts: int = 0         # requests whose speculative draft was verified in this step
    spec_draft_tokens: int = 0   # draft tokens verified
    spec_accepted_tokens: int = 0
    spec_accepted_per_position: tuple[int, ...] = ()  # [i]: drafts whose i-th token was accepted
    queue_times_s: tuple[float, ...] = ()  # arrival to first admission, of the requests first admitted now


@dataclass(slots=True, frozen=True)
class EngineLoad:
    """The queues and the KV cache at one moment (after a step, or after an abort between steps)."""
    num_running: int
    num_waiting: int
    kv_blocks_used: int
    kv_blocks_free: int      # includes cached blocks that are free to evict
