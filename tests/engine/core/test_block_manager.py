"""Block accounting: free list, reference counts, prefix hits (hash AND tokens), LRU eviction."""
from __future__ import annotations

from dataclasses import dataclass, field

import lumen.engine.core.block_manager as bm
from lumen.engine.core.block_manager import BlockManager


@dataclass
class Seq:
    token_ids: list[int]
    block_table: list[int] = field(default_factory=list)
    block_hashes: list[int] = field(default_factory=list)
    cache_salt: object = None
    num_computed: int = 0


def computed(manager: BlockManager, seq: Seq) -> Seq:
    """Admit, compute the whole sequence and register its full blocks."""
    cached, new = manager.admit(seq, 10**6)
    seq.num_computed = cached + new
    manager.register_full_blocks(seq)
    return seq


def test_prefix_hit_shares_blocks_and_leaves_one_token_to_compute():
    m = BlockManager(num_blocks=8, block_size=4)
    a = computed(m, Seq(list(range(12))))          # 3 full blocks
    b = Seq(list(range(12)))                        # same tokens: 2 blocks reusable (one token must be computed)
    assert m.admit(b, 10**6) == (8, 4)
    assert b.block_table[:2] == a.block_table[:2] and b.block_table[2] != a.block_table[2]
    assert m.blocks[a.block_table[0]].ref_count == 2
    m.check_invariants([a, b])
    m.release(a)
    m.release(b)
    m.check_invariants([])
    assert m.num_free == 8


def test_hash_collision_is_caught_by_comparing_tokens(monkeypatch):
    monkeypatch.setattr(bm, "chain_hash", lambda previous, tokens: 42)
    m = BlockManager(num_blocks=8, block_size=4)
    computed(m, Seq([1, 2, 3, 4, 5]))
    other = Seq([9, 9, 9, 9, 5])
    assert m.admit(other, 10**6) == (0, 5)  # same hash, other tokens: no hit


def test_freed_blocks_stay_cached_until_evicted_lru():
    m = BlockManager(num_blocks=4, block_size=2)
    a = computed(m, Seq([1, 2, 3, 4, 5]))  # blocks 0, 1 (full, cached) and 2 (partial)
    table = list(a.block_table)
    m.release(a)  # free list, oldest first: 3, then a's blocks last to first: 2, 1, 0
    probe = Seq([1, 2, 3, 4, 6])
    assert m.find_cached_prefix(probe) == table[:2]
    filler = Seq([7, 7, 7, 7])
    m.admit(filler, 4)  # takes 3 and 2: nothing cached is evicted
    assert m.evictions == 0 and m.find_cached_prefix(probe) == table[:2]
    filler2 = Seq([8, 8, 8, 8])
    m.admit(filler2, 4)  # only cached blocks are left: both are evicted
    assert m.evictions == 2 and m.find_cached_prefix(probe) == []
    m.check_invariants([filler, filler2])


def test_admission_fails_without_changing_anything():
    m = BlockManager(num_blocks=2, block_size=4)
    seq = Seq(list(range(20)))
    assert m.admit(seq, 20) is None
    assert seq.block_table == [] and m.num_free == 2
    m.check_invariants([])


def test_grow_and_can_grow():
    m = BlockManager(num_blocks=3, block_size=4)
    seq = Seq([1, 2, 3])
    m.admit(seq, 3)
    assert m.can_grow(seq, 12) and not m.can_grow(seq, 13)
    m.grow(seq, 12)
    assert len(seq.block_table) == 3 and m.num_free == 0
    m.check_invariants([seq])
