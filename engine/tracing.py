"""A sequence's phase spans: `queue`, `prefill`, `decode`, children of its request span.

Coarse spans only (never one per token); preemptions and resumptions are events
on the phase span that was open, cached prompt tokens an attribute of `prefill`.
"""
from __future__ import annotations

import time

from opentelemetry import trace

from engine.sequence import Sequence


def _wall_ns(monotonic_s: float) -> int:
    return time.time_ns() - int((time.monotonic() - monotonic_s) * 1e9)


class SequenceSpans:
    def __init__(self, tracer: trace.Tracer) -> None:
        self.tracer = tracer

    def admitted(self, seq: Sequence) -> None:
        """The sequence left the waiting queue (first time: close `queue`, open `prefill`)."""
        if seq.span is not None:
            seq.span.add_event("resumed", {"lumen.recompute_tokens": seq.num_pending})
            return
        if seq.has_sampled:
            return
        ctx, now = seq.request.trace_context, time.time_ns()
        queue = self.tracer.start_span("queue", context=ctx, start_time=_wall_ns(seq.request.arrival_time))
        queue.end(end_time=now)
        seq.span = self.tracer.start_span("prefill", context=ctx, start_time=now, attributes={
            "lumen.prompt_tokens": len(seq.prompt_ids),
            "lumen.cached_tokens": seq.num_cached_tokens,
        })

    def preempted(self, seq: Sequence) -> None:
        if seq.span is not None:
            seq.span.add_event("preempted", {"lumen.computed_tokens_dropped": len(seq.token_ids)})

    def first_token(self, seq: Sequence, finished: bool) -> None:
        self.end(seq)
        if not finished:
            seq.span = self.tracer.start_span("decode", context=seq.request.trace_context)

    def end(self, seq: Sequence, cancelled: bool = False, error: BaseException | None = None) -> None:
        span, seq.span = seq.span, None
        if span is None:
            return
        if span.is_recording():
            span.set_attribute("lumen.completion_tokens", seq.num_output)
            span.set_attribute("lumen.preemptions", seq.num_preemptions)
            if seq.draft_tokens:
                span.set_attribute("lumen.speculative.method", seq.spec_method.value)
                span.set_attribute("lumen.speculative.draft_tokens", seq.draft_tokens)
                span.set_attribute("lumen.speculative.accepted_tokens", seq.accepted_tokens)
            if cancelled:
                span.add_event("cancelled")
            if error is not None:
                span.record_exception(error)
                span.set_status(trace.StatusCode.ERROR, str(error))
        span.end()
