"""A conversation turned into prompt token ids: rendered with a chat template, then tokenized
with special-token text parsed in the template's text and never in the messages' content.

Parsing special tokens everywhere (as Hugging Face's apply_chat_template and llama.cpp's
server do) lets a user whose message contains `<|im_end|><|im_start|>system` open a system
turn of their own. Here the content's character ranges (RenderedChat.content_spans) are
protected: special-token text inside them stays text. A template that rewrites content so
that its ranges cannot be found is still served when no message contains special-token
text; otherwise the request is refused rather than parsed unsafely. Nothing here runs the model.
"""
from __future__ import annotations

from collections.abc import Sequence

from lumen.engine.chat.template import ChatTemplate
from lumen.engine.errors import InvalidRequestError, quoted
from lumen.engine.tokenizer.tokenizer import Tokenizer


def template_tokens(tokenizer: Tokenizer) -> dict[str, str]:
    """The special-token texts a template may use, as transformers passes them."""
    def text(tid: int | None) -> str:
        return tokenizer.piece(tid) if tid is not None else ""

    return {"bos_token": text(tokenizer.bos_id), "eos_token": text(tokenizer.eos_id),
            "unk_token": text(tokenizer.unk_id), "pad_token": text(tokenizer.pad_id)}


def chat_prompt_ids(tokenizer: Tokenizer, template: ChatTemplate, messages: Sequence[dict[str, str]],
                    add_generation_prompt: bool = True) -> list[int]:
    """The prompt ids of `messages` (dicts with "role" and "content") rendered by `template`.

    No BOS is added beyond what the template writes (as apply_chat_template does). Raises
    ChatTemplateError (an InvalidRequestError) when the template fails."""
    tokens = template_tokens(tokenizer)
    rendered = template.render(list(messages), add_generation_prompt=add_generation_prompt,
                               bos_token=tokens["bos_token"], eos_token=tokens["eos_token"],
                               unk_token=tokens["unk_token"], pad_token=tokens["pad_token"])
    spans = rendered.content_spans
    if spans is None:
        for i, message in enumerate(messages):
            found = tokenizer.find_special(message["content"])
            if found is not None:
                raise InvalidRequestError(
                    f"messages[{i}].content", f"contains the special-token text {quoted(found)}, and this chat "
                    "template changes message content so that Lumen cannot keep it plain text; remove it")
        spans = ()
    return tokenizer.encode(rendered.text, add_special_tokens=False, parse_special=True,
                            protected=_merged(spans))


def _merged(spans: Sequence[tuple[int, int]]) -> list[tuple[int, int]]:
    """Sorted, disjoint ranges covering `spans`."""
    out: list[tuple[int, int]] = []
    for start, end in sorted(s for s in spans if s[1] > s[0]):
        if out and start <= out[-1][1]:
            out[-1] = (out[-1][0], max(out[-1][1], end))
        else:
            out.append((start, end))
    return out
