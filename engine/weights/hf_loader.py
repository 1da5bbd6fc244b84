"""Load a Hugging Face Llama checkpoint directory: config.json, tokenizer.json and *.safetensors.

Tensors are read lazily, one at a time, from the safetensors shards (F32, F16 or BF16; the index
file decides which shard holds what when there is one), checked against the config's shapes,
converted to the compute dtype and assembled as `lumen.engine.weights.gguf_loader` assembles a GGUF file's float
weights, so that `lumen.engine.model.llama` runs both alike. The one real difference between the layouts is
RoPE: HF rotates the two halves of each head's q/k rows, GGUF adjacent pairs, so q_proj and k_proj
rows are permuted (llama.cpp's `LlamaModel.permute`). Every problem raises a ModelLoadError naming
the file and what is wrong; nothing is guessed or initialised at random.
"""
from __future__ import annotations

import logging
import math
from collections import Counter
from contextlib import ExitStack
from pathlib import Path
from typing import Any, Callable

import torch
from safetensors import SafetensorError, safe_open

from lumen.engine.chat.template import template_from_hf_dir
from lumen.engine.errors import ModelLoadError
from lumen.engine.hf_json import read_json
from lumen.engine.model.config import ModelConfig
from lumen.engine.model.linear import stored_embedding, stored_linear
from lumen.engine.model.llama import LayerWeights, LlamaWeights
from lumen.engine.tokenizer.tokenizer import Tokenizer
from lumen.engine.weights.loaded_model import LoadedModel
from lumen.engine.weights.rope_layout import hf_to_gguf_rows

log = logging.getLogger(__name__)

SUPPORTED_DTYPES = ("F32", "F16", "BF16")
INDEX_FILE = "model.safetensors.index.json"


def model_config_from_hf(hf: dict) -> ModelConfig:
    """ModelConfig of a config.json (as a dict); refuses what lumen.engine.model.llama does not compute."""
    if hf.get("model_type") != "llama":
        raise ModelLoadError(f"model_type {hf.get('model_type')!r} is not supported (only 'llama')")
    if (hf.get("architectures") or ["LlamaForCausalLM"]) != ["LlamaForCausalLM"]:
        raise ModelLoadError(f"architectures {hf['architectures']!r} is not supported (only ['LlamaForCausalLM'])")
    if hf.get("quantization_config"):
        method = hf["quantization_config"].get("quant_method") if isinstance(hf["quantization_config"], dict) else "?"
        raise ModelLoadError(f"quantization_config (quant_method {method!r}) is set; only unquantized "
                             "F32/F16/BF16 checkpoints load")
    for key, want in (("hidden_act", "silu"), ("attention_bias", False), ("mlp_bias", False)):
        if hf.get(key, want) != want:
            raise ModelLoadError(f"{key} = {hf[key]!r} is not supported (only {want!r})")
    _check_rope_scaling(hf)

    def need(key: str, default: int | None = None) -> int:
        value = default if hf.get(key) is None else hf[key]
        if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
            raise ModelLoadError(f"{key!r} is {'missing' if value is None else repr(value)}; "
                                 "it must be a positive integer")
        return value

    dim, n_heads = need("hidden_size"), need("num_attention_heads")
    if hf.get("head_dim") not in (None, dim // n_heads):
        raise ModelLoadError(f"head_dim {hf['head_dim']!r} differs from hidden_size / num_attention_heads "
                             f"= {dim // n_heads}, which this engine assumes")
    rope = hf.get("rope_parameters") or {}
    return ModelConfig(
        architecture="llama", dim=dim, n_layers=need("num_hidden_layers"), n_heads=n_heads,
        n_kv_heads=need("num_key_value_heads", n_heads), ffn_dim=need("intermediate_size"),
        vocab_size=need("vocab_size"), context_length=need("max_position_embeddings"),
        rms_eps=_number(hf, "rms_norm_eps", 1e-6),
        rope_base=_number(rope, "rope_theta", None) if "rope_theta" in rope else _number(hf, "rope_theta", 10000.0),
        rope_dim=dim // n_heads,
    )


def _check_rope_scaling(hf: dict) -> None:
    # transformers 4.x writes `rope_scaling`, 5.x `rope_parameters` (with rope_theta inside).
    for key in ("rope_scaling", "rope_parameters"):
        scaling = hf.get(key)
        if scaling is None:
            continue
        kind = scaling.get("rope_type", scaling.get("type", "default")) if isinstance(scaling, dict) else scaling
        if kind != "default":
            raise ModelLoadError(f"{key} type {kind!r} is not supported (only unscaled RoPE, 'default')")


def _number(d: dict, key: str, default: float | None) -> float:
    value = d.get(key, default)
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value <= 0:
        raise ModelLoadError(f"{key!r} is {value!r}; it must be a positive number")
    return float(value)


class SafetensorsShards:
    """Which shard holds each tensor, with every shard open (headers read, data mapped lazily)."""

    def __init__(self, directory: Path, stack: ExitStack) -> None:
        self.directory = directory
        self.where: dict[str, Path] = {}   # tensor name -> shard
        self._open: dict[Path, Any] = {}  # shard -> safe_open handle
        index = directory / INDEX_FILE
        if index.exists():
            self._from_index(index, stack)
        else:
            self._from_files(sorted(directory.glob("*.safetensors")), stack)

    def _from_index(self, index: Path, stack: ExitStack) -> None:
        weight_map = read_json(index, "the sharded checkpoint").get("weight_map")
        if not isinstance(weight_map, dict) or not all(isinstance(v, str) for v in weight_map.values()):
            raise ModelLoadError(f"{index}: 'weight_map' must map tensor names to shard file names")
        for shard in sorted(set(weight_map.values())):
            self._open_shard(self.directory / shard, stack, f"listed in {index.name}")
        self.where = {name: self.directory / shard for name, shard in weight_map.items()}

    def _from_files(self, files: list[Path], stack: ExitStack) -> None:
        if not files:
            raise ModelLoadError(f"{self.directory}: no *.safetensors files (only safetensors checkpoints load)")
        for path in files:
            for name in self._open_shard(path, stack, "").keys():
                if name in self.where:
                    raise ModelLoadError(f"{self.directory}: tensor {name!r} is in both {self.where[name].name} "
                                         f"and {path.name}; add a {INDEX_FILE} saying which to use")
                self.where[name] = path

    def _open_shard(self, path: Path, stack: ExitStack, why: str):
        if not path.is_file():
            raise ModelLoadError(f"{path}: shard {why} is missing")
        try:
            self._open[path] = handle = stack.enter_context(safe_open(path, framework="pt"))
        except (SafetensorError, OSError) as exc:
            raise ModelLoadError(f"{path}: not a readable safetensors file ({exc}); is it truncated?") from exc
        return handle

    def _slice(self, name: str):
        path = self.where.get(name)
        if path is None:
            raise ModelLoadError(f"{self.directory}: tensor {name!r} is missing")
        try:
            return path, self._open[path].get_slice(name)
        except SafetensorError as exc:
            raise ModelLoadError(f"{path}: tensor {name!r} is not in the file ({exc})") from exc

    def has(self, name: str) -> bool:
        return name in self.where

    def read(self, name: str, shape: tuple[int, ...]) -> torch.Tensor:
        """The tensor as stored, after checking its dtype and shape."""
        path, info = self._slice(name)
        if info.get_dtype() not in SUPPORTED_DTYPES:
            raise ModelLoadError(f"{path}: tensor {name!r} has dtype {info.get_dtype()}, which this version "
                                 f"cannot load (supported: {', '.join(SUPPORTED_DTYPES)})")
        if tuple(info.get_shape()) != shape:
            raise ModelLoadError(f"{path}: tensor {name!r} has shape {list(info.get_shape())}, "
                                 f"expected {list(shape)}")
        try:
            return self._open[path].get_tensor(name)
        except (SafetensorError, RuntimeError, OSError) as exc:
            raise ModelLoadError(f"{path}: tensor {name!r} is unreadable ({exc})") from exc

    def summary(self) -> tuple[int, str]:
        """Parameter count of every tensor, and the commonest dtype of the matrices (the file type)."""
        params, kinds = 0, Counter()
        for name in self.where:
            _, info = self._slice(name)
            params += math.prod(info.get_shape())
            if len(info.get_shape()) == 2:
                kinds[info.get_dtype()] += 1
        return params, kinds.most_common(1)[0][0] if kinds else "UNKNOWN"


def _load_layer(shards: SafetensorsShards, cfg: ModelConfig, i: int, dtype: torch.dtype) -> LayerWeights:
    hd, dim, p = cfg.head_dim, cfg.dim, f"model.layers.{i}."
    wq = hf_to_gguf_rows(shards.read(p + "self_attn.q_proj.weight", (cfg.n_heads * hd, dim)), cfg.n_heads)
    wk = hf_to_gguf_rows(shards.read(p + "self_attn.k_proj.weight", (cfg.n_kv_heads * hd, dim)), cfg.n_kv_heads)
    wv = shards.read(p + "self_attn.v_proj.weight", (cfg.n_kv_heads * hd, dim))
    gate = shards.read(p + "mlp.gate_proj.weight", (cfg.ffn_dim, dim))
    up = shards.read(p + "mlp.up_proj.weight", (cfg.ffn_dim, dim))
    return LayerWeights(
        attn_norm=shards.read(p + "input_layernorm.weight", (dim,)).float(),
        wqkv=stored_linear([wq, wk, wv], dtype),
        wo=stored_linear([shards.read(p + "self_attn.o_proj.weight", (dim, cfg.n_heads * hd))], dtype),
        ffn_norm=shards.read(p + "post_attention_layernorm.weight", (dim,)).float(),
        w_gate_up=stored_linear([gate, up], dtype),
        w_down=stored_linear([shards.read(p + "mlp.down_proj.weight", (dim, cfg.ffn_dim))], dtype),
    )


def _load_weights(shards: SafetensorsShards, cfg: ModelConfig, dtype: torch.dtype, tied: bool,
                  progress: Callable[[int], None]) -> LlamaWeights:
    """The weights as gguf_loader builds a GGUF file's, converted to `dtype` one tensor at a time."""
    layers = []
    for i in range(cfg.n_layers):
        layers.append(_load_layer(shards, cfg, i, dtype))
        progress(i + 1)
    embed, tied_output = stored_embedding(shards.read("model.embed_tokens.weight", (cfg.vocab_size, cfg.dim)), dtype)
    has_head = shards.has("lm_head.weight")
    if not tied and not has_head:
        log.warning("%s: no lm_head.weight although tie_word_embeddings is false; using the embedding "
                    "as the output matrix, as tied models do", shards.directory)
    if has_head and not tied:
        output = stored_linear([shards.read("lm_head.weight", (cfg.vocab_size, cfg.dim))], dtype)
    else:  # tied (a tied checkpoint's lm_head, if saved, is a copy): shared, not packed, no second copy
        output = tied_output
    return LlamaWeights(embed=embed, layers=layers,
                        norm=shards.read("model.norm.weight", (cfg.dim,)).float(), output=output, dtype=dtype)


def load_hf_dir(path: str | Path, dtype: torch.dtype = torch.float32, name: str | None = None,
                progress: Callable[[int, int], None] | None = None) -> LoadedModel:
    """Load a Hugging Face Llama directory. `progress(done_layers, total_layers)` is called as layers load."""
    path = Path(path)
    if not path.is_dir():
        raise ModelLoadError(f"{path}: not a directory (a Hugging Face checkpoint is a directory)")
    config_path = path / "config.json"
    hf = read_json(config_path, "a Hugging Face checkpoint")
    try:
        cfg = model_config_from_hf(hf)
    except ModelLoadError as exc:
        raise ModelLoadError(f"{config_path}: {exc}") from exc
    except (TypeError, AttributeError) as exc:  # a field of the wrong JSON type
        raise ModelLoadError(f"{config_path}: malformed ({exc})") from exc
    tokenizer = Tokenizer.from_hf_dir(path, cfg.vocab_size, hf)
    with ExitStack() as stack:
        shards = SafetensorsShards(path, stack)
        weights = _load_weights(shards, cfg, dtype, bool(hf.get("tie_word_embeddings", False)),
                                lambda done: progress and progress(done, cfg.n_layers))
        parameter_count, file_type = shards.summary()
    return LoadedModel(name=name or path.name, path=path, config=cfg, weights=weights, tokenizer=tokenizer,
                       file_type=file_type, parameter_count=parameter_count,
                       chat_template=template_from_hf_dir(path))
