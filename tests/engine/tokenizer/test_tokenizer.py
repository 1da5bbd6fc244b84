"""lumen.engine.tokenizer.tokenizer against llama.cpp's own tokenizer test vectors and a slow reference.

The vocab-only GGUF files and their expected ids come from llama.cpp's test suite
(../shared/data/vocab); tests skip with the reason when that folder is absent.
"""
from __future__ import annotations

import functools
import random
from pathlib import Path

import gguf
import pytest

from lumen.engine.tokenizer.tokenizer import Tokenizer
from lumen.engine.tokenizer.vocab import GGUFVocab
from tests.conftest import shared_file

VOCABS = ["llama-spm", "phi-3", "gpt-2", "deepseek-llm", "falcon"]
SEPARATOR = "\n__ggml_vocab_test__\n"


def vocab_path(name: str) -> Path:
    return shared_file("vocab", f"ggml-vocab-{name}.gguf")


@functools.cache
def _load(path: Path) -> Tokenizer:
    return Tokenizer.from_gguf(path)


def load(name: str) -> Tokenizer:
    """One tokenizer per vocabulary for the whole run: parsing a GGUF takes about a second."""
    return _load(vocab_path(name))


def vocab_cases(name: str) -> list[tuple[str, list[int]]]:
    """(text, expected ids) pairs of llama.cpp's `.inp` / `.out` files."""
    path = vocab_path(name)
    texts = Path(f"{path}.inp").read_bytes().decode("utf-8").split(SEPARATOR)
    assert texts[-1] == "", "the .inp file must end with a separator"
    lines = Path(f"{path}.out").read_bytes().decode("utf-8").split("\n")
    expected = [[int(x) for x in line.split()] for line in lines[:len(texts) - 1]]
    return list(zip(texts[:-1], expected))


@pytest.mark.parametrize("name", VOCABS)
def test_llama_cpp_vocab_cases(name: str) -> None:
    tok, cases = load(name), vocab_cases(name)
    assert len(cases) == 46
    failures = [(text, want, got) for text, want in cases if (got := tok.encode(text)) != want]
    report = "\n".join(f"{text!r}: want {want}, got {got}" for text, want, got in failures)
    assert not failures, f"{len(failures)}/46 cases differ from llama.cpp:\n{report}"


@pytest.mark.parametrize("name", VOCABS)
def test_decode_round_trips_vocab_cases(name: str) -> None:
    """Both families are lossless here: SPM drops exactly the space that encoding added."""
    tok = load(name)
    bad = [(text, tok.decode(tok.encode(text))) for text, _ in vocab_cases(name)]
    bad = [(text, back) for text, back in bad if back != text]
    assert not bad, "\n".join(f"{text!r} -> {back!r}" for text, back in bad)


def test_metadata_properties() -> None:
    spm, gpt2, deepseek = load("llama-spm"), load("gpt-2"), load("deepseek-llm")
    assert (spm.model, spm.vocab_size, spm.bos_id, spm.eos_id) == ("llama", 32000, 1, 2)
    assert spm.add_bos and not spm.add_eos and spm.add_space_prefix
    assert (gpt2.model, gpt2.vocab_size, gpt2.bos_id, gpt2.eos_id) == ("gpt2", 50257, 50256, 50256)
    assert not gpt2.add_bos and not gpt2.add_space_prefix
    assert deepseek.add_bos and deepseek.bos_id == 100000
    assert spm.pieces[1] == "<s>" and spm.piece(29871) == "\u2581" and len(spm.pieces) == 32000


def test_add_special_tokens_follows_metadata() -> None:
    for name, bos in (("llama-spm", [1]), ("deepseek-llm", [100000]), ("gpt-2", [])):
        tok = load(name)
        assert tok.encode("Hello world", add_special_tokens=True) == bos + tok.encode("Hello world")
    assert load("llama-spm").encode("", add_special_tokens=True) == [1]


def test_special_token_text_is_not_parsed() -> None:
    spm, phi3, gpt2 = load("llama-spm"), load("phi-3"), load("gpt-2")
    assert 1 not in spm.encode("<s>hi")
    assert 32000 not in phi3.encode("a <|endoftext|> b")
    assert 50256 not in gpt2.encode("<|endoftext|>")


def test_user_defined_tokens_are_split_out_first() -> None:
    # DeepSeek marks a few Latin-1 letters as user-defined tokens; llama.cpp (and HF) match
    # them in the raw text before pre-tokenization.
    deepseek = load("deepseek-llm")
    assert deepseek.encode("F\u00fchrer") == deepseek.encode("F") + [100014] + deepseek.encode("hrer")
    # Phi-3's file marks "</s>" user-defined, but llama.cpp treats it as an end-of-generation
    # control token: tokenized as plain text, printed as nothing.
    phi3 = load("phi-3")
    assert 2 not in phi3.encode("a</s>b") and phi3.decode([2]) == ""


def test_decode_rules() -> None:
    spm = load("llama-spm")
    ids = spm.encode("Hello world")
    assert spm.decode(ids) == "Hello world"
    assert spm.decode([1, *ids, 2]) == "Hello world"  # control tokens print nothing
    assert spm.decode([1, 2]) == ""
    assert spm.decode(spm.encode("  two")) == "  two"  # only one space is the prefix
    # Byte-fallback tokens assemble into UTF-8; a lone continuation byte is U+FFFD.
    assert spm.decode([spm.pieces.index(f"<0x{b:02X}>") for b in "é".encode()]) == "é"
    assert spm.decode([spm.pieces.index("<0xA9>")]) == "\ufffd"


def test_token_bytes() -> None:
    spm, gpt2 = load("llama-spm"), load("gpt-2")
    assert spm.token_bytes(29871) == b" "
    assert spm.token_bytes(spm.pieces.index("<0x0A>")) == b"\n"
    assert spm.token_bytes(1) == b"" and spm.token_bytes(0) == b""
    assert gpt2.token_bytes(gpt2.pieces.index("\u0120Hello")) == b" Hello"
    assert gpt2.token_bytes(gpt2.pieces.index("\u010a")) == b"\n"
    assert gpt2.token_bytes(50256) == b""


@pytest.mark.parametrize("bad", [-1, 32000, 10**9])
def test_out_of_range_ids_raise(bad: int) -> None:
    tok = load("llama-spm")
    with pytest.raises(ValueError, match=rf"{bad}.*32000"):
        tok.decode([5, bad])


def test_stories260k_oracle_decode(stories_path, stories_greedy) -> None:
    tok = Tokenizer.from_gguf(stories_path)
    ids, text = stories_greedy
    assert tok.decode(ids) == text
    assert tok.decode([1, *ids]) == text


def _write_vocab(path: Path, model: str, tokens: list[str], **kv) -> Path:
    writer = gguf.GGUFWriter(path, arch="llama")
    writer.add_tokenizer_model(model)
    writer.add_token_list(tokens)
    for key, value in kv.items():
        writer.add_uint32(f"tokenizer.ggml.{key}", value)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.close()
    return path


def test_unsupported_model_is_named(tmp_path: Path) -> None:
    path = _write_vocab(tmp_path / "bert.gguf", "bert", ["[PAD]", "a"])
    with pytest.raises(ValueError, match="'bert'"):
        Tokenizer.from_gguf(path)


def test_llama_defaults_and_missing_ids(tmp_path: Path) -> None:
    tokens = ["<unk>", "<s>", "</s>", "\u2581a", "a"]
    tok = Tokenizer.from_gguf(_write_vocab(tmp_path / "v.gguf", "llama", tokens,
                                           eos_token_id=0xFFFFFFFF))
    assert tok.add_bos and tok.bos_id == 1  # llama.cpp's defaults when keys are absent
    assert tok.eos_id is None  # 0xFFFFFFFF means "no such token"
    assert tok.encode("a", add_special_tokens=True) == [1, 3]


# -- SentencePiece merge against a slow, obviously correct reference ----------------------

def reference_spm_encode(vocab: GGUFVocab, text: str) -> list[int]:
    """llama.cpp's SPM rule, naively: merge the best-scoring adjacent pair (leftmost on
    ties) until none forms a token; pieces that are not tokens become byte tokens."""
    index = {t: i for i, t in enumerate(vocab.tokens)}
    syms = list((" " + text).replace(" ", "\u2581")) if text else []
    while True:
        pairs = [(vocab.scores[index[a + b]], -i) for i, (a, b) in enumerate(zip(syms, syms[1:]))
                 if a + b in index]
        if not pairs:
            break
        i = -max(pairs)[1]
        syms[i:i + 2] = [syms[i] + syms[i + 1]]
    return [i for s in syms for i in ([index[s]] if s in index else
                                      [index[f"<0x{b:02X}>"] for b in s.encode()])]


def random_text(rng: random.Random, pieces: list[str], length: int) -> str:
    """Vocabulary pieces (so merges happen) mixed with characters that need byte fallback."""
    odd = " \n\t\u00e9\u4f60\U0001f600\u0416 "
    parts = [rng.choice(pieces).replace("\u2581", " ") if rng.random() < 0.7 else rng.choice(odd)
             for _ in range(length)]
    return "".join(parts)


@pytest.mark.parametrize("source", ["stories", "llama-spm"])
def test_spm_merge_matches_reference(source: str, stories_path) -> None:
    path = stories_path if source == "stories" else vocab_path(source)
    vocab = GGUFVocab.from_reader(gguf.GGUFReader(path))
    tok = Tokenizer(vocab)
    normal = [t for t, k in zip(vocab.tokens, vocab.types) if k == gguf.TokenType.NORMAL]
    rng = random.Random(f"spm-{source}")
    for _ in range(200):
        text = random_text(rng, normal, rng.randrange(1, 12))
        assert tok.encode(text) == reference_spm_encode(vocab, text), repr(text)


@pytest.mark.parametrize("name", VOCABS)
def test_matches_llama_cpp_on_random_text(name: str) -> None:
    """Only where llama-cpp-python is installed (the `bench` extra): a live llama.cpp oracle."""
    llama_cpp = pytest.importorskip("llama_cpp")
    ref = llama_cpp.Llama(model_path=str(vocab_path(name)), vocab_only=True, verbose=False)
    tok = load(name)
    pieces = [p for p in tok.pieces if len(p) < 12]
    rng = random.Random(f"llama-cpp-{name}")
    for _ in range(300):
        text = random_text(rng, pieces, rng.randrange(1, 10))
        want = ref.tokenize(text.encode(), add_bos=False, special=False)
        assert tok.encode(text) == want, repr(text)
