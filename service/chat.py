"""Chat requests: the conversation's checks, the template that renders it, and its prompt ids.

Templates are compiled once: a model's own when it is first used, a request's own
(`chat_template`) once per distinct source while it stays among the most recently used.
Rendering runs in a sandbox with a time limit (lumen.engine.chat.template); this module only
picks the template and checks what the client sent.
"""
from __future__ import annotations

from collections import OrderedDict
from threading import Lock

from lumen.engine.chat.template import MAX_TEMPLATE_BYTES, ChatTemplate, ChatTemplateError
from lumen.engine.errors import FailedPreconditionError, InvalidRequestError, quoted
from lumen.service.limits import RequestLimits
from lumen.service.registry import ModelRuntime
from lumen.v1 import inference_pb2 as pb

ROLES = ("system", "user", "assistant", "tool")
MAX_MESSAGES = 4096
CACHED_REQUEST_TEMPLATES = 32


def check_messages(request: pb.ChatRequest, limits: RequestLimits, runtime: ModelRuntime) -> list[dict[str, str]]:
    """The conversation as the template sees it, after checking roles and sizes."""
    if not request.messages:
        raise InvalidRequestError("messages", "is empty: send at least one message (for example a user turn)")
    if len(request.messages) > MAX_MESSAGES:
        raise InvalidRequestError("messages", f"has {len(request.messages)} messages; at most {MAX_MESSAGES} "
                                              "are allowed")
    for i, m in enumerate(request.messages):
        if m.role not in ROLES:
            raise InvalidRequestError(f"messages[{i}].role", f"{quoted(m.role)} is not a role: use one of "
                                                             f"{', '.join(ROLES)}")
    limits.check_text("messages", "".join(m.content for m in request.messages), runtime.max_prompt_bytes)
    return [{"role": m.role, "content": m.content} for m in request.messages]


class ChatTemplates:
    """Compiled chat templates: each model's own, and recent request-supplied ones."""

    def __init__(self) -> None:
        self._lock = Lock()
        self._own: dict[str, ChatTemplate | ChatTemplateError] = {}
        self._recent: OrderedDict[str, ChatTemplate] = OrderedDict()

    def get(self, runtime: ModelRuntime, source: str) -> ChatTemplate:
        """The template for a request to `runtime`: `source` when not empty, else the model's own."""
        if source:
            return self._request_template(source)
        own = runtime.model.chat_template
        if own is None:
            raise FailedPreconditionError(
                f"model {quoted(runtime.name)} has no chat template (none in its GGUF metadata or "
                "tokenizer_config.json); send one in chat_template, or use Generate with a prompt")
        with self._lock:
            compiled = self._own.get(runtime.name)
        if compiled is None:
            try:
                compiled = ChatTemplate(own)
            except ChatTemplateError as exc:
                compiled = exc
            with self._lock:
                self._own[runtime.name] = compiled
        if isinstance(compiled, ChatTemplateError):
            raise FailedPreconditionError(f"model {quoted(runtime.name)}'s own chat template does not compile "
                                          f"({compiled}); send a working one in chat_template")
        return compiled

    def _request_template(self, source: str) -> ChatTemplate:
        size = len(source.encode("utf-8", errors="surrogatepass"))
        if size > MAX_TEMPLATE_BYTES:
            raise InvalidRequestError("chat_template", f"is {size} bytes; at most {MAX_TEMPLATE_BYTES} are allowed "
                                                       "(real templates are a few KB)")
        with self._lock:
            compiled = self._recent.get(source)
            if compiled is not None:
                self._recent.move_to_end(source)
                return compiled
        compiled = ChatTemplate(source)  # a syntax error raises ChatTemplateError (INVALID_ARGUMENT)
        with self._lock:
            self._recent[source] = compiled
            while len(self._recent) > CACHED_REQUEST_TEMPLATES:
                self._recent.popitem(last=False)
        return compiled
