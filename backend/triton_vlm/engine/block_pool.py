"""The KV block pool: which cache blocks are free, how many sequences reference each, and which
full blocks are cached under a content hash (automatic prefix caching).

Every block is in exactly one state (checked by `check`):
- plain free: ref count 0, no hash, on `plain_free` (FIFO);
- cached free: ref count 0, a hash, on `cached_free` (LRU: least recently freed first);
- in use: ref count = the number of block tables that hold it, hashed or not.
`hash_to_block` and `block_hash` are inverses of each other. A freed block that is cached keeps its
KV and hash until an allocation needs it: plain free blocks are handed out first, then cached free
ones are evicted least recently used first, each in O(1).
"""
from __future__ import annotations

from collections import Counter, OrderedDict, deque
from typing import Iterable


class OutOfBlocks(RuntimeError):
    pass


class BlockPool:
    def __init__(self, num_blocks: int):
        if num_blocks < 1:
            raise ValueError(f"num_blocks must be >= 1, got {num_blocks}")
        self.num_blocks = num_blocks
        self.ref_counts = [0] * num_blocks
        self.plain_free: deque[int] = deque(range(num_blocks))
        self.cached_free: OrderedDict[int, None] = OrderedDict()
        self.block_hash: list[bytes | None] = [None] * num_blocks
        self.hash_to_block: dict[bytes, int] = {}

    @property
    def num_free(self) -> int:
        return len(self.plain_free) + len(self.cached_free)

    @property
    def num_cached(self) -> int:
        return len(self.hash_to_block)

    def allocate(self, n: int) -> list[int]:
        if n > self.num_free:
            raise OutOfBlocks(f"asked for {n} blocks, {self.num_free} free")
        blocks = []
        for _ in range(n):
            if self.plain_free:
                b = self.plain_free.popleft()
            else:  # evict the least recently used cached block
                b, _ = self.cached_free.popitem(last=False)
                del self.hash_to_block[self.block_hash[b]]
                self.block_hash[b] = None
            self.ref_counts[b] = 1
            blocks.append(b)
        return blocks

    def share(self, blocks: Iterable[int]) -> None:
        """One more block table holds these (already allocated) blocks."""
        for b in blocks:
            if self.ref_counts[b] <= 0:
                raise RuntimeError(f"block {b} shared while not allocated")
            self.ref_counts[b] += 1

    def free(self, blocks: list[int]) -> None:
        """A block table lets go of its blocks. Its tail goes first, so cached tails are evicted before the
        prefixes that other requests are likelier to share."""
        for b in reversed(blocks):
            if self.ref_counts[b] <= 0:
                raise RuntimeError(f"block {b} freed while not referenced")
            self.ref_counts[b] -= 1
            if self.ref_counts[b] == 0:
                if self.block_hash[b] is None:
                    self.plain_free.append(b)
                else:
                    self.cached_free[b] = None

    # ---- prefix caching ---------------------------------------------------------------------------
    def cache(self, block: int, block_hash: bytes) -> None:
        """Register a full, computed block under its hash. A hash cached already (the same content computed
        twice at once) keeps its first block; this one stays uncached."""
        if self.ref_counts[block] <= 0:
            raise RuntimeError(f"block {block} cached while not allocated")
        if self.block_hash[block] is None and block_hash not in self.hash_to_block:
            self.block_hash[block] = block_hash
            self.hash_to_block[block_hash] = block

    def lookup(self, hashes: Iterable[bytes]) -> list[int]:
        """The blocks of the longest cached prefix of `hashes` (nothing is taken)."""
        found = []
        for h in hashes:
            b = self.hash_to_block.get(h)
            if b is None:
                break
            found.append(b)
        return found

    def num_idle(self, blocks: Iterable[int]) -> int:
        """How many of these cached blocks sit free (taking them lowers num_free)."""
        return sum(self.ref_counts[b] == 0 for b in blocks)

    def reuse(self, blocks: Iterable[int]) -> None:
        """A block table takes cached blocks found by `lookup`, in use or free."""
        for b in blocks:
            if self.block_hash[b] is None:
                raise RuntimeError(f"block {b} reused while not cached")
            if self.ref_counts[b] == 0:
                del self.cached_free[b]
            self.ref_counts[b] += 1

    def check(self, block_tables: Iterable[list[int]]) -> None:
        """Raise AssertionError unless the pool agrees exactly with the given block tables."""
        refs = Counter(b for table in block_tables for b in table)
        plain = set(self.plain_free)
        assert len(plain) == len(self.plain_free), "a block is on the plain free queue twice"
        assert not plain & self.cached_free.keys(), "a block is free both plain and cached"
        for b in range(self.num_blocks):
            assert self.ref_counts[b] == refs.get(b, 0), f"block {b}: ref count {self.ref_counts[b]} != {refs.get(b, 0)} tables"
            free = b in plain or b in self.cached_free
            assert free == (self.ref_counts[b] == 0), f"block {b}: free={free} but ref count {self.ref_counts[b]}"
            h = self.block_hash[b]
            assert (b in self.cached_free) <= (h is not None), f"block {b}: cached free without a hash"
            assert (b in plain) <= (h is None), f"block {b}: plain free with a hash"
            assert h is None or self.hash_to_block.get(h) == b, f"block {b}: its hash maps to another block"
        assert all(self.block_hash[b] == h for h, b in self.hash_to_block.items()), "hash map and block hashes disagree"
