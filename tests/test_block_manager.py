"""Block allocation, reference counts and prefix caching."""

from __future__ import annotations

from qwen3.engine.block_manager import BlockManager
from qwen3.engine.sequence import Sequence
from qwen3.sampling import SamplingParams


def seq(tokens: list[int], name: str = "s") -> Sequence:
    return Sequence(name, tokens, SamplingParams())


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
