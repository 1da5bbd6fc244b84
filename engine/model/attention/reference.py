"""The slow, obviously-correct attention over the paged KV cache that the backends are tested against.

It walks every sequence, query position and head one at a time, reads each key and value
through the block table token by token and does the softmax in float64. It must never be
used to serve (it is orders of magnitude too slow) and must never call SDPA or share code
with a backend, or it would stop being an independent oracle.
"""
from __future__ import annotations

import torch

from lumen.engine.model.attention.metadata import AttentionMetadata


def reference_attention(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                        meta: AttentionMetadata, scale: float) -> torch.Tensor:
    """q [num_tokens, nh, hd], caches [num_blocks, block_size, nkv, hd] -> out [num_tokens, nh, hd]."""
    num_heads, num_kv_heads = q.shape[1], k_cache.shape[2]
    group = num_heads // num_kv_heads
    out = torch.empty_like(q)
    start = 0
    for s, (query_len, seq_len) in enumerate(zip(meta.query_lens_list, meta.seq_lens_list)):
        keys, values = _gather(k_cache, v_cache, meta.block_tables[s].tolist(), meta.block_size, seq_len)
        for i in range(query_len):
            pos = seq_len - query_len + i              # causal: sees positions [0, pos]
            for h in range(num_heads):
                kv_head = h // group
                scores = keys[: pos + 1, kv_head] @ q[start + i, h].double() * scale   # [pos + 1]
                weights = torch.exp(scores - scores.max())
                weights = weights / weights.sum()
                out[start + i, h] = (weights @ values[: pos + 1, kv_head]).to(q.dtype)
        start += query_len
    return out


def _gather(k_cache: torch.Tensor, v_cache: torch.Tensor, table: list[int], block_size: int,
            seq_len: int) -> tuple[torch.Tensor, torch.Tensor]:
    """One sequence's keys and values, position by position: two [seq_len, nkv, hd] float64 tensors."""
    keys = [k_cache[table[p // block_size], p % block_size] for p in range(seq_len)]
    values = [v_cache[table[p // block_size], p % block_size] for p in range(seq_len)]
    return torch.stack(keys).double(), torch.stack(values).double()
