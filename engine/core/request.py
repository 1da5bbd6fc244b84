"""What crosses the engine boundary: a generation request in, per-step outputs out."""
from __future__ import annotations

import enum
import time
from dataclasses import dataclass, field

from opentelemetry.context import Context

from lumen.engine.sampling.logprobs import TokenLogprob
from lumen.engine.sampling.sampler import SamplingParams
from lumen.engine.speculative.config import SpeculativeParams


class FinishReason(enum.Enum):
    EOS = "eos"
    LENGTH = "length"
    STOP_SEQUENCE = "stop_sequence"
    STOP_TOKEN = "stop_token"
    ABORTED = "aborted"
    ERROR = "error"


@dataclass(slots=True)
class GenerationRequest:
    request_id: str
    prompt_ids: list[int]
    max_new_tokens: int
    sampling: SamplingParams = field(default_factory=SamplingParams)
    stop: list[str] = field(default_factory=list)
    ignore_eos: bool = False          # go on past the model's end-of-generation tokens
    stop_token_ids: list[int] = field(default_factory=list)  # stop after any of these, even with ignore_eos
    logprobs: bool = False
    top_logprobs: int = 0
    prompt_logprobs: bool = False
    speculative: SpeculativeParams = field(default_factory=SpeculativeParams)
    adapter: str = ""                 # a LoRA adapter loaded on the model; "" = the base model
    lora_scale: float = 1.0           # multiplies the adapter's own scale (alpha / rank)
    # The request's span context: engine spans (prefill, decode) become its children.
    trace_context: Context | None = None
    arrival_time: float = field(default_factory=time.monotonic)


@dataclass(slots=True)
class RequestOutput:
    """The new tokens and text of one request after one step."""
    request_id: str
    text: str = ""
    token_ids: list[int] = field(default_factory=list)
    logprobs: list[TokenLogprob] = field(default_factory=list)
    prompt_logprobs: list[TokenLogprob] = field(default_factory=list)
    finish_reason: FinishReason | None = None
    stop_sequence: str = ""
    stop_token_id: int | None = None  # with STOP_TOKEN: the token that stopped it
    prompt_tokens: int = 0
    completion_tokens: int = 0
    cached_tokens: int = 0  # prompt tokens served from the prefix cache
    draft_tokens: int = 0     # speculative draft tokens verified so far
    accepted_tokens: int = 0  # of which the target accepted
    error: BaseException | None = None

    @property
    def finished(self) -> bool:
        return self.finish_reason is not None
