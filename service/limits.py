"""How much of each request part a server accepts, checked before any work is done.

Unbounded parts would let one client slow or bloat the server for everyone: a huge prompt is
tokenized for seconds before it could be refused, thousands of stop strings are matched on
the engine thread after every token, and a long request id is echoed in every message and
log line. Each limit is refused with INVALID_ARGUMENT naming it; the operator sets the ones
that depend on the deployment (`lumen serve --max-prompt-bytes`, `--max-stop-sequences`).
"""
from __future__ import annotations

from dataclasses import dataclass

from lumen.engine.errors import InvalidRequestError

# gRPC's default limit on a message a client receives: a larger Tokenize reply would be
# refused by a default client with RESOURCE_EXHAUSTED after the server built it.
DEFAULT_CLIENT_MAX_RECEIVE_BYTES = 4 << 20


@dataclass(slots=True, frozen=True)
class RequestLimits:
    max_prompt_bytes: int = 1 << 20         # UTF-8 bytes of a prompt or of Tokenize's text
    max_stop_sequences: int = 16            # stop strings in one request (TGI's default is 4)
    max_stop_length: int = 256              # characters of one stop string
    max_request_id_length: int = 128        # characters of a client's request_id
    max_reply_bytes: int = DEFAULT_CLIENT_MAX_RECEIVE_BYTES  # of a Tokenize reply
    stream_write_timeout_s: float = 60.0    # a stream whose client accepts nothing this long is cancelled

    def __post_init__(self) -> None:
        for name in ("max_prompt_bytes", "max_stop_sequences", "max_stop_length", "max_request_id_length",
                     "max_reply_bytes"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if not self.stream_write_timeout_s >= 0:
            raise ValueError(f"stream_write_timeout_s must be >= 0 (0 = never), got {self.stream_write_timeout_s}")

    def check_text(self, field: str, text: str, context_bytes: int | None = None) -> None:
        """Refuse text longer than the server takes, or than a context of `context_bytes` can hold."""
        size = len(text.encode("utf-8", errors="surrogatepass"))
        if size > self.max_prompt_bytes:
            raise InvalidRequestError(field, f"is {size} bytes; this server takes at most {self.max_prompt_bytes} "
                                             "bytes (--max-prompt-bytes); send less text")
        if context_bytes is not None and size > context_bytes:
            raise InvalidRequestError(field, f"is {size} bytes, more than the model's context can hold (at most "
                                             f"{context_bytes} bytes of text); shorten it")

    def check_request_id(self, request_id: str) -> None:
        if len(request_id) > self.max_request_id_length:
            raise InvalidRequestError("request_id", f"is {len(request_id)} characters; at most "
                                                    f"{self.max_request_id_length} are allowed")

    def check_stops(self, stops: list[str]) -> None:
        if len(stops) > self.max_stop_sequences:
            raise InvalidRequestError("stopping.stop", f"has {len(stops)} strings; at most {self.max_stop_sequences} "
                                                       "are allowed (--max-stop-sequences)")
        if any(not s for s in stops):
            raise InvalidRequestError("stopping.stop", "stop strings must not be empty")
        longest = max((len(s) for s in stops), default=0)
        if longest > self.max_stop_length:
            raise InvalidRequestError("stopping.stop", f"has a string of {longest} characters; each may have at most "
                                                       f"{self.max_stop_length}")
