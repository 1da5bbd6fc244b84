"""Per-step statistics the engine reports to whoever observes it (telemetry, tests, benchmarks)."""
from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from lumen.engine.core.llm_engine import LLMEngine
    from lumen.engine.core.scheduler import SchedulerOutput
    from lumen.engine.speculative.speculation import SpecStepStats


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

    @classmethod
    def collect(cls, engine: "LLMEngine", sched: "SchedulerOutput", duration_s: float,
                spec: "SpecStepStats | None" = None) -> "StepStats":
        blocks, scheduler = engine.blocks, engine.scheduler
        spec_fields = {} if spec is None else dict(
            spec_drafts=spec.drafts, spec_draft_tokens=spec.draft_tokens,
            spec_accepted_tokens=spec.accepted_tokens, spec_accepted_per_position=spec.accepted_per_position)
        return cls(
            batch_size=len(sched.scheduled), num_tokens=sched.num_tokens,
            num_running=len(scheduler.running), num_waiting=len(scheduler.waiting),
            kv_blocks_used=blocks.num_blocks - blocks.num_free, kv_blocks_free=blocks.num_free,
            preemptions=len(sched.preempted), admitted=len(sched.admitted),
            cached_tokens=sched.cached_tokens, prefix_hits=sched.prefix_hits,
            duration_s=duration_s, **spec_fields,
            queue_times_s=tuple(s.first_scheduled - s.request.arrival_time
                                for s in sched.admitted if s.num_preemptions == 0),
        )
