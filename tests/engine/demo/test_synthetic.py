"""Tests for lumen.engine.demo.synthetic (random-weight llama GGUF writer) and lumen.engine.demo.demo_model."""

from __future__ import annotations

import hashlib
from pathlib import Path

import gguf
import numpy as np
import pytest
from gguf import GGMLQuantizationType, LlamaFileType, TokenType
from tokenizers import Tokenizer, decoders, models, pre_tokenizers

from lumen.engine.demo import demo_model, synthetic
from lumen.engine.demo.demo_model import (
    BOS_TOKEN,
    DEMO_SHAPE,
    EOS_TOKEN,
    default_cache_dir,
    demo_file_name,
    ensure_demo_model,
    train_demo_tokenizer,
)
from lumen.engine.demo.synthetic import SyntheticShape, VocabMetadata, write_synthetic_llama
from tests.conftest import SHARED_DATA

LLAMA_SPM_VOCAB = SHARED_DATA / "vocab" / "ggml-vocab-llama-spm.gguf"

SMALL = SyntheticShape(dim=64, n_layers=2, n_heads=4, n_kv_heads=2, ffn_dim=96, context_length=128)
TINY_VOCAB = VocabMetadata(
    model="llama", tokens=tuple(["<unk>", "<s>", "</s>"] + [f"t{i}" for i in range(61)]),
    scores=tuple(float(-i) for i in range(64)), token_types=(2, 3, 3) + (1,) * 61,
    bos_id=1, eos_id=2, unk_id=0, add_bos=True, add_eos=False,
)


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def field(reader: gguf.GGUFReader, key: str) -> object:
    return reader.fields[key].contents()


def expected_shapes(shape: SyntheticShape, vocab_size: int) -> dict[str, tuple[int, ...]]:
    """Numpy ([out, in]) shape of every tensor a llama file must hold."""
    d, f, kv = shape.dim, shape.ffn_dim, shape.kv_dim
    per_layer = {"attn_norm": (d,), "attn_q": (d, d), "attn_k": (kv, d), "attn_v": (kv, d),
                 "attn_output": (d, d), "ffn_norm": (d,), "ffn_gate": (f, d), "ffn_up": (f, d),
                 "ffn_down": (d, f)}
    shapes = {"token_embd.weight": (vocab_size, d)}
    for i in range(shape.n_layers):
        shapes.update({f"blk.{i}.{name}.weight": s for name, s in per_layer.items()})
    return shapes | {"output_norm.weight": (d,), "output.weight": (vocab_size, d)}


@pytest.fixture(scope="module")
def demo_path(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return ensure_demo_model(tmp_path_factory.mktemp("cache"))


def test_demo_tokenizer_training_is_deterministic() -> None:
    first, second = train_demo_tokenizer(), train_demo_tokenizer()
    assert first.to_str() == second.to_str()
    vocab = demo_model.vocab_from_tokenizer(first)
    assert vocab == demo_model.vocab_from_tokenizer(second)
    assert vocab.vocab_size == demo_model.DEMO_VOCAB_SIZE
    assert len(vocab.merges) == vocab.vocab_size - 2 - 256


def test_demo_file_is_byte_identical_across_writes(tmp_path: Path, demo_path: Path) -> None:
    again = ensure_demo_model(tmp_path / "other")
    assert again.name == demo_path.name == f"lumen-demo-{demo_model.DEMO_MODEL_VERSION}-q8_0.gguf"
    assert sha256(again) == sha256(demo_path)
    assert [p.name for p in again.parent.iterdir()] == [again.name]  # no temp file left


def test_demo_file_is_written_once(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("LUMEN_CACHE_DIR", str(tmp_path / "lumen-cache"))
    path = ensure_demo_model()
    assert path == tmp_path / "lumen-cache" / demo_file_name()

    def fail(*args: object, **kwargs: object) -> None:
        raise AssertionError("the cached demo model was rewritten")

    monkeypatch.setattr(demo_model, "write_synthetic_llama", fail)
    assert ensure_demo_model() == path


def test_default_cache_dir(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("LUMEN_CACHE_DIR", str(tmp_path / "explicit"))
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert default_cache_dir() == tmp_path / "explicit"
    monkeypatch.setenv("LUMEN_CACHE_DIR", "")
    assert default_cache_dir() == tmp_path / "xdg" / "lumen"
    monkeypatch.delenv("LUMEN_CACHE_DIR")
    monkeypatch.delenv("XDG_CACHE_HOME")
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    assert default_cache_dir() == tmp_path / "home" / ".cache" / "lumen"


def test_demo_file_metadata(demo_path: Path) -> None:
    reader = gguf.GGUFReader(demo_path)
    s = DEMO_SHAPE
    expected = {
        "general.architecture": "llama", "general.name": "lumen-demo",
        "general.file_type": int(LlamaFileType.MOSTLY_Q8_0), "general.quantization_version": 2,
        "llama.context_length": s.context_length, "llama.embedding_length": s.dim,
        "llama.block_count": s.n_layers, "llama.feed_forward_length": s.ffn_dim,
        "llama.attention.head_count": s.n_heads, "llama.attention.head_count_kv": s.n_kv_heads,
        "llama.rope.dimension_count": s.dim // s.n_heads, "llama.rope.freq_base": 10000.0,
        "llama.vocab_size": 2048, "tokenizer.ggml.model": "gpt2", "tokenizer.ggml.pre": "gpt-2",
        "tokenizer.ggml.bos_token_id": 0, "tokenizer.ggml.eos_token_id": 1,
        "tokenizer.ggml.add_bos_token": True, "tokenizer.ggml.add_eos_token": False,
    }
    assert {key: field(reader, key) for key in expected} == expected
    assert field(reader, "llama.attention.layer_norm_rms_epsilon") == pytest.approx(1e-5)
    tokens = field(reader, "tokenizer.ggml.tokens")
    types = field(reader, "tokenizer.ggml.token_type")
    assert (tokens[0], tokens[1]) == (BOS_TOKEN, EOS_TOKEN)
    assert types[:3] == [TokenType.CONTROL, TokenType.CONTROL, TokenType.NORMAL]
    assert len(tokens) == len(types) == 2048
    # Not written when unset: the vocab has no scores, unk or pad token.
    for key in ("tokenizer.ggml.scores", "tokenizer.ggml.unknown_token_id",
                "tokenizer.ggml.padding_token_id", "tokenizer.ggml.add_space_prefix"):
        assert key not in reader.fields


def test_demo_file_tensors(demo_path: Path) -> None:
    reader = gguf.GGUFReader(demo_path)
    shapes = expected_shapes(DEMO_SHAPE, 2048)
    assert [t.name for t in reader.tensors] == list(shapes)  # llama.cpp names and order
    for tensor in reader.tensors:
        is_norm = len(shapes[tensor.name]) == 1
        want = GGMLQuantizationType.F32 if is_norm else GGMLQuantizationType.Q8_0
        assert tensor.tensor_type == want, tensor.name
        # GGUF lists dimensions innermost first: an [out, in] matrix reads as [in, out].
        assert tuple(int(n) for n in tensor.shape) == shapes[tensor.name][::-1]
        values = gguf.quants.dequantize(tensor.data, tensor.tensor_type)
        assert values.shape == shapes[tensor.name]


@pytest.mark.parametrize("text", [
    "Once upon a time, a little bear found a red kite.",
    "  leading spaces, tabs\tand\nnew lines\n\n",
    "café, naïve, Ærø",
    "日本語のテキスト",
    "emoji: 🦙🚀 and a zero-width joiner: 👩‍💻",
    "",
])
def test_demo_vocab_round_trips(demo_path: Path, text: str) -> None:
    reader = gguf.GGUFReader(demo_path)
    tokens = field(reader, "tokenizer.ggml.tokens")
    merges = [tuple(m.split(" ")) for m in field(reader, "tokenizer.ggml.merges")]
    rebuilt = Tokenizer(models.BPE(vocab={t: i for i, t in enumerate(tokens)}, merges=merges))
    rebuilt.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    rebuilt.decoder = decoders.ByteLevel()
    ids = rebuilt.encode(text).ids
    assert rebuilt.decode(ids) == text
    assert ids == train_demo_tokenizer().encode(text).ids
    assert 0 not in ids and 1 not in ids  # text never turns into BOS/EOS


def test_demo_vocab_merges_common_words(demo_path: Path) -> None:
    tokenizer = train_demo_tokenizer()
    assert len(tokenizer.encode(" the little bear").ids) == 3


@pytest.mark.parametrize("qtype", list(synthetic._FILE_TYPES), ids=lambda q: q.name)
def test_small_synthetic_loads_and_dequantizes(tmp_path: Path, qtype: GGMLQuantizationType) -> None:
    path = write_synthetic_llama(tmp_path / "small.gguf", SMALL, TINY_VOCAB, qtype=qtype, seed=3)
    reader = gguf.GGUFReader(path)
    assert field(reader, "general.file_type") == int(synthetic._FILE_TYPES[qtype])
    assert VocabMetadata.from_gguf(path) == TINY_VOCAB
    shapes = expected_shapes(SMALL, TINY_VOCAB.vocab_size)
    assert {t.name for t in reader.tensors} == set(shapes)
    for tensor in reader.tensors:
        values = gguf.quants.dequantize(tensor.data, tensor.tensor_type)
        assert values.shape == shapes[tensor.name], tensor.name
        if values.ndim == 1:
            assert tensor.tensor_type == GGMLQuantizationType.F32
            assert np.abs(values - 1).max() < 0.5  # norms near 1
        elif tensor.name != "token_embd.weight":
            assert tensor.tensor_type == qtype
            fan_in = values.shape[1]
            assert values.std() * fan_in ** 0.5 == pytest.approx(1, abs=0.15)


def test_layers_get_different_weights(tmp_path: Path) -> None:
    path = write_synthetic_llama(tmp_path / "s.gguf", SMALL, TINY_VOCAB,
                                 qtype=GGMLQuantizationType.F32)
    weights = {t.name: np.array(t.data) for t in gguf.GGUFReader(path).tensors}
    assert not np.array_equal(weights["blk.0.attn_q.weight"], weights["blk.1.attn_q.weight"])
    assert not np.array_equal(weights["blk.0.attn_norm.weight"], weights["blk.0.ffn_norm.weight"])


def test_seed_changes_the_weights(tmp_path: Path) -> None:
    a = write_synthetic_llama(tmp_path / "a.gguf", SMALL, TINY_VOCAB, seed=1)
    b = write_synthetic_llama(tmp_path / "b.gguf", SMALL, TINY_VOCAB, seed=2)
    assert sha256(a) != sha256(b)


def test_failed_write_leaves_nothing(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    def boom(*args: object) -> np.ndarray:
        raise RuntimeError("disk full")

    monkeypatch.setattr(synthetic, "_make_tensor", boom)
    with pytest.raises(RuntimeError, match="disk full"):
        write_synthetic_llama(tmp_path / "x.gguf", SMALL, TINY_VOCAB)
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("kwargs, message", [
    ({"n_heads": 5}, "multiple of n_heads"),
    ({"n_kv_heads": 3}, "multiple of n_kv_heads"),
    ({"ffn_dim": 100}, "ffn_dim 100 must be a multiple of 32"),
    ({"dim": 48, "n_heads": 3, "n_kv_heads": 1}, "dim 48 must be a multiple of 32"),
    ({"n_layers": 0}, "n_layers must be positive"),
])
def test_shape_validation(kwargs: dict[str, int], message: str) -> None:
    fields = {"dim": 64, "n_layers": 2, "n_heads": 4, "n_kv_heads": 2, "ffn_dim": 96,
              "context_length": 128} | kwargs
    with pytest.raises(ValueError, match=message):
        SyntheticShape(**fields)


def test_tinyllama_shape() -> None:
    t = synthetic.TINYLLAMA
    assert (t.dim, t.n_layers, t.n_heads, t.n_kv_heads, t.ffn_dim) == (2048, 22, 32, 4, 5632)
    assert (t.head_dim, t.kv_dim) == (64, 256)


def test_unsupported_qtype_is_rejected(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="Q4_K is not supported"):
        write_synthetic_llama(tmp_path / "k.gguf", SMALL, TINY_VOCAB,
                              qtype=GGMLQuantizationType.Q4_K)


def test_vocab_validation() -> None:
    with pytest.raises(ValueError, match="scores has 1 entries for 2 tokens"):
        VocabMetadata(model="llama", tokens=("a", "b"), scores=(0.0,))
    with pytest.raises(ValueError, match="bos_id=2 is outside"):
        VocabMetadata(model="llama", tokens=("a", "b"), bos_id=2)


@pytest.mark.skipif(not LLAMA_SPM_VOCAB.is_file(),
                    reason=f"shared test data absent: {LLAMA_SPM_VOCAB}")
def test_vocab_copied_from_real_gguf(tmp_path: Path) -> None:
    vocab = VocabMetadata.from_gguf(LLAMA_SPM_VOCAB)
    assert (vocab.model, vocab.vocab_size, vocab.bos_id, vocab.eos_id) == ("llama", 32000, 1, 2)
    path = write_synthetic_llama(tmp_path / "spm.gguf", SMALL, vocab,
                                 qtype=GGMLQuantizationType.Q4_0)
    reader = gguf.GGUFReader(path)
    assert VocabMetadata.from_reader(reader) == vocab
    assert field(reader, "llama.vocab_size") == 32000
    assert reader.get_tensor(0).shape.tolist() == [SMALL.dim, 32000]


def test_vocab_from_gguf_without_vocab(tmp_path: Path) -> None:
    writer = gguf.GGUFWriter(tmp_path / "bare.gguf", arch="llama")
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_ti_data_to_file()
    writer.close()
    with pytest.raises(ValueError, match="carries no vocabulary"):
        VocabMetadata.from_gguf(tmp_path / "bare.gguf")
