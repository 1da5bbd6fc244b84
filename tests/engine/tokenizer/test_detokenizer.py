"""lumen.engine.tokenizer.detokenizer: streamed deltas must add up to the full decode, character-whole."""
from __future__ import annotations

import functools
import random
from pathlib import Path

import pytest

from lumen.engine.tokenizer.detokenizer import IncrementalDetokenizer
from lumen.engine.tokenizer.tokenizer import Tokenizer
from tests.conftest import shared_file


@functools.cache
def _load(path: Path) -> Tokenizer:
    return Tokenizer.from_gguf(path)


def stories() -> Tokenizer:
    """512-token SentencePiece vocabulary with all 256 `<0xNN>` byte-fallback tokens."""
    return _load(shared_file("models", "stories260K.gguf"))


def gpt2() -> Tokenizer:
    return _load(shared_file("vocab", "ggml-vocab-gpt-2.gguf"))


TOKENIZERS = {"stories": stories, "gpt-2": gpt2}


def stream(tok: Tokenizer, ids: list[int], prompt_ids: list[int] | None = None) -> list[str]:
    """Every chunk the detokenizer emits, the final flush included."""
    detok = IncrementalDetokenizer(tok, prompt_ids)
    return [detok.add(t) for t in ids] + [detok.flush()]


def random_text(rng: random.Random, n: int) -> str:
    """Mostly ASCII words, with 2-, 3- and 4-byte characters that vocabularies split."""
    alphabet = "abc xyz.\n" * 4 + "\u00e9\u00df\u0416\u4f60\u597d\u3002\U0001f600\U0001f9e0\u200d"
    return "".join(rng.choice(alphabet) for _ in range(n))


@pytest.mark.parametrize("name", TOKENIZERS)
def test_random_ids_concatenate_to_decode(name: str) -> None:
    """Arbitrary ids (invalid UTF-8 included) stream to exactly `decode(ids)`."""
    tok = TOKENIZERS[name]()
    rng = random.Random(f"ids-{name}")
    for _ in range(300):
        ids = [rng.randrange(tok.vocab_size) for _ in range(rng.randrange(0, 40))]
        assert "".join(stream(tok, ids)) == tok.decode(ids), ids


@pytest.mark.parametrize("name", TOKENIZERS)
def test_encoded_text_streams_whole_characters(name: str) -> None:
    """Valid text streams without a single U+FFFD, so no chunk ever split a character."""
    tok = TOKENIZERS[name]()
    rng = random.Random(f"text-{name}")
    for _ in range(300):
        text = random_text(rng, rng.randrange(1, 30))
        ids = tok.encode(text)
        chunks = stream(tok, ids)
        assert "".join(chunks) == tok.decode(ids) == text
        assert not any("\ufffd" in chunk for chunk in chunks), chunks


def test_byte_fallback_character_comes_out_whole() -> None:
    tok = stories()
    ids = tok.encode("\u4f60")  # not in the 512-token vocabulary: "▁" then three byte tokens
    assert [tok.piece(i) for i in ids[-3:]] == ["<0xE4>", "<0xBD>", "<0xA0>"]
    chunks = stream(tok, ids)
    assert chunks[-4:] == ["", "", "\u4f60", ""]


def test_multibyte_character_split_across_bpe_tokens() -> None:
    tok = gpt2()
    ids = tok.encode("\U0001f600!")
    assert len(ids) > 2  # the emoji's four bytes span several tokens
    chunks = stream(tok, ids)
    assert "\U0001f600" in chunks and "".join(chunks) == "\U0001f600!"


def test_flush_renders_incomplete_bytes_as_replacement() -> None:
    tok = stories()
    detok = IncrementalDetokenizer(tok)
    assert detok.add(tok.pieces.index("<0xE4>")) == ""
    assert detok.flush() == "\ufffd"


def test_leading_space_rule() -> None:
    tok = stories()
    gen = tok.encode("Once upon a time")  # starts with "▁Once"
    # After BOS or nothing, the first word's space is SentencePiece's prefix: dropped.
    for prompt in (None, [], [tok.bos_id]):
        assert "".join(stream(tok, gen, prompt)) == tok.decode(gen) == "Once upon a time"
    # After prompt text, the same space separates words: kept.
    prompt = [tok.bos_id, *tok.encode("Hello")]
    assert "".join(stream(tok, gen, prompt)) == " Once upon a time"
    assert tok.decode(prompt) + "".join(stream(tok, gen, prompt)) == tok.decode(prompt + gen)
    # Byte-level BPE has no prefix space, so nothing is ever stripped.
    assert "".join(stream(gpt2(), gpt2().encode(" Hi"))) == " Hi"


def test_stories_greedy_oracle_streams_exactly(stories_greedy) -> None:
    ids, text = stories_greedy
    assert "".join(stream(stories(), ids, [1])) == text


def test_control_tokens_print_nothing() -> None:
    tok = stories()
    assert stream(tok, [tok.bos_id, tok.eos_id]) == ["", "", ""]


def test_out_of_range_token_raises() -> None:
    detok = IncrementalDetokenizer(stories())
    with pytest.raises(ValueError, match="512"):
        detok.add(512)
