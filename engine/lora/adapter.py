"""LoRA adapters read from disk: GGUF adapters (llama.cpp's `convert_lora_to_gguf.py`) and PEFT
directories (`adapter_config.json` + `adapter_model.safetensors`).

Either way the result is one `LoraAdapter`: for each (layer, target) an A [r, in] and a B [out, r]
in float32, in GGUF's row order (PEFT's q/k rows are permuted as the model's own weights are by
the HF loader), with the adapter's scale already folded into B, so that the adapted weight is
W + B @ A. Each check names the tensor or field and says what is wrong: a file that does not fit
the base model, or is damaged, is an `AdapterLoadError` and nothing else happens.
This module reads files; it never touches a model's weights or a device.
"""
from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from lumen.engine.errors import LumenError
from lumen.engine.model.config import ModelConfig
from lumen.engine.weights.quant import QUANT_TYPES, dequantize
from lumen.engine.weights.rope_layout import hf_to_gguf_rows

# GGUF tensor name -> PEFT module name, for every projection an adapter may target.
TARGETS = {"attn_q": "q_proj", "attn_k": "k_proj", "attn_v": "v_proj", "attn_output": "o_proj",
           "ffn_gate": "gate_proj", "ffn_up": "up_proj", "ffn_down": "down_proj"}
_PEFT_TO_GGUF = {peft: gguf for gguf, peft in TARGETS.items()}
# A file larger than this is not a LoRA adapter of a model Lumen serves (a base model given by mistake).
MAX_ADAPTER_BYTES = 8 << 30


class AdapterLoadError(LumenError, ValueError):
    """An adapter cannot be loaded for this model (gRPC INVALID_ARGUMENT): the message says why."""


@dataclass(slots=True)
class LoraAdapter:
    path: Path
    format: str                  # "gguf" or "peft"
    rank: int                    # the largest rank of its tensors
    alpha: float
    # (layer, GGUF target name) -> (A [r, in], B [out, r] with the scale folded in), float32
    tensors: dict[tuple[int, str], tuple[torch.Tensor, torch.Tensor]]

    @property
    def targets(self) -> list[str]:
        return [t for t in TARGETS if any(target == t for _, target in self.tensors)]

    @property
    def nbytes(self) -> int:
        return sum(a.nbytes + b.nbytes for a, b in self.tensors.values())


def target_shapes(cfg: ModelConfig) -> dict[str, tuple[int, int]]:
    """(out, in) of each target projection of a layer of this model."""
    q, kv, dim, ffn = cfg.n_heads * cfg.head_dim, cfg.n_kv_heads * cfg.head_dim, cfg.dim, cfg.ffn_dim
    return {"attn_q": (q, dim), "attn_k": (kv, dim), "attn_v": (kv, dim), "attn_output": (dim, q),
            "ffn_gate": (ffn, dim), "ffn_up": (ffn, dim), "ffn_down": (dim, ffn)}


def load_adapter(path: str | Path, cfg: ModelConfig, max_rank: int) -> LoraAdapter:
    """A GGUF adapter file or a PEFT directory, checked against the base model `cfg` and the
    server's largest rank."""
    path = Path(path)
    if path.is_dir():
        adapter = _load_peft(path, cfg)
    elif path.is_file():
        if path.stat().st_size > MAX_ADAPTER_BYTES:
            raise AdapterLoadError(f"{path}: {path.stat().st_size:,} bytes is not a LoRA adapter "
                                   f"(a base model?); give a GGUF adapter or a PEFT directory")
        adapter = _load_gguf(path, cfg)
    else:
        raise AdapterLoadError(f"{path}: no such file or directory (a GGUF adapter file or a PEFT directory "
                               "readable by the server)")
    if adapter.rank > max_rank:
        raise AdapterLoadError(f"{path}: rank {adapter.rank} is larger than this server's largest, {max_rank} "
                               "(start it with a larger --max-lora-rank)")
    return adapter


def _check_pair(path: Path, cfg: ModelConfig, layer: int, target: str, a: torch.Tensor, b: torch.Tensor) -> None:
    where = f"{path}: blk.{layer}.{target}"
    if not 0 <= layer < cfg.n_layers:
        raise AdapterLoadError(f"{where}: layer {layer} does not exist in this {cfg.n_layers}-layer base model")
    out, inp = target_shapes(cfg)[target]
    r = a.shape[0]
    if a.dim() != 2 or b.dim() != 2 or r < 1 or b.shape[1] != r:
        raise AdapterLoadError(f"{where}: A {list(a.shape)} and B {list(b.shape)} are not a LoRA pair "
                               "([r, in] and [out, r])")
    if a.shape[1] != inp or b.shape[0] != out:
        raise AdapterLoadError(f"{where}: A {list(a.shape)} and B {list(b.shape)} do not fit the base model's "
                               f"[{out}, {inp}] weight: the adapter was made for another model")
    if not (torch.isfinite(a).all() and torch.isfinite(b).all()):
        raise AdapterLoadError(f"{where}: holds NaN or infinite values; the file is damaged")


def _finish(path: Path, fmt: str, alpha: float, pairs: dict, cfg: ModelConfig) -> LoraAdapter:
    if not pairs:
        raise AdapterLoadError(f"{path}: holds no LoRA tensor for any of the projections "
                               f"({', '.join(TARGETS)})")
    for (layer, target), (a, b) in pairs.items():
        _check_pair(path, cfg, layer, target, a, b)
    rank = max(a.shape[0] for a, _ in pairs.values())
    return LoraAdapter(path, fmt, rank, alpha, pairs)


# ---- GGUF --------------------------------------------------------------------------------------

_GGUF_NAME = re.compile(r"blk\.(\d+)\.(\w+)\.weight\.lora_([ab])")


def _load_gguf(path: Path, cfg: ModelConfig) -> LoraAdapter:
    from gguf import GGUFReader
    try:
        reader = GGUFReader(path, "r")
        meta = {key: field.contents() for key, field in reader.fields.items() if not key.startswith("tokenizer.")}
    except Exception as exc:   # gguf-py raises ValueError, IndexError, KeyError... on damaged files
        raise AdapterLoadError(f"{path}: not a readable GGUF file ({exc})") from exc
    if meta.get("general.type") != "adapter" or meta.get("adapter.type") != "lora":
        raise AdapterLoadError(f"{path}: is not a GGUF LoRA adapter (general.type = {meta.get('general.type')!r}, "
                               f"adapter.type = {meta.get('adapter.type')!r}; want 'adapter' and 'lora')")
    arch = meta.get("general.architecture")
    if arch != cfg.architecture:
        raise AdapterLoadError(f"{path}: is an adapter for architecture {arch!r}; the base model is "
                               f"{cfg.architecture!r}")
    alpha = float(meta.get("adapter.lora.alpha", 0.0))
    halves: dict[tuple[int, str], dict[str, torch.Tensor]] = {}
    for t in reader.tensors:
        m = _GGUF_NAME.fullmatch(t.name)
        if m is None or m.group(2) not in TARGETS:
            raise AdapterLoadError(f"{path}: tensor {t.name!r} is not a LoRA tensor of a projection Lumen "
                                   f"adapts ({', '.join(TARGETS)}; token embeddings and norms are not supported)")
        halves.setdefault((int(m.group(1)), m.group(2)), {})[m.group(3)] = _gguf_tensor(path, t)
    pairs = {}
    for key, half in halves.items():
        if set(half) != {"a", "b"}:
            raise AdapterLoadError(f"{path}: blk.{key[0]}.{key[1]} has lora_{''.join(half)} without its other half")
        a, b = half["a"], half["b"]
        # llama.cpp: scale = alpha / rank (rank = the rows of A), or 1 when alpha is 0.
        scale = alpha / a.shape[0] if alpha else 1.0
        pairs[key] = (a, b * scale)
    return _finish(path, "gguf", alpha, pairs, cfg)


def _gguf_tensor(path: Path, t) -> torch.Tensor:
    """One tensor decoded to float32, torch shape (outermost first)."""
    shape = tuple(int(d) for d in reversed(t.shape))
    if len(shape) != 2:
        raise AdapterLoadError(f"{path}: tensor {t.name!r} has shape {list(shape)}; LoRA tensors are matrices")
    if t.tensor_type not in QUANT_TYPES:
        raise AdapterLoadError(f"{path}: tensor {t.name!r} has type {t.tensor_type.name}, which cannot be read")
    unit = QUANT_TYPES[t.tensor_type]
    if shape[1] % unit.block_size:
        raise AdapterLoadError(f"{path}: tensor {t.name!r}: rows of {shape[1]} values do not fill "
                               f"{t.tensor_type.name} blocks of {unit.block_size}")
    raw = torch.from_numpy(np.array(t.data).reshape(-1).view(np.uint8))
    row_bytes = shape[1] // unit.block_size * unit.type_size
    if raw.numel() != shape[0] * row_bytes:
        raise AdapterLoadError(f"{path}: tensor {t.name!r} has {raw.numel()} bytes, {t.tensor_type.name} "
                               f"{list(shape)} needs {shape[0] * row_bytes}")
    return dequantize(raw.reshape(shape[0], row_bytes), int(t.tensor_type), shape).float()


# ---- PEFT --------------------------------------------------------------------------------------

_PEFT_NAME = re.compile(r"(?:.*\.)?layers\.(\d+)\.(?:self_attn|mlp)\.(\w+)\.lora_([AB])(?:\.\w+)?\.weight")


def _peft_config(path: Path) -> dict:
    file = path / "adapter_config.json"
    try:
        config = json.loads(file.read_text())
    except FileNotFoundError:
        raise AdapterLoadError(f"{path}: has no adapter_config.json; a PEFT adapter directory holds it and "
                               "adapter_model.safetensors") from None
    except (OSError, ValueError) as exc:
        raise AdapterLoadError(f"{file}: unreadable ({exc})") from exc
    if not isinstance(config, dict) or str(config.get("peft_type", "")).upper() != "LORA":
        raise AdapterLoadError(f"{file}: peft_type is {config.get('peft_type') if isinstance(config, dict) else None!r}, "
                               "not LORA")
    unsupported = [(key, value) for key, value in (("use_dora", True), ("bias", "all"), ("bias", "lora_only"))
                   if config.get(key) == value]
    if config.get("modules_to_save"):
        unsupported.append(("modules_to_save", config["modules_to_save"]))
    if unsupported:
        raise AdapterLoadError(f"{file}: {', '.join(f'{k} = {v!r}' for k, v in unsupported)} is not supported: "
                               "Lumen serves plain LoRA (low-rank A and B, no bias, no extra trained modules)")
    for key in ("r", "lora_alpha"):
        if not isinstance(config.get(key), (int, float)) or config[key] <= 0:
            raise AdapterLoadError(f"{file}: {key} is {config.get(key)!r}; it must be a positive number")
    return config


def _peft_pattern(patterns: dict, module: str, default: float) -> float:
    """PEFT's rank_pattern / alpha_pattern: the value of the first key the module name ends with."""
    for key, value in (patterns or {}).items():
        if re.match(rf"(.*\.)?{key}$", module):
            return float(value)
    return float(default)


def _load_peft(path: Path, cfg: ModelConfig) -> LoraAdapter:
    from safetensors import SafetensorError
    from safetensors.torch import load_file
    config = _peft_config(path)
    file = path / "adapter_model.safetensors"
    if not file.is_file():
        raise AdapterLoadError(f"{path}: has no adapter_model.safetensors (a .bin adapter is a pickle, which "
                               "Lumen never loads: save it with safe_serialization=True)")
    try:
        state = load_file(file)
    except (SafetensorError, OSError, ValueError) as exc:
        raise AdapterLoadError(f"{file}: not a readable safetensors file ({exc})") from exc
    halves: dict[tuple[int, str], dict[str, torch.Tensor]] = {}
    modules: dict[tuple[int, str], str] = {}
    for name, tensor in state.items():
        m = _PEFT_NAME.fullmatch(name)
        if m is None or m.group(2) not in _PEFT_TO_GGUF:
            raise AdapterLoadError(f"{file}: tensor {name!r} is not a LoRA tensor of a projection Lumen adapts "
                                   f"({', '.join(_PEFT_TO_GGUF)})")
        key = (int(m.group(1)), _PEFT_TO_GGUF[m.group(2)])
        halves.setdefault(key, {})[m.group(3)] = tensor.float()
        modules[key] = name.split(".lora_")[0]
    pairs = {}
    for key, half in halves.items():
        if set(half) != {"A", "B"}:
            raise AdapterLoadError(f"{file}: {modules[key]} has lora_{''.join(half)} without its other half")
        a, b = half["A"], half["B"]
        r = _peft_pattern(config.get("rank_pattern"), modules[key], config["r"])
        alpha = _peft_pattern(config.get("alpha_pattern"), modules[key], config["lora_alpha"])
        scale = alpha / math.sqrt(r) if config.get("use_rslora") else alpha / r
        if key[1] in ("attn_q", "attn_k") and b.shape[0] == target_shapes(cfg)[key[1]][0]:
            # HF's RoPE layout -> GGUF's, as the model's own q/k rows are.
            b = hf_to_gguf_rows(b, cfg.n_heads if key[1] == "attn_q" else cfg.n_kv_heads)
        pairs[key] = (a, b * scale)
    return _finish(path, "peft", float(config["lora_alpha"]), pairs, cfg)
