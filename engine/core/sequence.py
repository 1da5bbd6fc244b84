"""A request's state inside the engine: its tokens, KV blocks, sampler, text and spans.

`num_computed` catches up to `len(token_ids)` step by step (chunked prefill,
recompute after preemption); a token is sampled only when it has caught up.
With a speculative `draft`, a decode step computes the last token and the draft tokens
together and verification appends every accepted token plus one from the target; the
KV entries of rejected ones are simply no longer counted as computed (rolled back).
A `Sequence` turns its new tokens into one `RequestOutput` per step; it never runs the model.
"""
from __future__ import annotations

import time
from typing import TYPE_CHECKING

import torch
from opentelemetry import trace

from lumen.engine.core.batch_sizes import BatchSizes
from lumen.engine.core.request import FinishReason, GenerationRequest, RequestOutput
from lumen.engine.sampling.logprobs import TokenLogprob, token_logprobs
from lumen.engine.sampling.rejection import verify
from lumen.engine.sampling.sampler import Sampler
from lumen.engine.speculative import Draft, SpecMethod
from lumen.engine.tokenizer.detokenizer import IncrementalDetokenizer
from lumen.engine.tokenizer.stop_strings import StopMatcher
from lumen.engine.tokenizer.tokenizer import Tokenizer

if TYPE_CHECKING:
    from lumen.engine.lora.registry import LoadedAdapter
    from lumen.engine.lora.weights import AdapterWeights


class Sequence:
    def __init__(self, request: GenerationRequest, tokenizer: Tokenizer) -> None:
        self.request = request
        self.request_id = request.request_id
        self.prompt_ids = list(request.prompt_ids)
        self.token_ids = list(request.prompt_ids)  # prompt then output, appended in place
        self.num_computed = 0       # tokens whose keys and values are in the cache
        self.num_cached_tokens = 0  # prompt tokens found in the prefix cache on admission
        self.block_table: list[int] = []
        self.block_hashes: list[int] = []
        self.num_preemptions = 0
        self.sampler = Sampler(request.sampling)
        self.detokenizer = IncrementalDetokenizer(tokenizer, self.prompt_ids)
        self.stop = StopMatcher(request.stop)
        self.eog_ids = frozenset() if request.ignore_eos else tokenizer.eog_ids
        self.stop_token_ids = frozenset(request.stop_token_ids)
        self.prompt_logprobs: list[TokenLogprob] = []
        self.first_scheduled: float | None = None  # monotonic time it left the queue
        self.span: trace.Span | None = None  # the current phase's span: prefill, then decode
        self.batches = BatchSizes()          # the sizes of the steps the current phase ran in
        self.spec_method = SpecMethod.NONE  # set by the engine from the request and its defaults
        self.max_draft_len = 0              # draft length k the request asked for (or the server's default)
        self.draft_len = 0                  # the k of the next draft: max_draft_len, or adapted to acceptance
        self.draft: Draft | None = None     # proposed tokens for the next step, not yet verified
        self.draft_tokens = 0               # draft tokens verified so far (proposed and scheduled)
        self.accepted_tokens = 0            # of which the target accepted
        self.last_verify: tuple[int, int] | None = None  # (proposed, accepted) of this step's verification
        self.lora: LoadedAdapter | None = None   # the LoRA adapter it holds (set by the engine)

    @property
    def lora_rows(self) -> tuple[AdapterWeights, float] | None:
        """What its rows of a forward are adapted with: (the adapter on the device, scale), or None."""
        return None if self.lora is None else (self.lora.weights, self.request.lora_scale)

    @property
    def cache_salt(self) -> object:
        """Its prefix-cache chain's start: blocks are shared only between sequences of one adapter load."""
        return None if self.lora is None else ("lora", self.lora.weights.uid)

    @property
    def num_output(self) -> int:
        return len(self.token_ids) - len(self.prompt_ids)

    @property
    def num_pending(self) -> int:
        return len(self.token_ids) - self.num_computed

    @property
    def has_sampled(self) -> bool:
        return self.num_output > 0

    def wants_prompt_logprobs(self) -> bool:
        """Prompt logprobs still to compute (never again after a recompute: they were sent)."""
        return self.request.prompt_logprobs and not self.has_sampled and self.num_computed < len(self.prompt_ids)

    def step_tokens(self, num_new: int) -> list[int]:
        """The tokens a step computing `num_new` of them feeds: pending ones, then the draft's."""
        pending = self.token_ids[self.num_computed: self.num_computed + num_new]
        if self.draft is not None and len(pending) < num_new:
            pending += self.draft.tokens[: num_new - len(pending)]
        return pending

    def logit_rows(self, num_new: int) -> range:
        """Rows (relative to this sequence's new tokens) whose logits this step needs."""
        if self.wants_prompt_logprobs():
            return range(num_new)
        drafted = len(self.draft.tokens) if self.draft is not None else 0
        if self.num_computed + num_new == len(self.token_ids) + drafted:
            return range(num_new - 1 - drafted, num_new)
        return range(0)

    def samples_next(self, num_new: int) -> bool:
        """Whether a step computing `num_new` tokens ends in one plain sample from its last row
        (no draft to verify, no prompt logprobs to score): the runner can sample it in a batch."""
        return (self.draft is None and not self.wants_prompt_logprobs()
                and self.num_computed + num_new >= len(self.token_ids))

    def wants_logprobs(self) -> bool:
        return bool(self.request.logprobs or self.request.top_logprobs)

    def on_computed(self, logits: torch.Tensor, num_new: int, sampled: int | None = None,
                    sampled_logprob: TokenLogprob | None = None,
                    verdict: tuple[list[int], int] | None = None) -> RequestOutput | None:
        """Account for `num_new` computed tokens; `logits` holds this step's rows from logit_rows().
        `sampled`: the token the runner already drew for this step (samples_next), if it did, with
        its logprobs when the request wants them. `verdict`: the draft's verification when the
        runner did it on the device, (tokens to append, accepted draft tokens)."""
        start, scoring = self.num_computed, self.wants_prompt_logprobs()
        draft, self.draft = self.draft, None
        self.num_computed += num_new
        if scoring:
            # Row j predicts the token at start + j + 1; only prompt tokens are scored.
            targets = self.prompt_ids[start + 1: min(self.num_computed + 1, len(self.prompt_ids))]
            self.prompt_logprobs += token_logprobs(logits[: len(targets)], targets, self.request.top_logprobs)
        if draft is not None:
            tokens, accepted = verdict or verify(self.sampler, logits, draft, self.token_ids)
            # Computed and kept: the last token and the accepted draft tokens; the rest roll back.
            self.num_computed = len(self.token_ids) + accepted
            self.draft_tokens += len(draft.tokens)
            self.accepted_tokens += accepted
            self.last_verify = (len(draft.tokens), accepted)
            return self._emit(tokens, logits)
        if self.num_computed < len(self.token_ids):
            return None  # a prefill chunk (or a recompute) that has not caught up yet
        if sampled is not None:
            return self._emit([sampled], logits[-1:], [sampled_logprob] if sampled_logprob else None)
        return self._emit([self.sampler.sample(logits[-1], self.token_ids)], logits[-1:])

    def _emit(self, tokens: list[int], logits: torch.Tensor,
              logprobs: list[TokenLogprob] | None = None) -> RequestOutput:
        """Append `tokens` (logits row i scored tokens[i]; or their `logprobs` already computed)
        up to the first that finishes the request."""
        out = RequestOutput(self.request_id, prompt_tokens=len(self.prompt_ids),
                            cached_tokens=self.num_cached_tokens)
        if not self.has_sampled:
            out.prompt_logprobs, self.prompt_logprobs = self.prompt_logprobs, []
        for i, token in enumerate(tokens):
            self.token_ids.append(token)
            if self.wants_logprobs():
                out.logprobs += ([logprobs[i]] if logprobs is not None
                                 else token_logprobs(logits[i: i + 1], [token], self.request.top_logprobs))
            out.token_ids.append(token)
            text, out.finish_reason, out.stop_sequence = self._text_and_finish(token)
            out.text += text
            if out.finish_reason is FinishReason.STOP_TOKEN:
                out.stop_token_id = token
            if out.finished:
                break
        self.num_computed = min(self.num_computed, len(self.token_ids))
        out.completion_tokens = self.num_output
        out.draft_tokens, out.accepted_tokens = self.draft_tokens, self.accepted_tokens
        return out

    def _text_and_finish(self, token: int) -> tuple[str, FinishReason | None, str]:
        """The text `token` releases and whether it finishes the request. An end-of-generation
        or stop token adds no text of its own; what was held back is released."""
        if token in self.eog_ids:
            return self.stop.flush() + self.detokenizer.flush(), FinishReason.EOS, ""
        if token in self.stop_token_ids:
            return self.stop.flush() + self.detokenizer.flush(), FinishReason.STOP_TOKEN, ""
        text, matched = self.stop.feed(self.detokenizer.add(token))
        if matched is not None:
            return text, FinishReason.STOP_SEQUENCE, matched
        if self.num_output >= self.request.max_new_tokens:
            tail, _ = self.stop.feed(self.detokenizer.flush())
            return text + tail + self.stop.flush(), FinishReason.LENGTH, ""
        return text, None, ""

    def reset_for_recompute(self) -> None:
        """After preemption: keep the tokens, drop the cache and any draft; the next admission recomputes them."""
        self.num_computed = 0
        self.draft = None
        self.num_preemptions += 1

    def mark_scheduled(self) -> None:
        if self.first_scheduled is None:
            self.first_scheduled = time.monotonic()

    def final_output(self, reason: FinishReason, error: BaseException | None = None) -> RequestOutput:
        """The closing output of a request stopped from outside (abort, engine error)."""
        return RequestOutput(self.request_id, finish_reason=reason, error=error,
                             prompt_tokens=len(self.prompt_ids), completion_tokens=self.num_output,
                             cached_tokens=self.num_cached_tokens, draft_tokens=self.draft_tokens,
                             accepted_tokens=self.accepted_tokens)
