"""KV block accounting: block tables, reference counts, an O(1) free list and prefix caching.

Blocks are fixed-size slots of the KV pool. A full block is identified by a hash
chained over its token ids and those of every block before it; a new sequence
whose prefix matches cached blocks (hash AND tokens compared) shares them instead
of recomputing. The chain starts from the sequence's `cache_salt`, so sequences of different
LoRA adapters (whose keys and values differ for the same tokens) never share a block. Freed blocks keep their contents and stay findable until the free
list hands them out again, oldest first (LRU eviction, only when free blocks run out).

This module only changes block tables and counts; it never touches tensors.
"""
from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass
from typing import Iterable, Protocol


class HasBlocks(Protocol):
    token_ids: list[int]
    block_table: list[int]
    block_hashes: list[int]   # chained hash of each full block of block_table that is registered
    num_computed: int
    cache_salt: object        # where its chain starts: None for the base model, the adapter's key with LoRA


@dataclass(slots=True)
class Block:
    block_id: int
    ref_count: int = 0
    hash: int | None = None
    token_ids: tuple[int, ...] = ()


def chain_hash(previous: int | None, tokens: tuple[int, ...]) -> int:
    return hash((previous, tokens))


class BlockManager:
    def __init__(self, num_blocks: int, block_size: int, prefix_caching: bool = True) -> None:
        if num_blocks < 1 or block_size < 1:
            raise ValueError(f"need at least one block of at least one token, got {num_blocks} x {block_size}")
        self.block_size = block_size
        self.prefix_caching = prefix_caching
        self.blocks = [Block(i) for i in range(num_blocks)]
        self.free: OrderedDict[int, None] = OrderedDict((i, None) for i in range(num_blocks))  # LRU first
        self.cached: dict[int, int] = {}  # chained hash -> block id
        self.hits = 0    # blocks reused from the prefix cache, ever
        self.evictions = 0

    @property
    def num_blocks(self) -> int:
        return len(self.blocks)

    @property
    def num_free(self) -> int:
        return len(self.free)

    def blocks_for(self, num_tokens: int) -> int:
        return -(-num_tokens // self.block_size)

    def find_cached_prefix(self, seq: HasBlocks) -> list[int]:
        """Block ids of the longest cached prefix, leaving at least one token to compute."""
        if not self.prefix_caching:
            return []
        found: list[int] = []
        previous = seq.cache_salt
        for i in range((len(seq.token_ids) - 1) // self.block_size):
            tokens = tuple(seq.token_ids[i * self.block_size:(i + 1) * self.block_size])
            previous = chain_hash(previous, tokens)
            block_id = self.cached.get(previous)
            if block_id is None or self.blocks[block_id].token_ids != tokens:
                break
            found.append(block_id)
        return found

    def admit(self, seq: HasBlocks, budget: int, use_cache: bool = True) -> tuple[int, int] | None:
        """Give a sequence holding no blocks its cached prefix and blocks for up to `budget` more tokens.

        Returns (cached tokens, tokens to compute now), or None (nothing changed) if blocks are short.
        """
        assert not seq.block_table, "admit is for sequences holding no blocks"
        hits = self.find_cached_prefix(seq) if use_cache else []
        cached_tokens = len(hits) * self.block_size
        num_new = min(len(seq.token_ids) - cached_tokens, budget)
        need = self.blocks_for(cached_tokens + num_new) - len(hits)
        reclaimed = sum(1 for b in hits if self.blocks[b].ref_count == 0)
        if need + reclaimed > len(self.free):
            return None
        for block_id in hits:
            block = self.blocks[block_id]
            if block.ref_count == 0:
                del self.free[block_id]
            block.ref_count += 1
            seq.block_table.append(block_id)
            seq.block_hashes.append(block.hash)
        self.hits += len(hits)
        self._grow(seq, need)
        return cached_tokens, num_new

    def can_grow(self, seq: HasBlocks, total_tokens: int) -> bool:
        return self.blocks_for(total_tokens) - len(seq.block_table) <= len(self.free)

    def grow(self, seq: HasBlocks, total_tokens: int) -> None:
        """Make seq's table cover `total_tokens` tokens (check can_grow first)."""
        need = self.blocks_for(total_tokens) - len(seq.block_table)
        if need > len(self.free):
            raise RuntimeError(f"{need} blocks needed, {len(self.free)} free: call can_grow first")
        self._grow(seq, need)

    def _grow(self, seq: HasBlocks, count: int) -> None:
        for _ in range(max(0, count)):
            block_id, _ = self.free.popitem(last=False)
            block = self.blocks[block_id]
            if block.hash is not None:  # evict the least recently used cached block
                if self.cached.get(block.hash) == block_id:
                    del self.cached[block.hash]
                block.hash, block.token_ids = None, ()
                self.evictions += 1
            block.ref_count = 1
            seq.block_table.append(block_id)

    def trim(self, seq: HasBlocks, num_tokens: int) -> None:
        """Free seq's blocks beyond the first `num_tokens` positions (rejected draft tokens' slots).

        Those blocks were never registered in the prefix cache (only computed full blocks
        are), so they go to the front of the free list, to be handed out first."""
        keep = self.blocks_for(num_tokens)
        assert len(seq.block_hashes) <= keep, "trimming a registered (cached) block"
        while len(seq.block_table) > keep:
            block = self.blocks[seq.block_table.pop()]
            block.ref_count -= 1
            if block.ref_count == 0:
                self.free[block.block_id] = None
                self.free.move_to_end(block.block_id, last=False)

    def register_full_blocks(self, seq: HasBlocks) -> None:
        """Make seq's newly computed full blocks findable by later sequences."""
        if not self.prefix_caching:
            return
        full = seq.num_computed // self.block_size
        previous = seq.block_hashes[-1] if seq.block_hashes else seq.cache_salt
        for i in range(len(seq.block_hashes), full):
            tokens = tuple(seq.token_ids[i * self.block_size:(i + 1) * self.block_size])
            previous = chain_hash(previous, tokens)
            block = self.blocks[seq.block_table[i]]
            if block.hash is None and previous not in self.cached:
                block.hash, block.token_ids = previous, tokens
                self.cached[previous] = block.block_id
            seq.block_hashes.append(previous)

    def release(self, seq: HasBlocks) -> None:
        """Return seq's blocks; the last ones go to the free list first, so they are evicted first."""
        for block_id in reversed(seq.block_table):
            block = self.blocks[block_id]
            block.ref_count -= 1
            if block.ref_count == 0:
                self.free[block_id] = None
        seq.block_table.clear()
        seq.block_hashes.clear()

    def check_invariants(self, seqs: Iterable[HasBlocks]) -> None:
        """Raise AssertionError if any block is leaked, double-freed or miscounted."""
        refs = [0] * len(self.blocks)
        for seq in seqs:
            assert len(set(seq.block_table)) == len(seq.block_table), "a block appears twice in one table"
            for block_id in seq.block_table:
                refs[block_id] += 1
        for block in self.blocks:
            assert block.ref_count == refs[block.block_id], f"block {block.block_id}: ref_count " \
                f"{block.ref_count}, held by {refs[block.block_id]} sequences"
            assert (block.ref_count == 0) == (block.block_id in self.free), f"block {block.block_id} free-list state"
        for h, block_id in self.cached.items():
            assert self.blocks[block_id].hash == h, f"cache entry {h} points at block {block_id} of another hash"
