"""The built-in demo model: a small random-weight llama GGUF with a real BPE vocabulary.

`lumen serve` without `--model` serves this so that the server works on a machine that
cannot download anything. The file is written once into a cache directory and then
loaded through the ordinary GGUF loader; nothing downstream may special-case it. Its
weights are random, so its text is gibberish made of real English tokens.

The vocabulary is a GPT-2 style byte-level BPE trained here, deterministically, on
`demo_corpus.txt` (original children's stories written for this project). Token ids:
0 = `<|bos|>`, 1 = `<|eos|>` (both CONTROL), 2..257 = the 256 byte symbols, then merges.
"""

from __future__ import annotations

import json
from pathlib import Path

from gguf import GGMLQuantizationType, TokenType
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

from lumen.engine.cache_dir import default_cache_dir
from lumen.engine.demo.synthetic import SyntheticShape, VocabMetadata, write_synthetic_llama

# Bump whenever anything below (corpus, shape, seed, vocab recipe) changes the file's
# bytes: the version is in the cache file name, so a stale cache is never reused.
DEMO_MODEL_VERSION = "1"

DEMO_NAME = "lumen-demo"
DEMO_SHAPE = SyntheticShape(dim=256, n_layers=4, n_heads=8, n_kv_heads=4, ffn_dim=768,
                            context_length=2048)
DEMO_QTYPE = GGMLQuantizationType.Q8_0
DEMO_SEED = 20240611
DEMO_VOCAB_SIZE = 2048
BOS_TOKEN = "<|bos|>"
EOS_TOKEN = "<|eos|>"
CORPUS_PATH = Path(__file__).with_name("demo_corpus.txt")


def demo_file_name() -> str:
    return f"{DEMO_NAME}-{DEMO_MODEL_VERSION}-{DEMO_QTYPE.name.lower()}.gguf"


def train_demo_tokenizer() -> Tokenizer:
    """Train the demo byte-level BPE on the committed corpus (about 20 ms).

    The `tokenizers` trainer breaks frequency ties by pair id, so the result is the
    same on every run; tests/engine/demo/test_synthetic.py checks that.
    """
    # Normalise line endings: a CRLF checkout must not change the vocabulary.
    text = CORPUS_PATH.read_text(encoding="utf-8").replace("\r\n", "\n")
    tokenizer = Tokenizer(models.BPE())
    # GPT-2 pre-tokenization (its regex, no prefix space): what `tokenizer.ggml.pre =
    # gpt-2` tells llama.cpp to do, so both sides split text identically.
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=DEMO_VOCAB_SIZE,
        special_tokens=[BOS_TOKEN, EOS_TOKEN],
        # All 256 byte symbols, seen in the corpus or not, so that every string encodes.
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tokenizer.train_from_iterator([text], trainer)
    return tokenizer


def vocab_from_tokenizer(tokenizer: Tokenizer) -> VocabMetadata:
    """The GGUF `tokenizer.ggml.*` fields of a trained byte-level BPE tokenizer."""
    model = json.loads(tokenizer.to_str())["model"]
    by_id = sorted(model["vocab"].items(), key=lambda item: item[1])
    if [token_id for _, token_id in by_id] != list(range(len(by_id))):
        raise ValueError("BPE vocabulary ids are not contiguous from 0")
    tokens = tuple(token for token, _ in by_id)
    special = {BOS_TOKEN, EOS_TOKEN}
    token_types = tuple(int(TokenType.CONTROL if t in special else TokenType.NORMAL)
                        for t in tokens)
    # GGUF stores a merge as "left right"; byte-level symbols never contain a space
    # (it is mapped to "Ġ"), so the separator is unambiguous.
    merges = tuple(m if isinstance(m, str) else " ".join(m) for m in model["merges"])
    return VocabMetadata(
        model="gpt2", pre="gpt-2", tokens=tokens, token_types=token_types, merges=merges,
        bos_id=model["vocab"][BOS_TOKEN], eos_id=model["vocab"][EOS_TOKEN],
        add_bos=True, add_eos=False,
    )


def demo_vocab() -> VocabMetadata:
    return vocab_from_tokenizer(train_demo_tokenizer())


def ensure_demo_model(cache_dir: Path | None = None) -> Path:
    """Return the cached demo GGUF file, writing it first if it is not there yet.

    Safe when processes race: each writes its own temp file and renames it into place
    atomically, and all of them write the same bytes.
    """
    directory = Path(cache_dir) if cache_dir is not None else default_cache_dir()
    path = directory / demo_file_name()
    if path.is_file():
        return path
    directory.mkdir(parents=True, exist_ok=True)
    return write_synthetic_llama(path, DEMO_SHAPE, demo_vocab(), qtype=DEMO_QTYPE,
                                 seed=DEMO_SEED, name=DEMO_NAME)

