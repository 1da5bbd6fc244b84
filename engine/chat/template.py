"""Chat templates: a conversation rendered to prompt text exactly as Hugging Face transformers'
`apply_chat_template(tokenize=False)` renders it, in a bounded sandbox.

transformers (transformers/utils/chat_template_utils.py) is the reference: the same Jinja options
(trim_blocks, lstrip_blocks, loopcontrols, the `{% generation %}` tag), filters and globals
(`tojson` without HTML escaping, `raise_exception`, `strftime_now`, its `dict` and `namespace`),
and the same variables (`messages`, `tools`, `documents`, `add_generation_prompt`, the special
tokens, any extra keyword arguments). Templates are untrusted code: they render in
sandbox.BoundedEnvironment under a time and size budget, and every failure is a ChatTemplateError
that names the problem.

`RenderedChat.content_spans` says where the messages' contents landed in the text, so that the
tokenizer can keep special tokens inside them as plain text. This module never imports
transformers, and never returns spans that it has not checked against the rendered text.
"""
from __future__ import annotations

import dataclasses
import re
import reprlib
import secrets
import time
from collections.abc import Mapping
from datetime import datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar

import gguf
from jinja2 import TemplateError, TemplateSyntaxError, nodes
from jinja2.exceptions import SecurityError
from jinja2.ext import Extension
from jinja2.utils import Namespace

from lumen.engine.chat import sandbox
from lumen.engine.chat.budget import Budget, TemplateLimitError, bounded
from lumen.engine.errors import InvalidRequestError, ModelLoadError
from lumen.engine.hf_json import read_json

if TYPE_CHECKING:
    from jinja2.parser import Parser

MAX_TEMPLATE_BYTES = 64 * 1024  # real chat templates are under 20 KB
MESSAGE_QUOTE_CHARS = 500  # characters of a template's own error message that an error repeats
_REASONING_FIELDS = ("reasoning_content", "thinking", "reasoning")  # as transformers aliases them
_MARK_OPEN, _MARK_CLOSE = "\U000F0A00", "\U000F0A01"  # private-use: brackets a content marker


class ChatTemplateError(InvalidRequestError):
    """A chat template that does not compile or render; the message names the problem."""

    def __init__(self, message: str) -> None:
        super().__init__("chat_template", message)


@dataclasses.dataclass(slots=True, frozen=True)
class RenderedChat:
    """A rendered conversation: the prompt text, and where the messages' contents are in it."""

    text: str
    # [start, end) ranges of `text` copied from the messages' contents, in order; None when the
    # template transforms contents so that they cannot be found reliably.
    content_spans: tuple[tuple[int, int], ...] | None


class ChatTemplate:
    """A chat template compiled once, rendered any number of times from any thread."""

    def __init__(self, source: str, *, max_render_seconds: float = 2.0,
                 max_output_chars: int = 4 << 20) -> None:
        if not isinstance(source, str):
            raise ChatTemplateError(f"must be a string of Jinja, not {type(source).__name__}")
        if (len(source) > MAX_TEMPLATE_BYTES
                or len(source.encode("utf-8", "surrogatepass")) > MAX_TEMPLATE_BYTES):
            raise ChatTemplateError(f"the template is larger than {MAX_TEMPLATE_BYTES} bytes "
                                    "(MAX_TEMPLATE_BYTES); real chat templates are under 20 KB")
        if not max_render_seconds > 0 or max_output_chars < 1:
            raise ValueError(f"max_render_seconds ({max_render_seconds}) and max_output_chars "
                             f"({max_output_chars}) must be positive")
        self.source = source
        self._seconds = float(max_render_seconds)
        self._max_chars = int(max_output_chars)
        environment = _transformers_environment()
        try:  # compiling folds constants, which runs filters: it is template code too
            with bounded(Budget(self._seconds, self._max_chars)):
                self._template = environment.from_string(source)
        except TemplateSyntaxError as exc:
            raise ChatTemplateError(f"Jinja syntax error at line {exc.lineno}: {exc.message}") from exc
        except Exception as exc:  # the parser or Python's compiler on a pathological template
            raise ChatTemplateError(f"the template does not compile: {_describe(exc)}") from exc

    def render(self, messages: list[dict[str, str]], *, add_generation_prompt: bool = True,
               bos_token: str | None = "", eos_token: str | None = "", **extra: Any) -> RenderedChat:
        """The prompt text for `messages`. A None token is left undefined, as transformers leaves
        a special token the tokenizer lacks; `extra` (tools, documents, ...) goes to the template."""
        chat = _conversation(messages)
        variables = _variables(chat, add_generation_prompt, bos_token, eos_token, extra)
        deadline = time.monotonic() + self._seconds
        text = self._render(variables, deadline)
        return RenderedChat(text, self._content_spans(chat, variables, text, deadline))

    def _render(self, variables: dict[str, Any], deadline: float) -> str:
        budget = Budget(self._seconds, self._max_chars, deadline)
        pieces: list[str] = []
        chars = 0
        try:
            with bounded(budget):
                stream = self._template.generate(**variables)
                try:
                    for piece in stream:
                        chars += len(piece)
                        if chars > self._max_chars:
                            raise ChatTemplateError(f"the rendered prompt is longer than {self._max_chars} "
                                                    "characters (max_output_chars)")
                        budget.tick()
                        pieces.append(piece)
                finally:
                    stream.close()
        except ChatTemplateError:
            raise
        except Exception as exc:  # anything the template raised, bounds and RecursionError included
            raise ChatTemplateError(_describe(exc) + _line_suffix(exc)) from exc
        return "".join(pieces)

    def _content_spans(self, chat: list[dict[str, Any]], variables: dict[str, Any], text: str,
                       deadline: float) -> tuple[tuple[int, int], ...] | None:
        """Render again with each content replaced by a unique marker; where putting the contents
        back reproduces `text` exactly, the markers' places are the spans."""
        contents = [message.get("content") for message in chat]
        if any(content is not None and not isinstance(content, str) for content in contents):
            return None  # content parts (lists): not located
        if not any(contents):
            return ()
        nonce = secrets.token_hex(4)
        masked = [{**message, "content": f"{_MARK_OPEN}{nonce}{index:x}{_MARK_CLOSE}"}
                  if message.get("content") else message for index, message in enumerate(chat)]
        try:
            skeleton = self._render({**variables, "messages": masked}, deadline)
        except ChatTemplateError:
            return None  # renders with the real contents only: not located
        marker = re.compile(re.escape(_MARK_OPEN + nonce) + "([0-9a-f]+)" + re.escape(_MARK_CLOSE))
        return _align(marker.split(skeleton), text, contents)


def _align(parts: list[str], text: str, contents: list[str | None]) -> tuple[tuple[int, int], ...] | None:
    """Spans of `text` from a skeleton split at its markers ([literal, index, literal, ...]):
    each marker stands for its content, or its content stripped (templates that `| trim` or
    `.lstrip("\\n")`), whichever makes the text around it match."""
    if not text.startswith(parts[0]):
        return None
    position, spans = len(parts[0]), []
    for k in range(1, len(parts), 2):
        index = int(parts[k], 16)
        content = contents[index] if index < len(contents) else None
        following, last = parts[k + 1], k + 2 == len(parts)
        if not content:
            return None
        trimmed = (content.strip(), content.lstrip(), content.rstrip(), content.strip("\n"),
                   content.lstrip("\n"), content.rstrip("\n"))
        for candidate in dict.fromkeys((content, *trimmed)):
            end = position + len(candidate)
            if (text.startswith(candidate, position) and text.startswith(following, end)
                    and (not last or end + len(following) == len(text))):
                break
        else:
            return None
        if candidate:
            spans.append((position, end))
        position = end + len(following)
    return tuple(spans) if position == len(text) else None


# --- transformers' chat-template environment (chat_template_utils._compile_jinja_template) ---

class TemplateRaisedError(TemplateError):
    """raise_exception(message) in a template: the template's own refusal."""


def _raise_exception(message: Any) -> None:
    raise TemplateRaisedError(message)


def _strftime_now(format: str) -> str:  # transformers' parameter name
    return datetime.now().strftime(format)


def _tojson(x: Any, ensure_ascii: bool = False, indent: Any = None, separators: Any = None,
            sort_keys: bool = False) -> str:
    """transformers' tojson: json.dumps, without the HTML escaping of Jinja's own filter."""
    return sandbox.dump_json(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators,
                             sort_keys=sort_keys)


class _TemplateDict:
    """transformers' `dict` global: builds dicts, exposes nothing of the dict type."""

    def __call__(self, *args: Any, **kwargs: Any) -> dict:
        return dict(*args, **kwargs)

    def fromkeys(self, *args: Any, **kwargs: Any) -> dict:
        return dict.fromkeys(*args, **kwargs)


class _TemplateNamespace(Namespace):
    """transformers' `namespace` global: no attribute names that start with an underscore."""

    def __init__(*args: Any, **kwargs: Any) -> None:  # Namespace's signature, so `self=` works
        self, args = args[0], args[1:]
        attrs = dict(*args, **kwargs)
        for name in attrs:
            _TemplateNamespace._check_name(name)
        Namespace.__init__(self, attrs)

    def __setitem__(self, name: str, value: Any) -> None:
        _TemplateNamespace._check_name(name)
        Namespace.__setitem__(self, name, value)

    @staticmethod
    def _check_name(name: Any) -> None:
        if isinstance(name, str) and name.startswith("_"):
            raise SecurityError(f"Chat templates cannot store underscore-prefixed attributes on a "
                                f"namespace, but got {name!r}. Please rename the attribute.")


class _GenerationTag(Extension):
    """`{% generation %}...{% endgeneration %}`: renders its body (transformers uses it to find
    the assistant's tokens, which Lumen does not need)."""

    tags: ClassVar[set[str]] = {"generation"}

    def parse(self, parser: Parser) -> nodes.CallBlock:
        lineno = next(parser.stream).lineno
        body = parser.parse_statements(("name:endgeneration",), drop_needle=True)
        return nodes.CallBlock(self.call_method("_body"), [], [], body).set_lineno(lineno)

    def _body(self, caller: Any) -> str:
        return caller()


def _transformers_environment() -> sandbox.BoundedEnvironment:
    return sandbox.BoundedEnvironment(
        trim_blocks=True, lstrip_blocks=True, extensions=[_GenerationTag, "jinja2.ext.loopcontrols"],
        extra_filters={"tojson": _tojson},
        extra_globals={"raise_exception": _raise_exception, "strftime_now": _strftime_now,
                       "dict": _TemplateDict(), "namespace": _TemplateNamespace})


def _plain(value: Any) -> Any:
    """transformers' _plain_template_data: JSON types only, anything else a "<TypeName>" string
    (rich objects have methods the sandbox does not know to be dangerous)."""
    if value is None or type(value) in (str, int, float, bool):
        return value
    if isinstance(value, str):  # subclasses (enums, ...) lose their extra methods
        return str.__str__(value)
    if isinstance(value, int):
        return int.__int__(value)
    if isinstance(value, float):
        return float.__float__(value)
    if isinstance(value, Mapping):
        return {_plain(key): _plain(item) for key, item in value.items()}
    if isinstance(value, list):
        return [_plain(item) for item in value]
    if isinstance(value, tuple):
        return tuple(_plain(item) for item in value)
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return {f.name: _plain(getattr(value, f.name)) for f in dataclasses.fields(value)}
    return f"<{type(value).__name__}>"


def _conversation(messages: Any) -> list[dict[str, Any]]:
    """The messages as transformers hands them to a template: None values dropped, plain data,
    the reasoning under each of the names templates read it by."""
    if not isinstance(messages, (list, tuple)):
        raise ChatTemplateError(f"messages must be a list of dicts, not {type(messages).__name__}")
    chat = []
    for index, message in enumerate(messages):
        if not isinstance(message, Mapping):
            raise ChatTemplateError(f"messages[{index}] is a {type(message).__name__}; each message "
                                    "must be a dict with 'role' and 'content'")
        message = _plain({key: value for key, value in message.items() if value is not None})
        reasoning = next((message[key] for key in _REASONING_FIELDS if message.get(key) is not None), None)
        if reasoning is not None:
            message = {"thinking": reasoning, **message, "reasoning_content": reasoning}
        chat.append(message)
    return chat


def _variables(chat: list[dict[str, Any]], add_generation_prompt: bool, bos_token: str | None,
               eos_token: str | None, extra: dict[str, Any]) -> dict[str, Any]:
    extra = dict(extra)
    tools, documents = extra.pop("tools", None), extra.pop("documents", None)
    for name in ("messages", "add_generation_prompt"):
        if name in extra:
            raise ChatTemplateError(f"{name!r} is set by the renderer; it cannot be an extra variable")
    if documents is not None and not (isinstance(documents, (list, tuple))
                                      and all(isinstance(doc, Mapping) for doc in documents)):
        raise ChatTemplateError("documents must be a list of dicts with 'title' and 'text' keys")
    tokens = {name: token for name, token in (("bos_token", bos_token), ("eos_token", eos_token))
              if token is not None}
    return {"messages": chat, "tools": _plain(tools), "documents": _plain(documents),
            "add_generation_prompt": add_generation_prompt, **_plain({**tokens, **extra})}


def _describe(exc: BaseException) -> str:
    if isinstance(exc, TemplateRaisedError):
        message = exc.args[0] if exc.args else ""
        text = message if isinstance(message, str) else reprlib.repr(message)
        return "the template refused the conversation: " + _clip(text)
    if isinstance(exc, RecursionError):
        return "the template recursed too deeply (maximum recursion depth exceeded)"
    if isinstance(exc, TemplateLimitError):
        return str(exc)
    if isinstance(exc, SecurityError):
        return "the sandbox refused an operation: " + _clip(str(exc))
    return f"{type(exc).__name__}: {_clip(str(exc))}"


def _clip(text: str) -> str:
    return text if len(text) <= MESSAGE_QUOTE_CHARS else text[:MESSAGE_QUOTE_CHARS] + "..."


def _line_suffix(exc: BaseException) -> str:
    """" (template line N)" for the innermost template line in exc's traceback, if any."""
    line, tb = None, exc.__traceback__
    while tb is not None:
        if tb.tb_frame.f_code.co_filename == "<template>":
            line = tb.tb_lineno
        tb = tb.tb_next
    return "" if line is None else f" (template line {line})"


# --- where a model keeps its template ---

def template_from_gguf(reader: gguf.GGUFReader) -> str | None:
    """The GGUF metadata `tokenizer.chat_template`; None when the file has none."""
    field = reader.fields.get("tokenizer.chat_template")
    if field is None:
        return None
    if field.types != [gguf.GGUFValueType.STRING]:
        raise ModelLoadError(f"GGUF metadata tokenizer.chat_template is {field.types}, not a string")
    return field.contents()


def template_from_hf_dir(path: Path) -> str | None:
    """A Hugging Face model folder's chat template, where transformers looks for it first:
    chat_template.jinja, tokenizer_config.json's "chat_template" (a string, or a list of
    {"name", "template"} of which "default" is taken), chat_template.json. None when absent."""
    path = Path(path)
    jinja_file = path / "chat_template.jinja"
    if jinja_file.is_file():
        try:
            return jinja_file.read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as exc:
            raise ModelLoadError(f"{jinja_file}: not readable UTF-8 text ({exc})") from exc
    for name in ("tokenizer_config.json", "chat_template.json"):
        json_file = path / name
        if json_file.is_file():
            template = read_json(json_file, "the chat template").get("chat_template")
            if template is not None:
                return _default_template(template, json_file)
    return None


def _default_template(template: Any, json_file: Path) -> str | None:
    if isinstance(template, str):
        return template
    if isinstance(template, list) and all(isinstance(item, dict) for item in template):
        named = {item.get("name"): item.get("template") for item in template}
        default = named.get("default")
        if default is None or isinstance(default, str):
            return default  # None: only named templates (tool_use, rag, ...), no default one
    raise ModelLoadError(f"{json_file}: chat_template must be a string or a list of "
                         "{\"name\": ..., \"template\": ...} objects")
