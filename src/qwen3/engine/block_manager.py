"""Fixed-size KV-cache blocks: allocation, reference counts, and prefix caching by chained block hashes.

A block holds ``block_size`` consecutive tokens of one sequence. Once full, it is keyed by the SHA-256 of
the previous block's key and its own token ids, so a key names the whole prefix up to the block's end; a
later request whose prompt starts the same way reuses those blocks instead of recomputing them. Freed
blocks keep their key and stay reusable until the allocator hands them out again.

Which free block is handed out: first a freed block that holds nothing reusable (no key: a partial last
block, or prefix caching off), then a block never used before, and only then the least recently freed
cached block. The pool is allocated lazily (its pages are committed when first written, which costs
~1 s per GiB on the VMs measured here), so this order keeps memory warm and small when nothing is lost
by it, and gives the prefix cache every block the pool has before evicting any.

Why SHA-256 over the whole chain: a key collision would serve one request another request's keys and
values, silently. Python's ``hash`` of a tuple is 64 bits and seeded per process, and comparing a block's
own tokens does not catch two different prefixes ending in the same block. A 256-bit cryptographic digest
of the chain makes an accidental or crafted collision out of reach (vLLM moved to SHA-256 for the same
reason) and costs ~1 us per 16-token block.
"""

from __future__ import annotations

import hashlib
from array import array
from collections import OrderedDict

from qwen3.engine.sequence import Sequence


def chain_hash(previous: bytes | None, tokens: list[int]) -> bytes:
    """The key of a full block: SHA-256 over the previous block's key and this block's token ids."""
    digest = hashlib.sha256(previous or b"\0" * 32)
    digest.update(array("q", tokens).tobytes())
    return digest.digest()


class BlockManager:
    def __init__(self, num_blocks: int, block_size: int, enable_prefix_caching: bool = True) -> None:
        self.num_blocks = num_blocks
        self.block_size = block_size
        self.enable_prefix_caching = enable_prefix_caching
        self.ref_counts = [0] * num_blocks
        self.block_hash: list[bytes | None] = [None] * num_blocks
        self.free_plain: list[int] = []  # freed, no key: reused first (most recently freed first)
        self.unused = list(range(num_blocks - 1, -1, -1))  # never handed out (popped from the end: 0, 1, ...)
        self.free_cached: OrderedDict[int, None] = (
            OrderedDict()
        )  # freed with a key, least recently freed first
        self.cached: dict[bytes, int] = {}  # block key -> block id
        self.prefix_queries = 0  # prompt blocks looked up
        self.prefix_hits = 0  # of which were found

    @property
    def num_free(self) -> int:
        return len(self.free_plain) + len(self.unused) + len(self.free_cached)

    @property
    def num_used(self) -> int:
        return self.num_blocks - self.num_free

    def _take(self) -> int:
        if self.free_plain:
            return self.free_plain.pop()
        if self.unused:
            return self.unused.pop()
        block, _ = self.free_cached.popitem(last=False)
        key = self.block_hash[block]
        if key is not None and self.cached.get(key) == block:
            del self.cached[key]
        return block

    @property
    def hit_rate(self) -> float:
        return self.prefix_hits / self.prefix_queries if self.prefix_queries else 0.0

    def blocks_for(self, num_tokens: int) -> int:
        return -(-num_tokens // self.block_size)

    def _hashes(self, seq: Sequence, num_blocks: int) -> list[bytes]:
        """The chain keys of the sequence's first ``num_blocks`` full blocks (computed once, then kept)."""
        bs, hashes = self.block_size, seq.block_hashes
        for i in range(len(hashes), num_blocks):
            hashes.append(chain_hash(hashes[-1] if hashes else None, seq.token_ids[i * bs : (i + 1) * bs]))
        return hashes

    def match_prefix(self, seq: Sequence) -> None:
        """Give a new sequence the cached blocks that hold its longest cached full-block prefix.

        At least one token is always left to compute: its logits are what the next step samples from.
        """
        if not self.enable_prefix_caching or seq.block_table:
            return
        lookups = 0
        for key in self._hashes(seq, (seq.num_tokens - 1) // self.block_size):
            lookups += 1
            self.prefix_queries += 1
            block = self.cached.get(key)
            if block is None:
                break
            self.prefix_hits += 1
            if self.ref_counts[block] == 0:
                del self.free_cached[block]
            self.ref_counts[block] += 1
            seq.block_table.append(block)
        seq.num_committed_blocks = len(seq.block_table)
        seq.num_computed = len(seq.block_table) * self.block_size
        if not seq.num_preemptions:  # what the prompt got from the cache (later: its own tokens too)
            seq.num_prefix_cached = min(seq.num_computed, seq.num_prompt_tokens)
        seq.prefix_lookups = (lookups, len(seq.block_table))

    def cancel_match(self, seq: Sequence) -> None:
        """Undo ``match_prefix`` for a sequence that could not be admitted after all (it stays waiting, holding
        no blocks); its lookups are not counted twice when it is matched again."""
        queries, hits = seq.prefix_lookups
        self.prefix_queries -= queries
        self.prefix_hits -= hits
        seq.prefix_lookups = (0, 0)
        self.release(seq)

    def reserve(self, seq: Sequence, num_new_tokens: int) -> bool:
        """Make room for ``num_new_tokens`` more computed tokens; False (nothing taken) if it cannot."""
        needed = self.blocks_for(seq.num_computed + num_new_tokens) - len(seq.block_table)
        if needed > self.num_free:
            return False
        for _ in range(max(needed, 0)):
            block = self._take()
            self.block_hash[block] = None
            self.ref_counts[block] = 1
            seq.block_table.append(block)
        return True

    def commit(self, seq: Sequence) -> None:
        """Register the blocks that the last step filled, so later requests can share them."""
        full = seq.num_computed // self.block_size
        if not self.enable_prefix_caching or full <= seq.num_committed_blocks:
            return
        hashes = self._hashes(seq, full)
        for i in range(seq.num_committed_blocks, full):
            block = seq.block_table[i]
            self.block_hash[block] = hashes[i]
            self.cached.setdefault(hashes[i], block)
        seq.num_committed_blocks = full

    def reset_prefix_cache(self) -> None:
        """Forget every cached block (their keys and values were computed by weights that have changed since:
        a trainer updating the model in place). Only while no sequence holds a block."""
        if self.num_used:
            raise RuntimeError(f"cannot reset the prefix cache while {self.num_used} blocks are in use")
        self.free_plain.extend(self.free_cached)
        self.free_cached.clear()
        self.cached.clear()
        self.block_hash = [None] * self.num_blocks

    def release(self, seq: Sequence) -> None:
        """Return a sequence's blocks; blocks nobody else holds go back to the pool (still cached)."""
        for block in reversed(seq.block_table):
            self.ref_counts[block] -= 1
            if self.ref_counts[block] == 0:
                key = self.block_hash[block]
                if key is not None and self.cached.get(key) == block:
                    self.free_cached[block] = None
                else:  # nothing to find it by (a duplicate of a cached block counts as nothing)
                    self.free_plain.append(block)
        seq.block_table = []
        seq.num_committed_blocks = 0
        seq.num_computed = 0
