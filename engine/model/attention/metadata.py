"""What an attention backend needs to know about one engine step, and the KV write.

KV cache layout, per layer: `k_cache`, `v_cache` of shape
[num_blocks, block_size, num_kv_heads, head_dim]. A sequence's token at position p
lives in block `block_tables[s, p // block_size]`, row `p % block_size`.

The flattened batch holds each scheduled sequence's new tokens back to back; the
new tokens of sequence s are the last `query_len` positions of its `seq_len`
tokens, so query i of s sits at position seq_len - query_len + i and attends
causally to positions [0, that position].
"""
from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(slots=True)
class AttentionMetadata:
    query_start_loc: torch.Tensor  # [num_seqs + 1] int32: offsets of each sequence's queries in the batch
    seq_lens: torch.Tensor         # [num_seqs] int32: context length after this step (cached + new)
    block_tables: torch.Tensor     # [num_seqs, max_blocks_per_seq] int32: physical block ids, padded with 0
    slot_mapping: torch.Tensor     # [num_tokens] int64: block_id * block_size + row, where each new token's K/V goes
    block_size: int
    max_query_len: int
    max_seq_len: int
    query_lens_list: list[int]     # host copies, for the CPU backend's per-sequence loop
    seq_lens_list: list[int]

    @property
    def num_seqs(self) -> int:
        return len(self.seq_lens_list)

    def to(self, device: torch.device) -> "AttentionMetadata":
        return AttentionMetadata(
            self.query_start_loc.to(device), self.seq_lens.to(device), self.block_tables.to(device),
            self.slot_mapping.to(device), self.block_size, self.max_query_len, self.max_seq_len,
            self.query_lens_list, self.seq_lens_list)

    @classmethod
    def build(cls, query_lens: list[int], seq_lens: list[int], block_tables: list[list[int]],
              block_size: int) -> "AttentionMetadata":
        """Host-side construction from per-sequence lists (the engine and the tests use it)."""
        starts = [0]
        slots: list[int] = []
        for q, s, table in zip(query_lens, seq_lens, block_tables):
            starts.append(starts[-1] + q)
            slots.extend(table[p // block_size] * block_size + p % block_size for p in range(s - q, s))
        width = max((len(t) for t in block_tables), default=0) or 1
        padded = [t + [0] * (width - len(t)) for t in block_tables]
        return cls(
            query_start_loc=torch.tensor(starts, dtype=torch.int32),
            seq_lens=torch.tensor(seq_lens, dtype=torch.int32),
            block_tables=torch.tensor(padded, dtype=torch.int32).view(len(block_tables), width),
            slot_mapping=torch.tensor(slots, dtype=torch.int64),
            block_size=block_size,
            max_query_len=max(query_lens, default=0),
            max_seq_len=max(seq_lens, default=0),
            query_lens_list=list(query_lens),
            seq_lens_list=list(seq_lens),
        )


def write_kv(k: torch.Tensor, v: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
             slot_mapping: torch.Tensor) -> None:
    """Store this step's k, v [num_tokens, nkv, hd] into their cache slots."""
    nkv, hd = k.shape[1], k.shape[2]
    k_cache.view(-1, nkv, hd).index_copy_(0, slot_mapping, k.to(k_cache.dtype))
    v_cache.view(-1, nkv, hd).index_copy_(0, slot_mapping, v.to(v_cache.dtype))
