"""Typed errors the engine raises; the service maps each one to a gRPC status.

Every message says what was wrong and what to do about it.
"""


QUOTE_LIMIT = 64  # characters of client input an error message repeats


def quoted(text: str, limit: int = QUOTE_LIMIT) -> str:
    """Client input for an error message or a log line: repr'd, and cut to `limit` characters
    (a long name or id would otherwise make the message larger than gRPC's metadata limit)."""
    if len(text) <= limit:
        return repr(text)
    return f"{text[:limit]!r}... ({len(text)} characters)"


class LumenError(Exception):
    """Base class of the errors Lumen raises on purpose."""


class InvalidRequestError(LumenError):
    """A request field is out of range or inconsistent (gRPC INVALID_ARGUMENT)."""

    def __init__(self, field: str, message: str) -> None:
        super().__init__(f"{field}: {message}")
        self.field = field


class ModelNotFoundError(LumenError):
    """The request names a model the server does not serve (gRPC NOT_FOUND)."""


class ModelLoadError(LumenError, ValueError):
    """A model file cannot be loaded; the message names the file and the problem."""


class CapacityError(LumenError):
    """The server is at capacity: its waiting queue is full (gRPC RESOURCE_EXHAUSTED)."""


class EngineStoppedError(LumenError):
    """The engine is shutting down and accepts no new work (gRPC UNAVAILABLE)."""


class DuplicateRequestError(LumenError):
    """A request id that is already running (gRPC ALREADY_EXISTS)."""


class FailedPreconditionError(LumenError):
    """The request is well formed but the server's state cannot serve it, e.g. Chat on a model
    with no chat template (gRPC FAILED_PRECONDITION); the message says what would make it work."""
