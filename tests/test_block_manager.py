"""Block allocation, reference counts and prefix caching."""

from __future__ import annotations

import hashlib
import struct

from qwen3.engine.block_manager import BlockManager, chain_hash
from qwen3.engine.sequence import Sequence
from qwen3.sampling import SamplingParams


def seq(tokens: list[int], name: str = "s") -> Sequence:
    return Sequence(name, list(tokens), len(tokens), SamplingParams())


def run_prefill(bm: BlockManager, s: Sequence) -> None:
    bm.match_prefix(s)
    assert bm.reserve(s, s.num_pending)
    s.num_computed = s.num_tokens
    bm.commit(s)


def test_shared_prefix_reuses_full_blocks_only():
    bm = BlockManager(num_blocks=10, block_size=4)
    a = seq(list(range(10)), "a")
    run_prefill(bm, a)
    assert len(a.block_table) == 3 and bm.num_used == 3
    b = seq(list(range(8)) + [99, 98, 97], "b")
    bm.match_prefix(b)
    assert b.block_table == a.block_table[:2] and b.num_computed == 8
    assert bm.ref_counts[a.block_table[0]] == 2
    assert bm.hit_rate == 2 / 3  # a missed its first lookup, b hit both of its own


def test_last_token_is_always_computed():
    bm = BlockManager(num_blocks=10, block_size=4)
    run_prefill(bm, seq(list(range(8)), "a"))
    b = seq(list(range(8)), "b")
    bm.match_prefix(b)
    assert b.num_computed == 4 and b.num_pending == 4


def test_released_blocks_stay_cached_until_reused():
    bm = BlockManager(num_blocks=4, block_size=2)
    a = seq([1, 2, 3, 4, 5], "a")
    run_prefill(bm, a)
    bm.release(a)
    assert bm.num_free == 4
    b = seq([1, 2, 3, 4, 9], "b")
    bm.match_prefix(b)
    assert b.num_computed == 4  # found after release
    bm.release(b)
    c = seq([7, 7, 7, 7, 7, 7, 7, 7], "c")  # needs every block: evicts the cached ones
    assert bm.reserve(c, 8) and bm.num_free == 0
    assert not bm.cached or all(bm.block_hash[blk] is None for blk in c.block_table)


def test_reserve_fails_without_taking_anything():
    bm = BlockManager(num_blocks=2, block_size=4)
    s = seq(list(range(12)))
    assert not bm.reserve(s, 12)
    assert bm.num_free == 2 and s.block_table == []


def test_different_prefixes_do_not_collide():
    bm = BlockManager(num_blocks=10, block_size=2)
    run_prefill(bm, seq([1, 2, 3, 4, 5], "a"))
    b = seq([1, 2, 4, 3, 5], "b")
    bm.match_prefix(b)
    assert b.num_computed == 2


def test_keys_are_sha256_of_the_whole_chain():
    first = chain_hash(None, [1, 2])
    assert first == hashlib.sha256(b"\0" * 32 + struct.pack("<2q", 1, 2)).digest()
    second = chain_hash(first, [3, 4])
    assert second == hashlib.sha256(first + struct.pack("<2q", 3, 4)).digest()
    # The same block after a different prefix has a different key: no request is served another's KV.
    assert chain_hash(chain_hash(None, [9, 9]), [3, 4]) != second
    bm = BlockManager(num_blocks=10, block_size=2)
    a = seq([1, 2, 3, 4, 5], "a")
    run_prefill(bm, a)
    assert set(bm.cached) == {first, second}


def test_same_last_block_after_another_prefix_is_a_miss():
    bm = BlockManager(num_blocks=10, block_size=2)
    run_prefill(bm, seq([1, 2, 3, 4, 5], "a"))
    b = seq([7, 8, 3, 4, 5], "b")  # block [3, 4] is cached, but after [1, 2]
    bm.match_prefix(b)
    assert b.num_computed == 0 and b.block_table == []


def test_block_keys_survive_preemption_and_are_not_recomputed():
    bm = BlockManager(num_blocks=10, block_size=2)
    a = seq([1, 2, 3, 4, 5, 6, 7], "a")
    run_prefill(bm, a)
    keys = list(a.block_hashes)
    assert len(keys) == 3
    bm.release(a)  # what preemption does
    assert a.block_hashes == keys and a.num_computed == 0
    bm.match_prefix(a)
    assert a.num_computed == 6 and a.block_hashes == keys


def test_free_blocks_are_handed_out_plain_then_unused_then_least_recently_cached():
    bm = BlockManager(num_blocks=6, block_size=2)
    a = seq([1, 2, 3, 4, 5], "a")  # two full (cached) blocks and a partial one
    run_prefill(bm, a)
    first = list(a.block_table)
    assert first == [0, 1, 2]  # never-used blocks in order
    bm.release(a)
    b = seq([9, 9, 9], "b")
    assert bm.reserve(b, 3)
    assert b.block_table == [2, 3]  # the partial (plain) block first, then an unused one; cache kept
    assert bm.cached and all(bm.block_hash[i] is not None for i in first[:2])
    c = seq([8] * 6, "c")
    assert bm.reserve(c, 6)
    assert c.block_table == [4, 5, 1]  # unused ones, then the least recently freed cached block (a tail)
    assert len(bm.cached) == 1


def test_a_cancelled_match_is_not_counted_twice():
    bm = BlockManager(num_blocks=10, block_size=2)
    run_prefill(bm, seq([1, 2, 3, 4, 5], "a"))
    b = seq([1, 2, 3, 4, 9], "b")
    bm.match_prefix(b)
    assert (bm.prefix_queries, bm.prefix_hits) == (3, 2) and b.num_prefix_cached == 4  # a missed its first
    bm.cancel_match(b)
    assert (bm.prefix_queries, bm.prefix_hits) == (1, 0) and b.block_table == [] and bm.num_free == 7
    bm.match_prefix(b)
    assert (bm.prefix_queries, bm.prefix_hits) == (3, 2)
