"""Fixed-size KV-cache blocks: allocation, reference counts, and prefix caching by block hash.

A block holds ``block_size`` consecutive tokens of one sequence. Once full, it is hashed together
with the hash of the block before it, so equal hashes mean equal prefixes; a later request whose
prompt starts the same way reuses those blocks instead of recomputing them. Freed blocks keep their
hash and stay reusable until the allocator hands them out again, least recently freed first.
"""

from __future__ import annotations

from collections import OrderedDict

from qwen3.engine.sequence import Sequence


class BlockManager:
    def __init__(self, num_blocks: int, block_size: int, enable_prefix_caching: bool = True) -> None:
        self.num_blocks = num_blocks
        self.block_size = block_size
        self.enable_prefix_caching = enable_prefix_caching
        self.ref_counts = [0] * num_blocks
        self.block_hash: list[int | None] = [None] * num_blocks
        self.block_tokens: list[tuple[int, ...] | None] = [None] * num_blocks
        self.free: OrderedDict[int, None] = OrderedDict.fromkeys(range(num_blocks))
        self.cached: dict[int, int] = {}  # block hash -> block id
        self.prefix_queries = 0  # prompt blocks looked up
        self.prefix_hits = 0  # of which were found

    @property
    def num_free(self) -> int:
        return len(self.free)

    @property
    def num_used(self) -> int:
        return self.num_blocks - len(self.free)

    @property
    def hit_rate(self) -> float:
        return self.prefix_hits / self.prefix_queries if self.prefix_queries else 0.0

    def blocks_for(self, num_tokens: int) -> int:
        return -(-num_tokens // self.block_size)

    @staticmethod
    def chain_hash(previous: int | None, tokens: tuple[int, ...]) -> int:
        return hash((previous, tokens))

    def match_prefix(self, seq: Sequence) -> None:
        """Give a new sequence the cached blocks that hold its longest cached full-block prefix.

        At least one token is always left to compute: its logits are what the next step samples from.
        """
        if not self.enable_prefix_caching or seq.block_table:
            return
        bs = self.block_size
        previous = None
        for i in range((seq.num_tokens - 1) // bs):
            tokens = tuple(seq.token_ids[i * bs : (i + 1) * bs])
            h = self.chain_hash(previous, tokens)
            self.prefix_queries += 1
            block = self.cached.get(h)
            if block is None or self.block_tokens[block] != tokens:
                break
            self.prefix_hits += 1
            if self.ref_counts[block] == 0:
                del self.free[block]
            self.ref_counts[block] += 1
            seq.block_table.append(block)
            previous = h
        seq.num_hashed_blocks = len(seq.block_table)
        seq.num_computed = seq.num_prefix_cached = len(seq.block_table) * bs

    def reserve(self, seq: Sequence, num_new_tokens: int) -> bool:
        """Make room for ``num_new_tokens`` more computed tokens; False (nothing taken) if it cannot."""
        needed = self.blocks_for(seq.num_computed + num_new_tokens) - len(seq.block_table)
        if needed > len(self.free):
            return False
        for _ in range(max(needed, 0)):
            block, _ = self.free.popitem(last=False)
            if self.block_hash[block] is not None and self.cached.get(self.block_hash[block]) == block:
                del self.cached[self.block_hash[block]]
            self.block_hash[block] = self.block_tokens[block] = None
            self.ref_counts[block] = 1
            seq.block_table.append(block)
        return True

    def commit(self, seq: Sequence) -> None:
        """Hash the blocks that the last step filled, so later requests can share them."""
        if not self.enable_prefix_caching:
            return
        bs = self.block_size
        full = seq.num_computed // bs
        previous = (
            self.block_hash[seq.block_table[seq.num_hashed_blocks - 1]] if seq.num_hashed_blocks else None
        )
        for i in range(seq.num_hashed_blocks, full):
            block = seq.block_table[i]
            tokens = tuple(seq.token_ids[i * bs : (i + 1) * bs])
            h = self.chain_hash(previous, tokens)
            self.block_hash[block], self.block_tokens[block] = h, tokens
            self.cached.setdefault(h, block)
            previous = h
        seq.num_hashed_blocks = max(seq.num_hashed_blocks, full)

    def release(self, seq: Sequence) -> None:
        """Return a sequence's blocks; blocks nobody else holds go back to the pool (still cached)."""
        for block in reversed(seq.block_table):
            self.ref_counts[block] -= 1
            if self.ref_counts[block] == 0:
                self.free[block] = None
        seq.block_table = []
        seq.num_hashed_blocks = 0
        seq.num_computed = 0
