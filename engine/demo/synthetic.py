"""Write random-weight Llama GGUF files: the embedded demo model and benchmark stand-ins.

The files are real GGUF v3 `llama` models that llama.cpp and gguf-py load unchanged,
with a tokenizer vocabulary in their metadata. Weights are seeded random normals, so a
file is byte-identical for the same inputs (no timestamps, no unseeded randomness).

This module must never hold a whole model in memory (the TinyLlama shape is 1.1B
parameters) and never leave a half-written file where a loader could find it.
"""

from __future__ import annotations

import os
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from math import prod
from pathlib import Path

import gguf
import numpy as np
from gguf import MODEL_TENSOR, GGMLQuantizationType, LlamaFileType

# One block of Q4_*/Q5_*/Q8_0 covers 32 values of a row, so every row length must divide.
_BLOCK = 32

# Row lengths of the weight matrices must be whole quant blocks; norms stay F32 (as in
# llama.cpp's own quantizer), so only these types are offered for the matrices.
_FILE_TYPES: dict[GGMLQuantizationType, LlamaFileType] = {
    GGMLQuantizationType.F32: LlamaFileType.ALL_F32,
    GGMLQuantizationType.F16: LlamaFileType.MOSTLY_F16,
    GGMLQuantizationType.BF16: LlamaFileType.MOSTLY_BF16,
    GGMLQuantizationType.Q4_0: LlamaFileType.MOSTLY_Q4_0,
    GGMLQuantizationType.Q4_1: LlamaFileType.MOSTLY_Q4_1,
    GGMLQuantizationType.Q5_0: LlamaFileType.MOSTLY_Q5_0,
    GGMLQuantizationType.Q5_1: LlamaFileType.MOSTLY_Q5_1,
    GGMLQuantizationType.Q8_0: LlamaFileType.MOSTLY_Q8_0,
}

# Random values are drawn and quantized this many at a time (~16 MB of float32), which
# bounds the working memory whatever the tensor size. Changing it changes every file.
_CHUNK_ELEMENTS = 1 << 22

# Norm weights are 1 + small noise: near the identity, yet not all equal.
_NORM_NOISE = 0.05


@dataclass(frozen=True)
class SyntheticShape:
    """Hyper-parameters of a Llama model; the vocabulary size comes from its vocab."""

    dim: int
    n_layers: int
    n_heads: int
    n_kv_heads: int
    ffn_dim: int
    context_length: int
    rope_base: float = 10000.0
    rms_eps: float = 1e-5

    def __post_init__(self) -> None:
        for field in ("dim", "n_layers", "n_heads", "n_kv_heads", "ffn_dim", "context_length"):
            value = getattr(self, field)
            if value <= 0:
                raise ValueError(f"SyntheticShape.{field} must be positive, got {value}")
        if self.dim % self.n_heads:
            raise ValueError(f"dim {self.dim} must be a multiple of n_heads {self.n_heads}")
        if self.n_heads % self.n_kv_heads:
            raise ValueError(f"n_heads {self.n_heads} must be a multiple of "
                             f"n_kv_heads {self.n_kv_heads}")
        if self.head_dim % 2:
            raise ValueError(f"head size {self.head_dim} must be even for RoPE; "
                             "change dim or n_heads")
        for field in ("dim", "ffn_dim"):
            if getattr(self, field) % _BLOCK:
                raise ValueError(f"{field} {getattr(self, field)} must be a multiple of {_BLOCK} "
                                 "(the Q8_0/Q4_0 block size)")

    @property
    def head_dim(self) -> int:
        return self.dim // self.n_heads

    @property
    def kv_dim(self) -> int:
        return self.n_kv_heads * self.head_dim


TINYLLAMA = SyntheticShape(dim=2048, n_layers=22, n_heads=32, n_kv_heads=4, ffn_dim=5632,
                           context_length=2048)


@dataclass(frozen=True)
class VocabMetadata:
    """The `tokenizer.ggml.*` fields of a GGUF file; None means "key absent"."""

    model: str
    tokens: tuple[str, ...]
    pre: str | None = None
    scores: tuple[float, ...] | None = None
    token_types: tuple[int, ...] | None = None
    merges: tuple[str, ...] | None = None
    bos_id: int | None = None
    eos_id: int | None = None
    unk_id: int | None = None
    pad_id: int | None = None
    add_bos: bool | None = None
    add_eos: bool | None = None
    add_space_prefix: bool | None = None

    def __post_init__(self) -> None:
        if not self.tokens:
            raise ValueError("VocabMetadata.tokens is empty; a GGUF vocabulary needs tokens")
        for name in ("scores", "token_types"):
            values = getattr(self, name)
            if values is not None and len(values) != len(self.tokens):
                raise ValueError(f"VocabMetadata.{name} has {len(values)} entries for "
                                 f"{len(self.tokens)} tokens")
        for name in ("bos_id", "eos_id", "unk_id", "pad_id"):
            token_id = getattr(self, name)
            if token_id is not None and not 0 <= token_id < len(self.tokens):
                raise ValueError(f"VocabMetadata.{name}={token_id} is outside the "
                                 f"{len(self.tokens)}-token vocabulary")

    @property
    def vocab_size(self) -> int:
        return len(self.tokens)

    @classmethod
    def from_gguf(cls, path: str | os.PathLike[str]) -> VocabMetadata:
        """Copy the tokenizer fields of any GGUF file (model or vocab-only)."""
        return cls.from_reader(gguf.GGUFReader(path))

    @classmethod
    def from_reader(cls, reader: gguf.GGUFReader) -> VocabMetadata:
        """Like from_gguf, for a file already open (parsing 32k tokens takes ~1 s)."""
        fields = reader.fields
        keys = gguf.Keys.Tokenizer

        def get(key: str) -> object:
            field = fields.get(key)
            return None if field is None else field.contents()

        def get_tuple(key: str) -> tuple | None:
            values = get(key)
            return None if values is None else tuple(values)

        model, tokens = get(keys.MODEL), get_tuple(keys.LIST)
        if model is None or tokens is None:
            raise ValueError(f"{reader.data.filename} has no {keys.MODEL} / {keys.LIST}; "
                             "it carries no vocabulary")
        return cls(
            model=model, tokens=tokens, pre=get(keys.PRE), scores=get_tuple(keys.SCORES),
            token_types=get_tuple(keys.TOKEN_TYPE), merges=get_tuple(keys.MERGES),
            bos_id=get(keys.BOS_ID), eos_id=get(keys.EOS_ID), unk_id=get(keys.UNK_ID),
            pad_id=get(keys.PAD_ID), add_bos=get(keys.ADD_BOS), add_eos=get(keys.ADD_EOS),
            add_space_prefix=get(keys.ADD_PREFIX),
        )

    def add_to_writer(self, writer: gguf.GGUFWriter) -> None:
        """Add the fields that are set, under the standard `tokenizer.ggml.*` keys."""
        writer.add_tokenizer_model(self.model)
        if self.pre is not None:
            writer.add_tokenizer_pre(self.pre)
        writer.add_token_list(list(self.tokens))
        # GGUFWriter infers the array element type from Python types, so numpy scalars
        # would be rejected: FLOAT32 scores and INT32 types are what llama.cpp reads.
        if self.scores is not None:
            writer.add_token_scores([float(s) for s in self.scores])
        if self.token_types is not None:
            writer.add_token_types([int(t) for t in self.token_types])
        if self.merges is not None:
            writer.add_token_merges(list(self.merges))
        optional = (
            (writer.add_bos_token_id, self.bos_id), (writer.add_eos_token_id, self.eos_id),
            (writer.add_unk_token_id, self.unk_id), (writer.add_pad_token_id, self.pad_id),
            (writer.add_add_bos_token, self.add_bos), (writer.add_add_eos_token, self.add_eos),
            (writer.add_add_space_prefix, self.add_space_prefix),
        )
        for add, value in optional:
            if value is not None:
                add(value)


@dataclass(frozen=True)
class _TensorSpec:
    """One tensor to write: numpy shape ([out, in] for matrices) and how to fill it."""

    name: str
    shape: tuple[int, ...]
    std: float | None  # None: a norm weight (F32, near 1); else the normal's std


def _tensor_name(kind: MODEL_TENSOR, layer: int | None = None) -> str:
    return gguf.TENSOR_NAMES[kind].format(bid=layer) + ".weight"


def _tensor_specs(shape: SyntheticShape, vocab_size: int) -> list[_TensorSpec]:
    d, f, kv = shape.dim, shape.ffn_dim, shape.kv_dim

    def matrix(kind: MODEL_TENSOR, out: int, fan_in: int, layer: int | None = None) -> _TensorSpec:
        # 1/sqrt(fan_in) keeps every projection's output near unit scale, so each layer
        # adds a comparable amount to the residual stream and none of them is negligible.
        return _TensorSpec(_tensor_name(kind, layer), (out, fan_in), fan_in ** -0.5)

    def norm(kind: MODEL_TENSOR, layer: int | None = None) -> _TensorSpec:
        return _TensorSpec(_tensor_name(kind, layer), (d,), None)

    # The embedding is a lookup, not a projection: unit-scale rows.
    specs = [_TensorSpec(_tensor_name(MODEL_TENSOR.TOKEN_EMBD), (vocab_size, d), 1.0)]
    for i in range(shape.n_layers):
        specs += [
            norm(MODEL_TENSOR.ATTN_NORM, i),
            matrix(MODEL_TENSOR.ATTN_Q, d, d, i),
            matrix(MODEL_TENSOR.ATTN_K, kv, d, i),
            matrix(MODEL_TENSOR.ATTN_V, kv, d, i),
            matrix(MODEL_TENSOR.ATTN_OUT, d, d, i),
            norm(MODEL_TENSOR.FFN_NORM, i),
            matrix(MODEL_TENSOR.FFN_GATE, f, d, i),
            matrix(MODEL_TENSOR.FFN_UP, f, d, i),
            matrix(MODEL_TENSOR.FFN_DOWN, d, f, i),
        ]
    specs += [norm(MODEL_TENSOR.OUTPUT_NORM), matrix(MODEL_TENSOR.OUTPUT, vocab_size, d)]
    return specs


def _stored_layout(spec: _TensorSpec,
                   qtype: GGMLQuantizationType) -> tuple[tuple[int, ...], np.dtype]:
    """Numpy shape and dtype of the array written for `spec` (quantized: raw bytes)."""
    if spec.std is None or qtype == GGMLQuantizationType.F32:
        return spec.shape, np.dtype(np.float32)
    if qtype == GGMLQuantizationType.F16:
        return spec.shape, np.dtype(np.float16)
    return gguf.quant_shape_to_byte_shape(spec.shape, qtype), np.dtype(np.uint8)


def _make_tensor(spec: _TensorSpec, qtype: GGMLQuantizationType, seed: int) -> np.ndarray:
    # Seeding by name makes a tensor's values independent of the tensor order and of
    # the other tensors' shapes (blk.0 is the same in a 4-layer and a 22-layer file).
    rng = np.random.default_rng([seed, *spec.name.encode("utf-8")])
    if spec.std is None:
        return 1.0 + np.float32(_NORM_NOISE) * rng.standard_normal(spec.shape, dtype=np.float32)
    rows, cols = spec.shape
    stored_shape, dtype = _stored_layout(spec, qtype)
    out = np.empty(stored_shape, dtype)
    step = max(1, _CHUNK_ELEMENTS // cols)
    for start in range(0, rows, step):
        block = rng.standard_normal((min(step, rows - start), cols), dtype=np.float32)
        block *= np.float32(spec.std)
        out[start:start + block.shape[0]] = gguf.quants.quantize(block, qtype)
    return out


def add_llama_metadata(writer: gguf.GGUFWriter, shape: SyntheticShape, vocab_size: int,
                       file_type: LlamaFileType, name: str) -> None:
    """The `general.*` and `llama.*` keys of a model of this shape (bench/gpu_models.py uses it too)."""
    writer.add_name(name)
    writer.add_file_type(file_type)
    writer.add_quantization_version(gguf.GGML_QUANT_VERSION)
    writer.add_context_length(shape.context_length)
    writer.add_embedding_length(shape.dim)
    writer.add_block_count(shape.n_layers)
    writer.add_feed_forward_length(shape.ffn_dim)
    writer.add_head_count(shape.n_heads)
    writer.add_head_count_kv(shape.n_kv_heads)
    writer.add_layer_norm_rms_eps(shape.rms_eps)
    writer.add_rope_dimension_count(shape.head_dim)
    writer.add_rope_freq_base(shape.rope_base)
    writer.add_vocab_size(vocab_size)


@contextmanager
def _atomic_target(path: Path) -> Iterator[Path]:
    """Yield a temp path next to `path`; rename it over `path` only on success."""
    fd, tmp_name = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    tmp = Path(tmp_name)
    try:
        yield tmp
        # mkstemp makes the file private (0600); a model file is ordinary data.
        os.chmod(tmp, 0o644)
        with open(tmp, "rb") as written:
            os.fsync(written.fileno())  # the rename must never expose unflushed data
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def write_synthetic_llama(
    path: str | os.PathLike[str],
    shape: SyntheticShape,
    vocab: VocabMetadata,
    qtype: GGMLQuantizationType = GGMLQuantizationType.Q8_0,
    seed: int = 0,
    name: str = "synthetic-llama",
) -> Path:
    """Write a random-weight llama GGUF file atomically and return its path.

    Weight matrices are stored as `qtype`; norm weights are always F32. The same
    arguments always produce the same bytes.
    """
    if qtype not in _FILE_TYPES:
        supported = ", ".join(t.name for t in _FILE_TYPES)
        raise ValueError(f"qtype {qtype.name} is not supported; use one of {supported}")
    path = Path(path)
    specs = _tensor_specs(shape, vocab.vocab_size)
    with _atomic_target(path) as tmp:
        writer = gguf.GGUFWriter(tmp, arch=gguf.MODEL_ARCH_NAMES[gguf.MODEL_ARCH.LLAMA])
        try:
            add_llama_metadata(writer, shape, vocab.vocab_size, _FILE_TYPES[qtype], name)
            vocab.add_to_writer(writer)
            # Declare every tensor first, then stream the data one tensor at a time:
            # GGUFWriter.add_tensor would keep all arrays alive until the final write.
            for spec in specs:
                stored_shape, dtype = _stored_layout(spec, qtype)
                raw_dtype = qtype if dtype == np.uint8 else None
                writer.add_tensor_info(spec.name, stored_shape, dtype,
                                       prod(stored_shape) * dtype.itemsize, raw_dtype=raw_dtype)
            writer.write_header_to_file()
            writer.write_kv_data_to_file()
            writer.write_ti_data_to_file()
            for spec in specs:
                writer.write_tensor_data(_make_tensor(spec, qtype, seed))
        finally:
            writer.close()
    return path
