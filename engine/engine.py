"""The synchronous engine: `add_request`, `abort_request`, and `step()`.

One step = schedule -> one forward over the flattened tokens of every scheduled
sequence -> turn each sequence's logits into its output. The engine runs on one
thread (the async engine's); nothing here is thread-safe by itself.
"""
from __future__ import annotations

import time
from dataclasses import dataclass

import torch
from opentelemetry import trace

from engine.errors import InvalidRequestError
from engine.kv_cache import SequenceKVCache
from engine.loader import LoadedModel
from engine.model import ForwardBatch, LlamaModel, SequenceSlice
from engine.request import FinishReason, GenerationRequest, RequestOutput
from engine.sampling import MAX_TOP_LOGPROBS
from engine.scheduler import Scheduler
from engine.sequence import Sequence


@dataclass(slots=True)
class EngineConfig:
    max_running: int = 8
    default_max_new_tokens: int = 256

    def __post_init__(self) -> None:
        if self.max_running < 1:
            raise ValueError(f"max_running must be >= 1, got {self.max_running}")
        if self.default_max_new_tokens < 1:
            raise ValueError(f"default_max_new_tokens must be >= 1, got {self.default_max_new_tokens}")


class LLMEngine:
    def __init__(self, model: LoadedModel, config: EngineConfig | None = None,
                 tracer: trace.Tracer | None = None) -> None:
        self.loaded = model
        self.model = LlamaModel(model.config, model.weights)
        self.config = config or EngineConfig()
        self.tokenizer = model.tokenizer
        self.scheduler = Scheduler(self.config.max_running)
        self.tracer = tracer or trace.NoOpTracer()
        self.tokens_computed = 0  # all tokens ever run through the model (tests use it)

    @property
    def num_active(self) -> int:
        return len(self.scheduler)

    def has_unfinished(self) -> bool:
        return len(self.scheduler) > 0

    def validate(self, req: GenerationRequest) -> None:
        """Raise InvalidRequestError if the request cannot run on this model."""
        ctx, vocab = self.loaded.config.context_length, self.loaded.config.vocab_size
        if not req.prompt_ids:
            raise InvalidRequestError("prompt", "is empty: give a prompt, prompt_token_ids, or let BOS be added")
        bad = next((t for t in req.prompt_ids if not 0 <= t < vocab), None)
        if bad is not None:
            raise InvalidRequestError("prompt_token_ids", f"token id {bad} is outside the vocabulary [0, {vocab})")
        room = ctx - len(req.prompt_ids)
        if room < 1:
            raise InvalidRequestError(
                "prompt", f"has {len(req.prompt_ids)} tokens and leaves no room to generate in the "
                          f"{ctx}-token context; shorten it to at most {ctx - 1} tokens")
        if not 1 <= req.max_new_tokens <= room:
            raise InvalidRequestError(
                "stopping.max_new_tokens", f"must be in [1, {room}] for this {len(req.prompt_ids)}-token prompt "
                                           f"(context length {ctx}), got {req.max_new_tokens}")
        if not 0 <= req.top_logprobs <= MAX_TOP_LOGPROBS:
            raise InvalidRequestError("top_logprobs", f"must be in [0, {MAX_TOP_LOGPROBS}], got {req.top_logprobs}")

    def add_request(self, req: GenerationRequest) -> None:
        self.validate(req)
        capacity = len(req.prompt_ids) + req.max_new_tokens
        cache = SequenceKVCache(self.loaded.config, capacity, self.model.dtype)
        self.scheduler.add(Sequence(req, self.tokenizer, cache))

    def abort_request(self, request_id: str) -> RequestOutput | None:
        """Drop a request at once, freeing its cache; None if it is not here (already finished)."""
        seq = self.scheduler.remove(request_id)
        if seq is None:
            return None
        self._end_span(seq, aborted=True)
        return seq.final_output(FinishReason.ABORTED)

    def step(self) -> list[RequestOutput]:
        seqs = self.scheduler.schedule()
        if not seqs:
            return []
        now = time.time_ns()
        for seq in seqs:
            if seq.in_prefill:
                self._start_span(seq, "prefill", now, queue_s=time.monotonic() - seq.request.arrival_time)
        batch, rows = self._build_batch(seqs)
        logits = self.model.forward(batch)
        self.tokens_computed += int(batch.token_ids.numel())
        outputs = []
        for seq, (first, last), piece in zip(seqs, rows, batch.slices):
            was_prefill = seq.in_prefill
            out = seq.on_step(logits[first:last], piece.length)
            if was_prefill:
                self._end_span(seq)
                if not out.finished:
                    self._start_span(seq, "decode", time.time_ns())
            if out.finished:
                self.scheduler.remove(seq.request_id)
                self._end_span(seq)
            outputs.append(out)
        return outputs

    def fail_all(self, error: BaseException) -> list[RequestOutput]:
        """The model failed: finish every request with the error (never a made-up answer)."""
        outputs = []
        for seq in list(self.scheduler.running) + list(self.scheduler.waiting):
            self.scheduler.remove(seq.request_id)
            self._end_span(seq, error=error)
            outputs.append(seq.final_output(FinishReason.ERROR, error))
        return outputs

    def _build_batch(self, seqs: list[Sequence]) -> tuple[ForwardBatch, list[tuple[int, int]]]:
        token_ids: list[int] = []
        positions: list[int] = []
        slices, logit_rows, rows = [], [], []
        for seq in seqs:
            pending = seq.pending_ids()
            start = len(token_ids)
            slices.append(SequenceSlice(seq.cache, start, len(pending), seq.num_computed))
            token_ids.extend(pending)
            positions.extend(range(seq.num_computed, seq.num_computed + len(pending)))
            wanted = range(start, start + len(pending)) if seq.wants_prompt_logprobs() else [start + len(pending) - 1]
            rows.append((len(logit_rows), len(logit_rows) + len(wanted)))
            logit_rows.extend(wanted)
        batch = ForwardBatch(
            token_ids=torch.tensor(token_ids, dtype=torch.long),
            positions=torch.tensor(positions, dtype=torch.long),
            slices=slices,
            logits_indices=torch.tensor(logit_rows, dtype=torch.long),
        )
        return batch, rows

    def _start_span(self, seq: Sequence, name: str, start_ns: int, queue_s: float | None = None) -> None:
        ctx = seq.request.trace_context
        seq.span = self.tracer.start_span(name, context=ctx, start_time=start_ns)
        if queue_s is not None:
            seq.span.set_attribute("lumen.queue.duration_s", queue_s)
            seq.span.set_attribute("lumen.prompt_tokens", len(seq.prompt_ids))

    def _end_span(self, seq: Sequence, aborted: bool = False, error: BaseException | None = None) -> None:
        span, seq.span = seq.span, None
        if span is None:
            return
        if span.is_recording():
            span.set_attribute("lumen.completion_tokens", seq.num_output)
            if aborted:
                span.add_event("cancelled")
            if error is not None:
                span.record_exception(error)
                span.set_status(trace.StatusCode.ERROR, str(error))
        span.end()
