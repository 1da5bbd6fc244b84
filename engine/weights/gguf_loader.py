"""Load a Llama GGUF file into torch weights, its config and its tokenizer.

Reads the header with gguf-py's memory-mapped reader. Weight matrices of every type
`lumen.engine.weights.quant` registers stay as the file's blocks, read once into huge-page anonymous memory
(`lumen.engine.weights.resident`: same bytes as the file, streamed faster than page-cache pages; resident
memory follows the file size); `lumen.engine.model.linear` multiplies by them. Float32 matrices become
dense (prepacked) linears as before, and small vectors (norms) are decoded to float32. A
tensor of an unregistered type, a missing tensor, a wrong shape or too few bytes fails the
load with a `ModelLoadError` naming the tensor.
"""
from __future__ import annotations

import math
import os
import warnings
from pathlib import Path
from typing import Callable

import numpy as np
import torch
from gguf import GGML_QUANT_SIZES, GGMLQuantizationType, GGUFReader, GGUFValueType, LlamaFileType

from lumen.engine.chat.template import template_from_gguf
from lumen.engine.errors import ModelLoadError
from lumen.engine.model.config import ModelConfig
from lumen.engine.model.linear import (
    ConcatLinear,
    DenseEmbedding,
    GGUFWeight,
    QuantEmbedding,
    make_linear,
    make_quant_linear,
)
from lumen.engine.model.llama import LayerWeights, LlamaWeights
from lumen.engine.tokenizer.tokenizer import Tokenizer
from lumen.engine.weights.loaded_model import LoadedModel
from lumen.engine.weights.quant import QUANT_TYPES, dequantize
from lumen.engine.weights.resident import ResidentArena

SUPPORTED_TYPES = tuple(QUANT_TYPES)
F32 = GGMLQuantizationType.F32


class TruncatedFile(ValueError):
    """The file ends before its last tensor's data does."""

    def __init__(self, needed: int, actual: int) -> None:
        super().__init__(f"the file is truncated: its tensors need {needed:,} bytes, the file has {actual:,} "
                         f"({needed - actual:,} missing); download or copy it again")


class _CheckedReader(GGUFReader):
    """gguf-py's reader, which first checks that every tensor's data lies inside the file: a cut
    file otherwise fails later with a numpy reshape error that names nothing. It also checks each
    metadata array's length against the bytes left: past the end gguf-py reads empty scalars, which
    advance nothing, so a damaged length (up to 2**64) would loop for hours instead of failing."""

    def _get_field_parts(self, orig_offs: int, raw_type: int):
        if raw_type == GGUFValueType.ARRAY:
            item_type, length = (int(self._get(orig_offs, np.uint32)[0]), int(self._get(orig_offs + 4, np.uint64)[0]))
            left = len(self.data) - (orig_offs + 12)
            # An element is at least its scalar's size, a string's 8-byte length or an array's 12-byte header.
            scalar = self.gguf_scalar_to_np.get(item_type)   # IntEnum keys: a plain int finds them
            least = np.dtype(scalar).itemsize if scalar is not None else 8 if item_type == GGUFValueType.STRING else 12
            if length * least > left:
                raise ValueError(f"a metadata array at byte {orig_offs:,} claims {length:,} elements, more than "
                                 f"the {left:,} bytes left in the file can hold")
        return super()._get_field_parts(orig_offs, raw_type)

    def _build_tensors(self, start_offs: int, fields: list) -> None:
        needed = start_offs
        try:
            for field in fields:
                _, _, _, dims, raw_type, offset = field.parts   # gguf-py's layout of a tensor-info field
                block_size, type_size = GGML_QUANT_SIZES[GGMLQuantizationType(int(raw_type[0]))]
                n_elements = int(np.prod(dims.astype(object)))   # Python ints: damaged dims cannot wrap
                needed = max(needed, start_offs + int(offset[0]) + n_elements * type_size // block_size)
        except (KeyError, ValueError):
            needed = 0  # a damaged tensor info: gguf-py's own checks below name the problem
        if needed > len(self.data):
            raise TruncatedFile(needed, len(self.data))
        super()._build_tensors(start_offs, fields)


def read_metadata(reader: GGUFReader) -> dict:
    """Scalar and string metadata (large arrays such as the vocabulary are skipped)."""
    meta = {}
    for key, field in reader.fields.items():
        if key.startswith("tokenizer.ggml.") and key not in ("tokenizer.ggml.model", "tokenizer.ggml.pre"):
            continue
        meta[key] = field.contents()
    return meta


def _file_type_name(meta: dict, reader: GGUFReader) -> str:
    if "general.file_type" in meta:
        try:
            return LlamaFileType(int(meta["general.file_type"])).name.removeprefix("MOSTLY_").removeprefix("ALL_")
        except ValueError:
            return f"UNKNOWN_{meta['general.file_type']}"
    types = [t.tensor_type.name for t in reader.tensors if len(t.shape) == 2]
    return max(set(types), key=types.count) if types else "UNKNOWN"


class _TensorSource:
    """Looks up tensors by name, checking type, shape and size, and wraps their bytes."""

    def __init__(self, reader: GGUFReader, dtype: torch.dtype, fd: int) -> None:
        self.tensors = {t.name: t for t in reader.tensors}
        self.dtype = dtype
        self.fd = fd
        self.arena = ResidentArena()

    def has(self, name: str) -> bool:
        return name in self.tensors

    def _checked(self, name: str, shape: tuple[int, ...]):
        """(tensor, rows, row_bytes) once its type, shape and size are checked."""
        t = self.tensors.get(name)
        if t is None:
            raise ModelLoadError(f"tensor {name!r} is missing")
        if t.tensor_type not in QUANT_TYPES:
            supported = ", ".join(s.name for s in SUPPORTED_TYPES)
            raise ModelLoadError(f"tensor {name!r} has type {t.tensor_type.name}, which this version cannot load "
                                 f"(supported: {supported})")
        # GGUF lists dimensions innermost first; torch wants them outermost first.
        actual = tuple(int(d) for d in reversed(t.shape))
        if actual != shape:
            raise ModelLoadError(f"tensor {name!r} has shape {list(actual)}, expected {list(shape)}")
        unit = QUANT_TYPES[t.tensor_type]
        cols, rows = shape[-1], math.prod(shape[:-1])
        if cols % unit.block_size:
            raise ModelLoadError(f"tensor {name!r}: row length {cols} is not a multiple of "
                                 f"{t.tensor_type.name}'s block size {unit.block_size}")
        row_bytes = cols // unit.block_size * unit.type_size
        nbytes = np.asarray(t.data).nbytes     # the mapping's view: no page is touched
        if nbytes != rows * row_bytes:
            raise ModelLoadError(f"tensor {name!r} has {nbytes} bytes, {t.tensor_type.name} {list(shape)} "
                                 f"needs {rows * row_bytes}; is the file truncated?")
        return t, rows, row_bytes

    def qtype(self, name: str, shape: tuple[int, ...]) -> int:
        return int(self._checked(name, shape)[0].tensor_type)

    def weight(self, name: str, shape: tuple[int, ...]) -> GGUFWeight:
        """The tensor's blocks, checked, read into the resident huge-page arena (lumen.engine.weights.resident)."""
        t, rows, row_bytes = self._checked(name, shape)
        try:
            raw = self.arena.read(self.fd, t.data_offset, rows * row_bytes)
        except OSError as exc:
            raise ModelLoadError(f"tensor {name!r} could not be read ({exc}); is the file truncated?") from exc
        return GGUFWeight(raw.reshape(rows, row_bytes), int(t.tensor_type), rows, shape[-1])

    def dense(self, name: str, shape: tuple[int, ...], dtype: torch.dtype | None = None) -> torch.Tensor:
        """The tensor decoded to `dtype` (the compute dtype by default), from the file mapping."""
        t, rows, row_bytes = self._checked(name, shape)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", UserWarning)   # read-only mapping: we never write to it
            raw = torch.from_numpy(np.asarray(t.data).reshape(-1).view(np.uint8)).reshape(rows, row_bytes)
        try:
            values = dequantize(raw, int(t.tensor_type), (rows, shape[-1]))
        except ValueError as exc:
            raise ModelLoadError(f"tensor {name!r}: data is unreadable ({exc})") from exc
        return values.reshape(shape).to(dtype or self.dtype)

    def linear(self, *names_and_rows: tuple[str, int], cols: int):
        """One linear over the named matrices' rows stacked in order (q/k/v, gate/up)."""
        shapes = [(name, (rows, cols)) for name, rows in names_and_rows]
        if all(self.qtype(name, shape) == F32 for name, shape in shapes):
            dense = [self.dense(name, shape) for name, shape in shapes]
            return make_linear(dense[0] if len(dense) == 1 else torch.cat(dense))
        parts = [make_linear(self.dense(name, shape)) if self.qtype(name, shape) == F32
                 else make_quant_linear(self.weight(name, shape)) for name, shape in shapes]
        return parts[0] if len(parts) == 1 else ConcatLinear(parts)


def _load_weights(src: _TensorSource, cfg: ModelConfig, progress: Callable[[int], None]) -> LlamaWeights:
    hd, dim = cfg.head_dim, cfg.dim
    layers = []
    for i in range(cfg.n_layers):
        p = f"blk.{i}."
        layers.append(LayerWeights(
            attn_norm=src.dense(p + "attn_norm.weight", (dim,), torch.float32),
            wqkv=src.linear((p + "attn_q.weight", cfg.n_heads * hd), (p + "attn_k.weight", cfg.n_kv_heads * hd),
                            (p + "attn_v.weight", cfg.n_kv_heads * hd), cols=dim),
            wo=src.linear((p + "attn_output.weight", dim), cols=cfg.n_heads * hd),
            ffn_norm=src.dense(p + "ffn_norm.weight", (dim,), torch.float32),
            w_gate_up=src.linear((p + "ffn_gate.weight", cfg.ffn_dim), (p + "ffn_up.weight", cfg.ffn_dim), cols=dim),
            w_down=src.linear((p + "ffn_down.weight", dim), cols=cfg.ffn_dim),
        ))
        progress(i + 1)
    embed_shape = (cfg.vocab_size, dim)
    if src.qtype("token_embd.weight", embed_shape) == F32:
        dense_embed = src.dense("token_embd.weight", embed_shape)
        embed, tied = DenseEmbedding(dense_embed), make_linear(dense_embed, pack=False)
    else:
        embed_weight = src.weight("token_embd.weight", embed_shape)
        embed, tied = QuantEmbedding(embed_weight, src.dtype), make_quant_linear(embed_weight)
    # A missing output matrix means the embedding is tied to it (shared, not packed: no second copy).
    output = src.linear(("output.weight", cfg.vocab_size), cols=dim) if src.has("output.weight") else tied
    return LlamaWeights(embed=embed, layers=layers, norm=src.dense("output_norm.weight", (dim,), torch.float32),
                        output=output, dtype=src.dtype)


def load_gguf(path: str | Path, dtype: torch.dtype = torch.float32, name: str | None = None,
              progress: Callable[[int, int], None] | None = None) -> LoadedModel:
    """Load a GGUF Llama model. `progress(done_layers, total_layers)` is called as layers load."""
    path = Path(path)
    if not path.is_file():
        raise ModelLoadError(f"{path}: no such model file")
    try:
        # Copy-on-write: torch can wrap the pages without a copy and without warnings.
        reader = _CheckedReader(path, "c")
        fd = os.open(path, os.O_RDONLY)
    except TruncatedFile as exc:
        raise ModelLoadError(f"{path}: {exc}") from exc
    except (ValueError, IndexError, OSError) as exc:
        raise ModelLoadError(f"{path}: not a readable GGUF file ({exc}; the file has {path.stat().st_size:,} "
                             "bytes: is it cut short or damaged?)") from exc
    try:
        tokenizer = Tokenizer.from_reader(reader)
        meta = read_metadata(reader)
        cfg = ModelConfig.from_metadata(meta, tokenizer.vocab_size)
        if cfg.vocab_size != tokenizer.vocab_size:
            raise ModelLoadError(f"vocab size {cfg.vocab_size} differs from the tokenizer's {tokenizer.vocab_size}")
        src = _TensorSource(reader, dtype, fd)
        weights = _load_weights(src, cfg, lambda done: progress and progress(done, cfg.n_layers))
    except ModelLoadError as exc:
        raise ModelLoadError(f"{path}: {exc}") from exc
    except ValueError as exc:
        raise ModelLoadError(f"{path}: {exc}") from exc
    finally:
        os.close(fd)
    return LoadedModel(
        name=name or path.stem,
        path=path,
        config=cfg,
        weights=weights,
        tokenizer=tokenizer,
        file_type=_file_type_name(meta, reader),
        parameter_count=int(sum(t.n_elements for t in reader.tensors)),
        chat_template=template_from_gguf(reader),
    )
