"""The engine's side of speculative decoding: each request's method, drafting before a step,
and what verification did (spans, step statistics) after it.

Drafting happens at the start of a step, for requests that are decoding, so that a step's
verified tokens reach their clients before the next drafts are computed. Under load (more
decoding requests than `max_batch`) a step drafts nothing: a large batch already uses the
hardware well, and verifying drafts would cost more than it saves. With `adaptive`, each
request's draft length follows its acceptance (config.adapt_draft_length). SpecMethod.AUTO
decides at every step whether a request drafts at all, and how much (speculative.auto).

Spans: each speculative step gives every request it drafted for a `draft` span (the
proposer's time, the tokens proposed) and a `verify` span (the target's forward, the tokens
proposed and accepted), children of the request's span, created only for requests whose
trace is sampled. Their number is bounded: at most `max_batch` requests speculate in a
step, and each step verifies several tokens. Each request's `decode` span also gets its
totals (see lumen.engine.core.request_spans).
"""
from __future__ import annotations

import time
from dataclasses import dataclass

from opentelemetry import trace

from lumen.engine.core.block_manager import BlockManager
from lumen.engine.core.request import GenerationRequest
from lumen.engine.core.scheduler import ScheduledSeq
from lumen.engine.core.sequence import Sequence
from lumen.engine.errors import InvalidRequestError, quoted
from lumen.engine.model.runner import ModelRunner
from lumen.engine.speculative.auto import propose_auto
from lumen.engine.speculative.config import SpecMethod, SpeculativeConfig, adapt_draft_length
from lumen.engine.speculative.draft import Draft
from lumen.engine.speculative.model_proposers import DraftModelProposer, LayerSkipProposer
from lumen.engine.speculative.ngram import propose_ngram
from lumen.engine.weights.loaded_model import LoadedModel


@dataclass(slots=True, frozen=True)
class SpecStepStats:
    drafts: int                           # sequences whose draft was verified this step
    draft_tokens: int
    accepted_tokens: int
    accepted_per_position: tuple[int, ...]  # [i]: drafts whose token at position i was accepted


class Speculation:
    """Drafting and verification bookkeeping for one engine.

    runner, blocks: the target's model runner and its block manager (the layer-skip draft runs the
    target's first layers over its own KV cache); max_running, kv_cache_bytes: the engine's
    limits, which size a draft model's own KV pool."""

    def __init__(self, config: SpeculativeConfig, target: LoadedModel, runner: ModelRunner, blocks: BlockManager,
                 max_running: int, kv_cache_bytes: int, draft: LoadedModel | None, tracer: trace.Tracer) -> None:
        self.config = config
        self.tracer = tracer
        ctx = self.context_length = target.config.context_length
        self.layer_skip: LayerSkipProposer | None = None
        if target.config.n_layers > 1:
            layers = config.layer_skip_layers or max(1, target.config.n_layers // 4)
            self.layer_skip = LayerSkipProposer(runner, blocks, layers, ctx)
        self.draft: DraftModelProposer | None = None
        if draft is not None:
            # Room for everything the target can hold, plus each running request's draft tail.
            max_tokens = blocks.num_blocks * blocks.block_size + max_running * (config.num_tokens + blocks.block_size)
            self.draft = DraftModelProposer(draft, target, runner.placement, blocks.block_size, max_tokens,
                                            kv_cache_bytes)
        if config.method is SpecMethod.DRAFT and self.draft is None:
            raise ValueError("the default speculative method 'draft' needs a draft model (--draft-model PATH)")
        if config.method is SpecMethod.LAYER_SKIP and self.layer_skip is None:
            raise ValueError("layer-skip speculation needs a model of at least 2 layers")

    def resolve(self, req: GenerationRequest) -> tuple[SpecMethod, int]:
        """The request's method and draft length, its own choice or the server's defaults."""
        method = req.speculative.method or self.config.method
        if method is SpecMethod.DRAFT and req.adapter:
            if req.speculative.method is SpecMethod.DRAFT:
                raise InvalidRequestError("speculative.method", f"'draft' cannot draft for LoRA adapter "
                                          f"{quoted(req.adapter)}: the draft model has no adapter; use 'layer_skip' "
                                          "or 'ngram', which draft with the request's adapter")
            method = SpecMethod.NONE   # the server's default draft model: the adapter's request decodes plainly
        if method is SpecMethod.DRAFT and self.draft is None:
            raise InvalidRequestError("speculative.method", "'draft' needs a draft model and this server has "
                                      "none (start it with --draft-model PATH); use 'ngram' or 'layer_skip'")
        if method is SpecMethod.LAYER_SKIP and self.layer_skip is None:
            raise InvalidRequestError("speculative.method", "'layer_skip' needs a model of at least 2 layers")
        return method, req.speculative.num_tokens or self.config.num_tokens

    def propose(self, running: list[Sequence]) -> None:
        """Drafts for the decoding requests that speculate, unless the step is too large."""
        decoding = [s for s in running if s.has_sampled and s.num_pending == 1]
        if not decoding or len(decoding) > self.config.max_batch:
            return
        groups: dict[SpecMethod, list[tuple[Sequence, int]]] = {}
        for seq in decoding:
            k = min(seq.draft_len, seq.request.max_new_tokens - seq.num_output - 1,
                    self.context_length - len(seq.token_ids))
            if seq.spec_method is not SpecMethod.NONE and seq.draft is None and k >= 1:
                groups.setdefault(seq.spec_method, []).append((seq, k))
        if not groups:
            return
        for method, items in groups.items():
            started = time.time_ns()
            if method is SpecMethod.NGRAM:
                for seq, k in items:
                    tokens = propose_ngram(seq.token_ids, k, self.config.ngram_max, self.config.ngram_min)
                    seq.draft = Draft(tokens) if tokens else None
            elif method is SpecMethod.AUTO:
                propose_auto(items, len(decoding), self.config.ngram_max, self.config.ngram_min,
                             self.config.auto_batch_rows)
            elif method is SpecMethod.LAYER_SKIP:
                self.layer_skip.propose(items)
            else:
                self.draft.propose(items)
            ended = time.time_ns()
            for seq, _ in items:
                if seq.draft is not None:  # an n-gram lookup that found nothing took microseconds: no span
                    self._span(seq, "draft", started, ended, {
                        "lumen.speculative.method": method.value,
                        "lumen.speculative.proposed_tokens": len(seq.draft.tokens),
                        "lumen.speculative.batch_size": len(items)})

    def _span(self, seq: Sequence, name: str, started: int, ended: int, attributes: dict) -> None:
        """A child of the request's span, if its trace is sampled."""
        if trace.get_current_span(seq.request.trace_context).is_recording():
            span = self.tracer.start_span(name, context=seq.request.trace_context, start_time=started,
                                          attributes=attributes)
            span.end(end_time=ended)

    @staticmethod
    def verify_started(scheduled: list[ScheduledSeq]) -> int | None:
        """The wall time a step that verifies drafts starts, or None for a plain step."""
        return time.time_ns() if any(item.seq.draft is not None for item in scheduled) else None

    def verified(self, scheduled: list[ScheduledSeq], started: int | None) -> SpecStepStats | None:
        """Collect what this step's verifications accepted; emit each request's `verify` span."""
        if started is None:
            return None
        results = []
        for item in scheduled:
            seq = item.seq
            if seq.last_verify is not None:
                results.append((seq, *seq.last_verify))
                seq.last_verify = None
        per_position = [0] * max((proposed for _, proposed, _ in results), default=0)
        for _, _, accepted in results:
            for i in range(accepted):
                per_position[i] += 1
        stats = SpecStepStats(len(results), sum(p for _, p, _ in results), sum(a for _, _, a in results),
                              tuple(per_position))
        if self.config.adaptive:
            for seq, proposed, accepted in results:
                seq.draft_len = adapt_draft_length(seq.draft_len, proposed, accepted, seq.max_draft_len)
        ended = time.time_ns()
        for seq, proposed, accepted in results:
            self._span(seq, "verify", started, ended, {
                "lumen.speculative.proposed_tokens": proposed, "lumen.speculative.accepted_tokens": accepted,
                "lumen.engine.batch_size": len(scheduled)})
        return stats

    def release(self, seq: Sequence) -> None:
        seq.draft = None
        if self.draft is not None:
            self.draft.release(seq)

    def check_invariants(self, seqs: list[Sequence]) -> None:
        if self.draft is not None:
            self.draft.check_invariants(seqs)

