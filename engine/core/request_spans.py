"""A request's engine spans, and the batches it ran in.

Each request's phase spans (`queue`, `prefill`, `decode`) are children of the request's
span (its `trace_context`: the service's `text_completion` span). They are coarse: never
one per token. Preemptions and resumptions are events on the phase span that was open;
cached prompt tokens, token counts and the sizes of the batches the phase ran in
(steps, min, mean, max) are attributes, kept as a few integers per request and step.

Batch composition in full is in sampled `engine_step` spans: at most one engine step
every `step_span_interval_s` becomes a span (a root of its own trace, since a step serves
many requests) with a link to the request span of every request it computed, carrying
what that request did in it. Their number per second is bounded whatever the load, and
each costs one link per request in the batch, so the cost per request stays flat.
"""
from __future__ import annotations

import time

from opentelemetry import trace
from opentelemetry.context import Context

from lumen.engine.core.batch_sizes import BatchSizes
from lumen.engine.core.scheduler import SchedulerOutput
from lumen.engine.core.sequence import Sequence

STEP_SPAN = "engine_step"


def wall_ns(monotonic_s: float) -> int:
    """A `time.monotonic()` reading as wall-clock nanoseconds (span timestamps)."""
    return time.time_ns() - int((time.monotonic() - monotonic_s) * 1e9)


def request_span_context(seq: Sequence) -> trace.SpanContext:
    return trace.get_current_span(seq.request.trace_context).get_span_context()


class SequenceSpans:
    def __init__(self, tracer: trace.Tracer, step_span_interval_s: float = 0.1) -> None:
        self.tracer = tracer
        self.step_span_interval_s = step_span_interval_s
        self._last_step_span = float("-inf")
        self._links: list[trace.Link] | None = None  # the links of the step being recorded

    def admitted(self, seq: Sequence) -> None:
        """The sequence left the waiting queue (first time: close `queue`, open `prefill`)."""
        if seq.span is not None:
            seq.span.add_event("resumed", {"lumen.recompute_tokens": seq.num_pending})
            return
        if seq.has_sampled:
            return
        ctx, now = seq.request.trace_context, time.time_ns()
        queue = self.tracer.start_span("queue", context=ctx, start_time=wall_ns(seq.request.arrival_time))
        queue.end(end_time=now)
        seq.span = self.tracer.start_span("prefill", context=ctx, start_time=now, attributes={
            "lumen.prompt_tokens": len(seq.prompt_ids),
            "lumen.cached_tokens": seq.num_cached_tokens,
        })
        seq.batches = BatchSizes()

    def preempted(self, seq: Sequence) -> None:
        if seq.span is not None:
            seq.span.add_event("preempted", {"lumen.computed_tokens_dropped": len(seq.token_ids)})

    def first_token(self, seq: Sequence, finished: bool) -> None:
        self.end(seq)
        if not finished:
            seq.span = self.tracer.start_span("decode", context=seq.request.trace_context)
            seq.batches = BatchSizes()

    def batched(self, sched: SchedulerOutput) -> None:
        """Before a step's forward: count its batch in the open phase of every sequence in it, and
        note its links if the step is to be recorded as a span."""
        size = len(sched.scheduled)
        for item in sched.scheduled:
            item.seq.batches.add(size)
        now = time.monotonic()
        if now - self._last_step_span < self.step_span_interval_s:
            self._links = None
            return
        self._last_step_span = now
        self._links = [trace.Link(request_span_context(item.seq), {
            "lumen.phase": "decode" if item.seq.has_sampled else "prefill",
            "lumen.step.tokens": item.num_new}) for item in sched.scheduled]

    def stepped(self, sched: SchedulerOutput, started_ns: int) -> None:
        """After a step: its `engine_step` span, if `batched` chose to record it."""
        if self._links is None:
            return
        links, self._links = self._links, None
        span = self.tracer.start_span(STEP_SPAN, context=Context(), start_time=started_ns, links=links,
                                      attributes={
                                          "lumen.engine.batch_size": len(sched.scheduled),
                                          "lumen.engine.step.tokens": sched.num_tokens,
                                          "lumen.engine.prefill_requests": sum(
                                              link.attributes["lumen.phase"] == "prefill" for link in links),
                                          "lumen.engine.admitted": len(sched.admitted),
                                          "lumen.engine.preempted": len(sched.preempted),
                                      })
        span.end()

    def end(self, seq: Sequence, cancelled: bool = False, error: BaseException | None = None) -> None:
        span, seq.span = seq.span, None
        if span is None:
            return
        if span.is_recording():
            span.set_attributes({"lumen.completion_tokens": seq.num_output,
                                 "lumen.preemptions": seq.num_preemptions, **seq.batches.attributes()})
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
