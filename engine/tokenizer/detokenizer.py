"""Streaming detokenization: turn generated token ids into text deltas, one token at a time.

Each `add` costs O(1) in the length of the text so far: it looks up the token's bytes and
feeds them to an incremental UTF-8 decoder, which holds back an incomplete multi-byte
character (split across tokens, or spelled as several `<0xNN>` byte tokens) until it is
complete. This module never re-decodes the whole sequence and never splits a character.

The SentencePiece leading-space rule (for tokenizers with `add_space_prefix`):

* If the prompt prints no text (no prompt, or only BOS / other control tokens), generated
  text starts a fresh decode, so the first generated token that prints anything loses one
  leading space: the concatenated deltas equal `tokenizer.decode(generated_ids)`.
* If the prompt prints text, the space separates the first generated word from the prompt
  and is kept: the deltas equal `decode(prompt_ids + generated_ids)` minus `decode(prompt_ids)`
  (when the prompt ends on a whole character).
"""

from __future__ import annotations

import codecs

from lumen.engine.tokenizer.tokenizer import Tokenizer


class IncrementalDetokenizer:
    """Turns one sequence's generated token ids into new text, never splitting a character."""

    def __init__(self, tokenizer: Tokenizer, prompt_ids: list[int] | None = None) -> None:
        self._tokenizer = tokenizer
        self._utf8 = codecs.getincrementaldecoder("utf-8")(errors="replace")
        prompt_prints = any(tokenizer.token_bytes(t) for t in prompt_ids or ())
        self._strip_space = tokenizer.add_space_prefix and not prompt_prints

    def add(self, token_id: int) -> str:
        """The text that `token_id` completes; "" while a character is still incomplete."""
        data = self._tokenizer.token_bytes(token_id)
        if self._strip_space and data:
            self._strip_space = False
            data = data[1:] if data[:1] == b" " else data
        return self._utf8.decode(data)

    def flush(self) -> str:
        """Whatever bytes are still held back at the end, each bad sequence as U+FFFD."""
        return self._utf8.decode(b"", final=True)
