"""Load a Llama GGUF file into torch weights, its config and its tokenizer.

Reads with gguf-py's memory-mapped reader. This version supports the tensor
types F32, F16, BF16, Q8_0 and Q4_0; quantized weights are dequantized tensor
by tensor into the compute dtype with `engine.quant`'s per-format units
(keeping them compressed is the quantization issue's work). Any other type, a
missing tensor or a wrong shape fails the load with a `ModelLoadError` naming
the tensor.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np
import torch
from gguf import GGMLQuantizationType, GGUFReader, LlamaFileType

from engine.config import ModelConfig
from engine.errors import ModelLoadError
from engine.linear import DenseLinear, make_linear
from engine.quant import dequantize
from engine.model import LayerWeights, LlamaWeights
from engine.tokenizer import Tokenizer

SUPPORTED_TYPES = (
    GGMLQuantizationType.F32,
    GGMLQuantizationType.F16,
    GGMLQuantizationType.BF16,
    GGMLQuantizationType.Q8_0,
    GGMLQuantizationType.Q4_0,
)


@dataclass(slots=True)
class LoadedModel:
    name: str
    path: Path
    config: ModelConfig
    weights: LlamaWeights
    tokenizer: Tokenizer
    file_type: str
    parameter_count: int


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
    """Looks up tensors by name and converts them, checking type and shape."""

    def __init__(self, reader: GGUFReader, dtype: torch.dtype) -> None:
        self.tensors = {t.name: t for t in reader.tensors}
        self.dtype = dtype

    def has(self, name: str) -> bool:
        return name in self.tensors

    def get(self, name: str, shape: tuple[int, ...]) -> torch.Tensor:
        t = self.tensors.get(name)
        if t is None:
            raise ModelLoadError(f"tensor {name!r} is missing")
        if t.tensor_type not in SUPPORTED_TYPES:
            supported = ", ".join(s.name for s in SUPPORTED_TYPES)
            raise ModelLoadError(
                f"tensor {name!r} has type {t.tensor_type.name}, which this version cannot load "
                f"(supported: {supported})")
        # GGUF lists dimensions innermost first; torch wants them outermost first.
        actual = tuple(int(d) for d in reversed(t.shape))
        if actual != shape:
            raise ModelLoadError(f"tensor {name!r} has shape {list(actual)}, expected {list(shape)}")
        try:
            if t.tensor_type in (GGMLQuantizationType.F32, GGMLQuantizationType.F16):
                return torch.from_numpy(np.asarray(t.data).reshape(shape)).to(self.dtype)
            return dequantize(t.data, t.tensor_type, shape).reshape(shape).to(self.dtype)
        except (ValueError, IndexError, RuntimeError) as exc:
            raise ModelLoadError(f"tensor {name!r}: data is unreadable ({exc}); is the file truncated?") from exc


def _load_weights(src: _TensorSource, cfg: ModelConfig, progress: Callable[[int], None]) -> LlamaWeights:
    hd, dim = cfg.head_dim, cfg.dim
    layers = []
    for i in range(cfg.n_layers):
        p = f"blk.{i}."
        wq = src.get(p + "attn_q.weight", (cfg.n_heads * hd, dim))
        wk = src.get(p + "attn_k.weight", (cfg.n_kv_heads * hd, dim))
        wv = src.get(p + "attn_v.weight", (cfg.n_kv_heads * hd, dim))
        gate = src.get(p + "ffn_gate.weight", (cfg.ffn_dim, dim))
        up = src.get(p + "ffn_up.weight", (cfg.ffn_dim, dim))
        layers.append(LayerWeights(
            attn_norm=src.get(p + "attn_norm.weight", (dim,)).float(),
            wqkv=make_linear(torch.cat([wq, wk, wv])),
            wo=make_linear(src.get(p + "attn_output.weight", (dim, cfg.n_heads * hd))),
            ffn_norm=src.get(p + "ffn_norm.weight", (dim,)).float(),
            w_gate_up=make_linear(torch.cat([gate, up])),
            w_down=make_linear(src.get(p + "ffn_down.weight", (dim, cfg.ffn_dim))),
        ))
        del wq, wk, wv, gate, up
        progress(i + 1)
    embed = src.get("token_embd.weight", (cfg.vocab_size, dim))
    # A missing output matrix means the embedding is tied to it (shared, not packed: no second copy).
    if src.has("output.weight"):
        output = make_linear(src.get("output.weight", (cfg.vocab_size, dim)))
    else:
        output = DenseLinear(embed)
    return LlamaWeights(embed=embed, layers=layers, norm=src.get("output_norm.weight", (dim,)).float(),
                        output=output)


def load_gguf(path: str | Path, dtype: torch.dtype = torch.float32, name: str | None = None,
              progress: Callable[[int, int], None] | None = None) -> LoadedModel:
    """Load a GGUF Llama model. `progress(done_layers, total_layers)` is called as layers load."""
    path = Path(path)
    if not path.is_file():
        raise ModelLoadError(f"{path}: no such model file")
    try:
        # Copy-on-write: torch can wrap the pages without a copy and without warnings.
        reader = GGUFReader(path, "c")
    except (ValueError, IndexError, OSError) as exc:
        raise ModelLoadError(f"{path}: not a readable GGUF file ({exc})") from exc
    try:
        tokenizer = Tokenizer.from_reader(reader)
        meta = read_metadata(reader)
        cfg = ModelConfig.from_metadata(meta, tokenizer.vocab_size)
        if cfg.vocab_size != tokenizer.vocab_size:
            raise ModelLoadError(f"vocab size {cfg.vocab_size} differs from the tokenizer's {tokenizer.vocab_size}")
        src = _TensorSource(reader, dtype)
        weights = _load_weights(src, cfg, lambda done: progress and progress(done, cfg.n_layers))
    except ModelLoadError as exc:
        raise ModelLoadError(f"{path}: {exc}") from exc
    except ValueError as exc:
        raise ModelLoadError(f"{path}: {exc}") from exc
    return LoadedModel(
        name=name or path.stem,
        path=path,
        config=cfg,
        weights=weights,
        tokenizer=tokenizer,
        file_type=_file_type_name(meta, reader),
        parameter_count=int(sum(t.n_elements for t in reader.tensors)),
    )
