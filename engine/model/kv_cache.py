"""The paged KV pool: one preallocated [num_blocks, block_size, nkv, hd] tensor per layer for K and V.

Its size comes from a memory budget; the `BlockManager` decides which blocks a
sequence owns. Pages of the pool that are never written are never touched.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from lumen.engine.model.config import ModelConfig


@dataclass(slots=True)
class KVCacheSpec:
    block_size: int
    num_blocks: int

    @staticmethod
    def bytes_per_block(cfg: ModelConfig, block_size: int, dtype: torch.dtype) -> int:
        element = torch.empty((), dtype=dtype).element_size()
        return 2 * cfg.n_layers * block_size * cfg.n_kv_heads * cfg.head_dim * element

    @classmethod
    def from_budget(cls, cfg: ModelConfig, dtype: torch.dtype, memory_bytes: int, block_size: int,
                    max_tokens: int | None = None) -> "KVCacheSpec":
        """As many blocks as `memory_bytes` holds, capped at what `max_tokens` tokens can use."""
        num_blocks = memory_bytes // cls.bytes_per_block(cfg, block_size, dtype)
        if max_tokens is not None:
            num_blocks = min(num_blocks, -(-max_tokens // block_size))
        if num_blocks < 1:
            raise ValueError(f"a KV memory budget of {memory_bytes} bytes holds no {block_size}-token block "
                             f"({cls.bytes_per_block(cfg, block_size, dtype)} bytes each); raise it")
        return cls(block_size, int(num_blocks))


class KVCachePool:
    def __init__(self, cfg: ModelConfig, spec: KVCacheSpec, dtype: torch.dtype, device: torch.device | str = "cpu") -> None:
        shape = (spec.num_blocks, spec.block_size, cfg.n_kv_heads, cfg.head_dim)
        self.spec = spec
        self.keys = [torch.empty(shape, dtype=dtype, device=device) for _ in range(cfg.n_layers)]    # per layer
        self.values = [torch.empty(shape, dtype=dtype, device=device) for _ in range(cfg.n_layers)]

    @property
    def nbytes(self) -> int:
        return sum(t.nbytes for t in self.keys) + sum(t.nbytes for t in self.values)
