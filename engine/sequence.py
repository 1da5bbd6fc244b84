"""A request's state inside the engine: its tokens, KV cache, sampler, text and spans.

A `Sequence` turns each sampled token into a `RequestOutput`; it never runs the model.
"""
from __future__ import annotations

import torch
from opentelemetry import trace

from engine.detokenizer import IncrementalDetokenizer
from engine.kv_cache import SequenceKVCache
from engine.request import FinishReason, GenerationRequest, RequestOutput
from engine.sampling import Sampler, token_logprobs
from engine.stopping import StopMatcher
from engine.tokenizer import Tokenizer


class Sequence:
    def __init__(self, request: GenerationRequest, tokenizer: Tokenizer, cache: SequenceKVCache) -> None:
        self.request = request
        self.request_id = request.request_id
        self.prompt_ids = list(request.prompt_ids)
        self.token_ids = list(request.prompt_ids)  # prompt then output, appended in place
        self.cache = cache
        self.num_computed = 0  # tokens whose keys and values are in the cache
        self.sampler = Sampler(request.sampling)
        self.detokenizer = IncrementalDetokenizer(tokenizer, self.prompt_ids)
        self.stop = StopMatcher(request.stop)
        self.eos_id = tokenizer.eos_id
        self.span: trace.Span | None = None  # the current phase's span: prefill, then decode

    @property
    def output_ids(self) -> list[int]:
        return self.token_ids[len(self.prompt_ids):]

    @property
    def num_output(self) -> int:
        return len(self.token_ids) - len(self.prompt_ids)

    @property
    def in_prefill(self) -> bool:
        return self.num_computed == 0

    def pending_ids(self) -> list[int]:
        """Tokens known but not yet in the cache: the prompt at first, then the last sampled token."""
        return self.token_ids[self.num_computed:]

    def wants_prompt_logprobs(self) -> bool:
        return self.in_prefill and self.request.prompt_logprobs

    def on_step(self, logits: torch.Tensor, computed: int) -> RequestOutput:
        """Consume this step's logits rows [rows, vocab]: the last row samples the next token."""
        out = RequestOutput(self.request_id, prompt_tokens=len(self.prompt_ids))
        if self.wants_prompt_logprobs() and len(self.prompt_ids) > 1:
            out.prompt_logprobs = token_logprobs(logits[:-1], self.prompt_ids[1:], self.request.top_logprobs)
        self.num_computed += computed
        token = self.sampler.sample(logits[-1], self.token_ids)
        self.token_ids.append(token)
        if self.request.logprobs or self.request.top_logprobs:
            out.logprobs = token_logprobs(logits[-1:], [token], self.request.top_logprobs)
        out.token_ids = [token]
        out.text, out.finish_reason, out.stop_sequence = self._text_and_finish(token)
        out.completion_tokens = self.num_output
        return out

    def _text_and_finish(self, token: int) -> tuple[str, FinishReason | None, str]:
        if token == self.eos_id and not self.request.ignore_eos:
            return self.stop.flush() + self.detokenizer.flush(), FinishReason.EOS, ""
        text, matched = self.stop.feed(self.detokenizer.add(token))
        if matched is not None:
            return text, FinishReason.STOP_SEQUENCE, matched
        if self.num_output >= self.request.max_new_tokens:
            tail, _ = self.stop.feed(self.detokenizer.flush())
            return text + tail + self.stop.flush(), FinishReason.LENGTH, ""
        return text, None, ""

    def final_output(self, reason: FinishReason, error: BaseException | None = None) -> RequestOutput:
        """The closing output of a request stopped from outside (abort, engine error)."""
        return RequestOutput(self.request_id, finish_reason=reason, error=error,
                             prompt_tokens=len(self.prompt_ids), completion_tokens=self.num_output)
