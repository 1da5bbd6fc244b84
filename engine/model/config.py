"""Model hyper-parameters read from GGUF metadata, validated once at load."""
from __future__ import annotations

from dataclasses import dataclass

from lumen.engine.errors import ModelLoadError

MAX_CONTEXT = 1 << 24


@dataclass(slots=True, frozen=True)
class ModelConfig:
    architecture: str
    dim: int
    n_layers: int
    n_heads: int
    n_kv_heads: int
    ffn_dim: int
    vocab_size: int
    context_length: int
    rms_eps: float
    rope_base: float
    rope_dim: int

    def __post_init__(self) -> None:
        for name in ("dim", "n_layers", "n_heads", "n_kv_heads", "ffn_dim", "vocab_size", "context_length", "rope_dim"):
            if getattr(self, name) <= 0:
                raise ModelLoadError(f"{name.replace('_', ' ')} is {getattr(self, name)}: it must be positive")
        # The RoPE tables are built for the whole context at load (2 x context x rope_dim / 2
        # floats), so a corrupted context length would take all memory: larger than any model's
        # (16M positions; the largest today is 10M) is refused.
        if self.context_length > MAX_CONTEXT:
            raise ModelLoadError(f"context length {self.context_length} is larger than {MAX_CONTEXT}: "
                                 "the file's metadata is corrupt or the model is not supported")
        if self.dim % self.n_heads:
            raise ModelLoadError(f"embedding length {self.dim} is not a multiple of head count {self.n_heads}")
        if self.n_heads % self.n_kv_heads:
            raise ModelLoadError(f"head count {self.n_heads} is not a multiple of KV head count {self.n_kv_heads}")
        if self.rope_dim > self.head_dim or self.rope_dim % 2:
            raise ModelLoadError(f"rope dimension {self.rope_dim} must be even and at most head size {self.head_dim}")

    @property
    def head_dim(self) -> int:
        return self.dim // self.n_heads

    @classmethod
    def from_metadata(cls, meta: dict, vocab_size: int) -> "ModelConfig":
        """Build from GGUF key/values; `meta` maps key -> python value."""
        arch = meta.get("general.architecture")
        if arch != "llama":
            raise ModelLoadError(f"architecture {arch!r} is not supported (only 'llama')")

        def need(key: str):
            full = f"{arch}.{key}"
            if full not in meta:
                raise ModelLoadError(f"metadata key {full!r} is missing")
            return meta[full]

        dim, n_heads = int(need("embedding_length")), int(need("attention.head_count"))
        return cls(
            architecture=arch,
            dim=dim,
            n_layers=int(need("block_count")),
            n_heads=n_heads,
            n_kv_heads=int(meta.get(f"{arch}.attention.head_count_kv", n_heads)),
            ffn_dim=int(need("feed_forward_length")),
            vocab_size=int(meta.get(f"{arch}.vocab_size", vocab_size)),
            context_length=int(need("context_length")),
            rms_eps=float(meta.get(f"{arch}.attention.layer_norm_rms_epsilon", 1e-5)),
            rope_base=float(meta.get(f"{arch}.rope.freq_base", 10000.0)),
            rope_dim=int(meta.get(f"{arch}.rope.dimension_count", dim // n_heads)),
        )
