"""Per-sequence contiguous KV cache, preallocated for the sequence's whole budget.

The batching issue replaces this with a paged pool shared by all sequences;
`SequenceKVCache.append` is the seam the model calls.
"""
from __future__ import annotations

import torch

from engine.config import ModelConfig


class SequenceKVCache:
    def __init__(self, cfg: ModelConfig, capacity: int, dtype: torch.dtype) -> None:
        if capacity > cfg.context_length:
            raise ValueError(f"KV capacity {capacity} exceeds the context length {cfg.context_length}")
        shape = (cfg.n_layers, capacity, cfg.n_kv_heads, cfg.head_dim)
        self.keys = torch.empty(shape, dtype=dtype)    # [layers, capacity, nkv, hd]
        self.values = torch.empty(shape, dtype=dtype)
        self.capacity = capacity

    def append(self, layer: int, position: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Store k, v [n, nkv, hd] at [position, position + n); return the layer's keys and values so far."""
        end = position + k.shape[0]
        if end > self.capacity:
            raise ValueError(f"KV cache overflow: position {end} > capacity {self.capacity}")
        self.keys[layer, position:end] = k
        self.values[layer, position:end] = v
        return self.keys[layer, :end], self.values[layer, :end]

    @property
    def nbytes(self) -> int:
        return self.keys.nbytes + self.values.nbytes
