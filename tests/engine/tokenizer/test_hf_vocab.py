"""tokenizer.json read as llama.cpp would read the same model's GGUF vocabulary.

Real tokenizer.json files come from transformers converting llama.cpp's vocab-only GGUF files; our
tokenizer built from them must pass llama.cpp's own test vectors for those vocabularies.
"""
from __future__ import annotations

import functools
import json
import shutil
from pathlib import Path

import pytest

from lumen.engine.errors import ModelLoadError
from lumen.engine.tokenizer.hf_vocab import read_hf_vocab
from lumen.engine.tokenizer.tokenizer import Tokenizer
from tests.engine.tokenizer.test_tokenizer import vocab_cases, vocab_path

# phi-3: SentencePiece with the legacy Prepend/Replace normalizer and added tokens; gpt-2: byte-level BPE.
CONVERTED = ["phi-3", "gpt-2"]


@functools.cache
def _converted(name: str, root: Path) -> Path:
    transformers = pytest.importorskip("transformers", reason="transformers writes the tokenizer.json files")
    directory = root / name
    directory.mkdir()
    shutil.copyfile(vocab_path(name), directory / "vocab.gguf")
    transformers.AutoTokenizer.from_pretrained(str(directory), gguf_file="vocab.gguf").save_pretrained(directory)
    (directory / "vocab.gguf").unlink()
    return directory


@pytest.fixture(scope="session")
def converted(tmp_path_factory):
    root = tmp_path_factory.mktemp("converted")
    return lambda name: _converted(name, root)


@pytest.mark.parametrize("name", CONVERTED)
def test_converted_tokenizer_passes_llama_cpp_vectors(converted, name):
    gguf = Tokenizer.from_gguf(vocab_path(name))
    ours = Tokenizer.from_hf_dir(converted(name), vocab_size=gguf.vocab_size)
    failures = [(text, want, got) for text, want in vocab_cases(name) if (got := ours.encode(text)) != want]
    assert not failures, "\n".join(f"{t!r}: want {w}, got {g}" for t, w, g in failures)
    assert (ours.bos_id, ours.eos_id, ours.add_bos, ours.add_eos, ours.add_space_prefix) == \
        (gguf.bos_id, gguf.eos_id, gguf.add_bos, gguf.add_eos, gguf.add_space_prefix)
    assert all(ours.token_bytes(i) == gguf.token_bytes(i) for i in range(gguf.vocab_size))


def spm_json(**changes) -> dict:
    """A tiny SentencePiece-style tokenizer.json: merges ranked as the converter ranks them."""
    vocab = {"<unk>": 0, "<s>": 1, "</s>": 2, "<0x41>": 3, "▁": 4, "a": 5, "b": 6, "▁a": 7, "ab": 8, "▁ab": 9}
    data = {
        "added_tokens": [{"id": i, "content": t, "special": True} for t, i in list(vocab.items())[:3]]
        + [{"id": 10, "content": "<tool>", "special": False}],
        "normalizer": None,
        "pre_tokenizer": {"type": "Metaspace", "replacement": "▁", "prepend_scheme": "first", "split": False},
        "post_processor": {"type": "TemplateProcessing", "single": [{"SpecialToken": {"id": "<s>"}},
                                                                    {"Sequence": {"id": "A"}}]},
        "model": {"type": "BPE", "byte_fallback": True, "unk_token": "<unk>", "vocab": vocab,
                  "merges": [["▁", "a"], ["a", "b"], ["▁a", "b"], ["▁", "ab"]]},
    }
    data.update(changes)
    return data


def write(tmp_path: Path, tokenizer: dict, config: dict | None = None) -> Path:
    (tmp_path / "tokenizer.json").write_text(json.dumps(tokenizer))
    if config is not None:
        (tmp_path / "tokenizer_config.json").write_text(json.dumps(config))
    return tmp_path


def test_spm_vocab_types_scores_specials_and_padding(tmp_path):
    vocab = read_hf_vocab(write(tmp_path, spm_json()), vocab_size=13, model_config={"eos_token_id": 2})
    assert vocab.model == "llama" and vocab.tokens[10:] == ["<tool>", "[PAD11]", "[PAD12]"]
    # unknown, control, byte, normal, user-defined, unused
    assert vocab.types == [2, 3, 3, 6, 1, 1, 1, 1, 1, 1, 4, 5, 5]
    assert vocab.scores[7:10] == [0.0, -1.0, -2.0]  # minus the rank of the first merge forming each piece
    model = spm_json()["model"] | {"merges": ["▁ a", "a b", "▁a b", "▁ ab"]}  # the older "a b" spelling
    assert read_hf_vocab(write(tmp_path, spm_json(model=model))).scores == vocab.scores[:11]
    assert (vocab.bos_id, vocab.eos_id, vocab.unk_id, vocab.add_bos, vocab.add_space_prefix) == \
        (None, 2, 0, False, True)
    tok = Tokenizer.from_hf_dir(write(tmp_path, spm_json(), {"bos_token": {"content": "<s>"}, "add_eos_token": True}))
    assert (tok.bos_id, tok.add_bos, tok.add_eos) == (1, True, True)
    assert tok.encode("ab a<tool>A", add_special_tokens=False) == [9, 7, 10, 4, 3]
    assert tok.decode([1, 9, 7, 10, 4, 3, 0]) == "ab a<tool> A"


def test_legacy_normalizer_and_llama3_pre_tokenizer(tmp_path):
    legacy = spm_json(pre_tokenizer=None, normalizer={"type": "Sequence", "normalizers": [
        {"type": "Prepend", "prepend": "▁"}, {"type": "Replace", "pattern": {"String": " "}, "content": "▁"}]})
    assert read_hf_vocab(write(tmp_path, legacy)).add_space_prefix
    llama3 = {"type": "Sequence", "pretokenizers": [
        {"type": "Split", "pattern": {"Regex": r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"
                                               r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"},
         "behavior": "Isolated", "invert": False},
        {"type": "ByteLevel", "add_prefix_space": False, "use_regex": False}]}
    bpe = {"pre_tokenizer": llama3, "model": {"type": "BPE", "ignore_merges": True, "vocab": {"a": 0, "b": 1, "ab": 2},
                                              "merges": ["a b"]}}
    vocab = read_hf_vocab(write(tmp_path, bpe))
    assert (vocab.model, vocab.pre, vocab.merges) == ("gpt2", "llama3", ["a b"])


@pytest.mark.parametrize("change,message", [
    ({"model": {"type": "Unigram", "vocab": []}}, r"model\.type 'Unigram' is not supported"),
    ({"normalizer": {"type": "NFKC"}}, r"is not supported with byte fallback"),
    ({"pre_tokenizer": {"type": "Metaspace", "replacement": "▁", "split": True}}, r"Metaspace\('▁', split=false\)"),
    ({"pre_tokenizer": None}, r"spaces would not become '▁'"),
    ({"model": {"type": "BPE", "vocab": {"a": 0}, "merges": []},
      "pre_tokenizer": {"type": "Sequence", "pretokenizers": [
          {"type": "Split", "pattern": {"Regex": "[a-z]+"}, "behavior": "Isolated"},
          {"type": "ByteLevel", "use_regex": False}]}},
     r"regexes \['\[a-z\]\+'\] are not ones llama\.cpp knows"),
    ({"model": {"type": "BPE", "vocab": {"a": 0}}, "pre_tokenizer": {"type": "Whitespace"}},
     r"pre_tokenizer .* is not supported"),
    ({"added_tokens": [{"id": "x"}]}, r"malformed tokenizer"),
])
def test_unsupported_tokenizers_are_refused(tmp_path, change, message):
    with pytest.raises(ModelLoadError, match=rf"tokenizer\.json: .*{message}"):
        read_hf_vocab(write(tmp_path, spm_json(**change)))


def test_unknown_bos_token_is_refused(tmp_path):
    with pytest.raises(ModelLoadError, match=r"special token '<bos>' .* is not in the vocabulary"):
        read_hf_vocab(write(tmp_path, spm_json(), {"bos_token": "<bos>"}))
