"""Which proposer a request uses and how many tokens it drafts: per request, with server defaults."""
from __future__ import annotations

import enum
from dataclasses import dataclass

from lumen.engine.errors import InvalidRequestError

MAX_SPECULATIVE_TOKENS = 16


class SpecMethod(enum.Enum):
    NONE = "none"              # plain decoding
    NGRAM = "ngram"            # prompt lookup: continue the latest earlier occurrence of the recent n-gram
    DRAFT = "draft"            # a second, smaller GGUF model with the same vocabulary
    LAYER_SKIP = "layer_skip"  # the target's first layers and its output head
    # n-gram lookup decided at every step (lumen.engine.speculative.auto): no match in the
    # request's own tokens drafts nothing and the step verifies one row, as plain decoding
    # does; a match drafts as many tokens as its length makes likely to be accepted (up to k)
    AUTO = "auto"

    @classmethod
    def parse(cls, value: str, field: str = "speculative.method") -> "SpecMethod":
        try:
            return cls(value.strip().lower().replace("-", "_"))
        except ValueError:
            names = ", ".join(m.value for m in cls)
            raise InvalidRequestError(field, f"{value!r} is not a method: use one of {names}") from None


@dataclass(slots=True, frozen=True)
class SpeculativeParams:
    """A request's choice; None fields take the server's defaults."""
    method: SpecMethod | None = None
    num_tokens: int | None = None

    def __post_init__(self) -> None:
        if self.num_tokens is not None and not 1 <= self.num_tokens <= MAX_SPECULATIVE_TOKENS:
            raise InvalidRequestError("speculative.num_tokens",
                                      f"must be in [1, {MAX_SPECULATIVE_TOKENS}], got {self.num_tokens}")


def adapt_draft_length(k: int, proposed: int, accepted: int, k_max: int) -> int:
    """The next draft length after a verification: 2 more when every proposed token was
    accepted, 1 fewer otherwise, within [1, k_max] (the "heuristic" schedule of Hugging Face
    transformers' assisted generation). A request whose drafts keep failing thus verifies
    2 rows a step instead of k + 1, and one whose drafts keep succeeding returns to k_max."""
    k = k + 2 if accepted == proposed else k - 1
    return max(1, min(k_max, k))


@dataclass(slots=True)
class SpeculativeConfig:
    """The engine's speculative decoding settings (`lumen serve --speculative ...`)."""
    method: SpecMethod = SpecMethod.NONE   # the default for requests that do not choose
    num_tokens: int = 4                    # default draft length k
    ngram_max: int = 4                     # longest n-gram the prompt lookup matches
    ngram_min: int = 1
    layer_skip_layers: int | None = None   # draft layers for LAYER_SKIP (default: a quarter of the model)
    max_batch: int = 4                     # no speculation in steps with more decoding requests than this
    adaptive: bool = False                 # adapt each request's k to its acceptance (adapt_draft_length)
    # AUTO in a step with several decoding requests: at most this many rows verified in all
    # (one per request plus the draft tokens; see lumen.engine.speculative.auto)
    auto_batch_rows: int = 4

    def __post_init__(self) -> None:
        if not 1 <= self.num_tokens <= MAX_SPECULATIVE_TOKENS:
            raise ValueError(f"num_tokens must be in [1, {MAX_SPECULATIVE_TOKENS}], got {self.num_tokens}")
        if not 1 <= self.ngram_min <= self.ngram_max:
            raise ValueError(f"need 1 <= ngram_min <= ngram_max, got {self.ngram_min} and {self.ngram_max}")
        if self.layer_skip_layers is not None and self.layer_skip_layers < 1:
            raise ValueError(f"layer_skip_layers must be >= 1, got {self.layer_skip_layers}")
        if self.max_batch < 0:
            raise ValueError(f"max_batch must be >= 0, got {self.max_batch}")
        if self.auto_batch_rows < 1:
            raise ValueError(f"auto_batch_rows must be >= 1, got {self.auto_batch_rows}")
