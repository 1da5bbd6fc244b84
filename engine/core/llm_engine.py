"""The synchronous engine: `add_request`, `abort_request`, and `step()`.

One step = draft (speculative requests that are decoding get proposals for their next
tokens) -> schedule() -> ONE forward over the flattened new tokens of every scheduled
sequence, drafts included -> update each sequence from its logits (verifying drafts).
The engine runs on one thread (the async engine's); nothing here is thread-safe by itself.
"""
from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field, replace
from typing import Callable, Collection

from opentelemetry import trace

from lumen.engine.core.block_manager import BlockManager
from lumen.engine.core.request import FinishReason, GenerationRequest, RequestOutput
from lumen.engine.core.request_spans import SequenceSpans
from lumen.engine.core.scheduler import ScheduledSeq, Scheduler, SchedulerConfig, SchedulerOutput
from lumen.engine.core.sequence import Sequence
from lumen.engine.core.step_stats import EngineLoad, StepStats
from lumen.engine.errors import InvalidRequestError, quoted
from lumen.engine.lora.registry import LoadedAdapter, LoraConfig
from lumen.engine.model.llama import Chunk, ForwardBatch, build_batch
from lumen.engine.model.placement import CPU_NATIVE, Placement
from lumen.engine.model.runner import KVSizing, ModelRunner, RowResult
from lumen.engine.native.kernels import MATMUL_MODES
from lumen.engine.sampling.logprobs import MAX_TOP_LOGPROBS
from lumen.engine.speculative import SpeculativeConfig
from lumen.engine.speculative.speculation import SpecStepStats, Speculation
from lumen.engine.weights.loaded_model import LoadedModel

log = logging.getLogger(__name__)

MAX_STOP_TOKEN_IDS = 64  # a request's stop_token_ids (checked after every token)
MAX_LORA_SCALE = 10.0


@dataclass(slots=True)
class EngineConfig:
    scheduler: SchedulerConfig = field(default_factory=SchedulerConfig)
    default_max_new_tokens: int = 256
    kv_cache_bytes: int = 1 << 30  # KV pool budget; capped at what max_running full contexts can use
    block_size: int = 16
    prefix_caching: bool = True
    speculative: SpeculativeConfig = field(default_factory=SpeculativeConfig)
    # At most one engine step per interval becomes an `engine_step` span (0: every step).
    step_span_interval_s: float = 0.1
    # How the C kernels multiply (lumen.engine.native.kernels.MATMUL_MODES): "exact" (float32 on
    # the exactly decoded weights), "int8" (8-bit activations, integer dot products: faster on
    # AVX2, less precise) or "auto" (per weight type, the faster of the two on the kernel build).
    # Applied to the model's weights (and a draft model's) when the engine starts.
    matmul_mode: str = "exact"
    # Where the model computes (lumen.engine.model.placement); None: the CPU with the C kernels,
    # in the loaded weights' dtype.
    placement: Placement | None = None
    # On CUDA, the share of the GPU's memory the weights, activations and KV pool may use.
    gpu_memory_utilization: float = 0.9
    # On CUDA, decode steps replay CUDA graphs (lumen.engine.model.cuda_graphs) unless this is set.
    enforce_eager: bool = False
    # LoRA adapters: how many may be loaded at once, and their largest rank.
    lora: LoraConfig = field(default_factory=LoraConfig)

    def __post_init__(self) -> None:
        if self.default_max_new_tokens < 1:
            raise ValueError(f"default_max_new_tokens must be >= 1, got {self.default_max_new_tokens}")
        if self.block_size < 1 or self.block_size & (self.block_size - 1):
            raise ValueError(f"block_size must be a power of two, got {self.block_size}")
        if self.step_span_interval_s < 0:
            raise ValueError(f"step_span_interval_s must be >= 0, got {self.step_span_interval_s}")
        if not 0 < self.gpu_memory_utilization <= 1:
            raise ValueError(f"gpu_memory_utilization must be in (0, 1], got {self.gpu_memory_utilization}")
        if self.matmul_mode not in MATMUL_MODES:
            raise ValueError(f"matmul_mode must be one of {', '.join(MATMUL_MODES)}, got {self.matmul_mode!r}")


class LLMEngine:
    def __init__(self, model: LoadedModel, config: EngineConfig | None = None,
                 tracer: trace.Tracer | None = None, on_step: Callable[[StepStats], None] | None = None,
                 draft: LoadedModel | None = None, on_load: Callable[[EngineLoad], None] | None = None) -> None:
        """draft: a smaller model with the same vocabulary for SpecMethod.DRAFT (checked here).
        on_step: called after each step with its statistics; on_load: called with the queues' and
        the KV cache's state whenever it changes outside a step (a request added, aborted or failed)."""
        self.loaded = model
        self.config = config or EngineConfig()
        cfg, sched = model.config, self.config.scheduler
        for weights in [model.weights] + ([draft.weights] if draft is not None else []):
            weights.set_matmul_mode(self.config.matmul_mode)
        placement = self.config.placement or replace(CPU_NATIVE, dtype=model.weights.dtype)
        sizing = KVSizing(self.config.kv_cache_bytes, self.config.gpu_memory_utilization, self.config.block_size,
                          sched.max_running * cfg.context_length, sched.max_tokens_per_step)
        graph_batch = sched.max_running if placement.on_cuda and not self.config.enforce_eager else 0
        self.runner = ModelRunner(model, placement, sizing, graph_batch, lora=self.config.lora)
        self.lora = self.runner.lora   # the adapters it serves (lumen.engine.lora.registry)
        self.kv, self.model = self.runner.kv, self.runner.model
        spec = self.runner.kv_spec
        self.blocks = BlockManager(spec.num_blocks, spec.block_size, self.config.prefix_caching)
        self.scheduler = Scheduler(self.config.scheduler, self.blocks)
        self.tokenizer = model.tokenizer
        self.spans = SequenceSpans(tracer or trace.NoOpTracer(), self.config.step_span_interval_s)
        self.speculation = Speculation(self.config.speculative, model, self.runner, self.blocks,
                                       self.config.scheduler.max_running, self.config.kv_cache_bytes, draft,
                                       tracer or trace.NoOpTracer())
        self.on_step = on_step
        self.on_load = on_load
        self.tokens_computed = 0  # all tokens ever run through the model (tests use it)

    @property
    def num_active(self) -> int:
        return len(self.scheduler)

    def has_unfinished(self) -> bool:
        return len(self.scheduler) > 0

    def validate(self, req: GenerationRequest) -> None:
        """Raise InvalidRequestError if the request can never run on this model and cache."""
        ctx, vocab = self.loaded.config.context_length, self.loaded.config.vocab_size
        if not req.prompt_ids:
            raise InvalidRequestError("prompt", "is empty: give a prompt, prompt_token_ids, or let BOS be added")
        bad = next((t for t in req.prompt_ids if not 0 <= t < vocab), None)
        if bad is not None:
            raise InvalidRequestError("prompt_token_ids", f"token id {bad} is outside the vocabulary [0, {vocab})")
        room = min(ctx, self.blocks.num_blocks * self.blocks.block_size) - len(req.prompt_ids)
        if room < 1:
            raise InvalidRequestError(
                "prompt", f"has {len(req.prompt_ids)} tokens and leaves no room to generate in the "
                          f"{ctx}-token context (KV cache: {self.blocks.num_blocks * self.blocks.block_size} "
                          f"tokens); shorten it")
        if not 1 <= req.max_new_tokens <= room:
            raise InvalidRequestError(
                "stopping.max_new_tokens", f"must be in [1, {room}] for this {len(req.prompt_ids)}-token prompt "
                                           f"(context length {ctx}), got {req.max_new_tokens}")
        if not 0 <= req.top_logprobs <= MAX_TOP_LOGPROBS:
            raise InvalidRequestError("top_logprobs", f"must be in [0, {MAX_TOP_LOGPROBS}], got {req.top_logprobs}")
        if len(req.stop_token_ids) > MAX_STOP_TOKEN_IDS:
            raise InvalidRequestError("stopping.stop_token_ids", f"has {len(req.stop_token_ids)} ids; at most "
                                                                 f"{MAX_STOP_TOKEN_IDS} are allowed")
        bad = next((t for t in req.stop_token_ids if not 0 <= t < vocab), None)
        if bad is not None:
            raise InvalidRequestError("stopping.stop_token_ids",
                                      f"token id {bad} is outside the vocabulary [0, {vocab}); use ids Tokenize gives")
        if req.adapter:
            self.lora.get(req.adapter)
        if not (0.0 <= req.lora_scale <= MAX_LORA_SCALE):   # also refuses NaN
            raise InvalidRequestError("lora_scale", f"must be in [0, {MAX_LORA_SCALE:g}], got {req.lora_scale}")
        self.speculation.resolve(req)

    def add_request(self, req: GenerationRequest) -> None:
        self.validate(req)
        seq = Sequence(req, self.tokenizer)
        seq.spec_method, seq.max_draft_len = self.speculation.resolve(req)
        seq.draft_len = seq.max_draft_len
        if req.adapter:
            seq.lora = self.lora.acquire(req.adapter)
        self.scheduler.add(seq)
        self._publish_load()

    def load_adapter(self, name: str, adapter) -> LoadedAdapter:
        """Serve a LoRA adapter read by `self.lora.read` (lumen.engine.lora) under `name`."""
        return self.lora.add(name, adapter)

    def unload_adapter(self, name: str) -> LoadedAdapter:
        """Stop serving an adapter; refused (FailedPreconditionError) while requests use it."""
        return self.lora.remove(name)

    def _release(self, seq: Sequence) -> None:
        """A sequence has left the engine: drop what it holds beyond its blocks."""
        self.speculation.release(seq)
        if seq.lora is not None:
            self.lora.release(seq.lora)
            seq.lora = None

    def abort_request(self, request_id: str) -> RequestOutput | None:
        """Drop a request at once, freeing its blocks; None if it is not here (already finished)."""
        seq = self.scheduler.remove(request_id)
        if seq is None:
            return None
        self._release(seq)
        self.spans.end(seq, cancelled=True)
        self._publish_load()
        return seq.final_output(FinishReason.ABORTED)

    def step(self, held: Collection[str] = ()) -> list[RequestOutput]:
        """One step; `held`: request ids to leave alone this step (their clients are behind)."""
        started, started_ns = time.perf_counter(), time.time_ns()
        self.speculation.propose([seq for seq in self.scheduler.running if seq.request_id not in held])
        sched = self.scheduler.schedule(held)
        for seq in sched.preempted:
            self.speculation.release(seq)
            self.spans.preempted(seq)
        for seq in sched.admitted:
            self.spans.admitted(seq)
        if not sched.scheduled:
            return []
        self.spans.batched(sched)
        verify_started = self.speculation.verify_started(sched.scheduled)
        batch, rows = self._build_batch(sched.scheduled)
        results = self.runner.sample(sched.scheduled, rows, self.runner.forward(batch))
        self.tokens_computed += sched.num_tokens
        outputs = [out for item, result in zip(sched.scheduled, results)
                   if (out := self._update_or_fail(item, result)) is not None]
        spec = self.speculation.verified(sched.scheduled, verify_started)
        self.spans.stepped(sched, started_ns)
        if self.on_step is not None:
            self.on_step(self._step_stats(sched, time.perf_counter() - started, spec))
        return outputs

    def _update_or_fail(self, item: ScheduledSeq, result: RowResult) -> RequestOutput | None:
        """_update, but an error in one request's sampling, stop matching or detokenization
        fails that request alone: the others in the batch go on."""
        try:
            return self._update(item, result)
        except Exception as exc:
            log.exception("request %s failed", quoted(item.seq.request_id))
            return self._fail(item.seq, exc)

    def _fail(self, seq: Sequence, error: BaseException) -> RequestOutput:
        self.scheduler.remove(seq.request_id)
        self._release(seq)
        self.spans.end(seq, error=error)
        self._publish_load()
        return seq.final_output(FinishReason.ERROR, error)

    def _update(self, item: ScheduledSeq, result: RowResult) -> RequestOutput | None:
        seq = item.seq
        first_token = not seq.has_sampled
        out = seq.on_computed(result.logits, item.num_new, result.token, result.logprob, result.verdict)
        if seq.last_verify is not None:  # give back the blocks of rejected draft tokens
            self.blocks.trim(seq, len(seq.token_ids))
        self.blocks.register_full_blocks(seq)
        if out is None:
            return None
        if first_token:
            self.spans.first_token(seq, out.finished)
        if out.finished:
            self.scheduler.finish(seq)
            self._release(seq)
            self.spans.end(seq)
        return out

    def fail_all(self, error: BaseException) -> list[RequestOutput]:
        """The model failed: finish every request with the error (never a made-up answer)."""
        return [self._fail(seq, error) for seq in self.scheduler.active()]

    def check_invariants(self) -> None:
        """No KV block leaked or miscounted (tests call it after any mix of requests)."""
        self.blocks.check_invariants(self.scheduler.active())
        self.speculation.check_invariants(self.scheduler.active())
        users: dict[str, int] = {}
        for seq in self.scheduler.active():
            if seq.lora is not None:
                users[seq.lora.name] = users.get(seq.lora.name, 0) + 1
        held = {a.name: a.users for a in self.lora.adapters() if a.users}
        assert users == held, f"adapter users {held} but active requests use {users}"

    def load(self) -> EngineLoad:
        """The queues and the KV cache now."""
        return EngineLoad(num_running=len(self.scheduler.running), num_waiting=len(self.scheduler.waiting),
                          kv_blocks_used=self.blocks.num_blocks - self.blocks.num_free,
                          kv_blocks_free=self.blocks.num_free)

    def _publish_load(self) -> None:
        if self.on_load is not None:
            self.on_load(self.load())

    def _step_stats(self, sched: SchedulerOutput, duration_s: float, spec: SpecStepStats | None) -> StepStats:
        load = self.load()
        spec_fields = {} if spec is None else dict(
            spec_drafts=spec.drafts, spec_draft_tokens=spec.draft_tokens,
            spec_accepted_tokens=spec.accepted_tokens, spec_accepted_per_position=spec.accepted_per_position)
        return StepStats(
            batch_size=len(sched.scheduled), num_tokens=sched.num_tokens,
            num_running=load.num_running, num_waiting=load.num_waiting,
            kv_blocks_used=load.kv_blocks_used, kv_blocks_free=load.kv_blocks_free,
            preemptions=len(sched.preempted), admitted=len(sched.admitted),
            cached_tokens=sched.cached_tokens, prefix_hits=sched.prefix_hits,
            duration_s=duration_s, **spec_fields,
            queue_times_s=tuple(s.first_scheduled - s.request.arrival_time
                                for s in sched.admitted if s.num_preemptions == 0),
        )

    def _build_batch(self, scheduled: list[ScheduledSeq]) -> tuple[ForwardBatch, list[tuple[int, int]]]:
        chunks = [Chunk(item.seq.step_tokens(item.num_new), item.seq.num_computed, item.seq.block_table,
                        item.seq.logit_rows(item.num_new), item.seq.lora_rows) for item in scheduled]
        return build_batch(chunks, self.blocks.block_size)
