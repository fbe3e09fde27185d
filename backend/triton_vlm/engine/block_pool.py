"""The KV block pool: which cache blocks are free, and how many sequences reference each.

Invariant (checked by `check`): every block is either on the free queue with ref count 0,
or off it with a ref count equal to the number of block tables that hold it.
"""
from __future__ import annotations

from collections import Counter, deque
from typing import Iterable


class OutOfBlocks(RuntimeError):
    pass


class BlockPool:
    def __init__(self, num_blocks: int):
        if num_blocks < 1:
            raise ValueError(f"num_blocks must be >= 1, got {num_blocks}")
        self.num_blocks = num_blocks
        self.ref_counts = [0] * num_blocks
        self.free_queue: deque[int] = deque(range(num_blocks))

    @property
    def num_free(self) -> int:
        return len(self.free_queue)

    def allocate(self, n: int) -> list[int]:
        if n > len(self.free_queue):
            raise OutOfBlocks(f"asked for {n} blocks, {len(self.free_queue)} free")
        blocks = [self.free_queue.popleft() for _ in range(n)]
        for b in blocks:
            self.ref_counts[b] = 1
        return blocks

    def share(self, blocks: Iterable[int]) -> None:
        """One more block table holds these (already allocated) blocks."""
        for b in blocks:
            if self.ref_counts[b] <= 0:
                raise RuntimeError(f"block {b} shared while not allocated")
            self.ref_counts[b] += 1

    def free(self, blocks: Iterable[int]) -> None:
        for b in blocks:
            if self.ref_counts[b] <= 0:
                raise RuntimeError(f"block {b} freed while not referenced")
            self.ref_counts[b] -= 1
            if self.ref_counts[b] == 0:
                self.free_queue.append(b)

    def check(self, block_tables: Iterable[list[int]]) -> None:
        """Raise AssertionError unless the pool agrees exactly with the given block tables."""
        refs = Counter(b for table in block_tables for b in table)
        free = set(self.free_queue)
        assert len(free) == len(self.free_queue), "a block is on the free queue twice"
        for b in range(self.num_blocks):
            assert self.ref_counts[b] == refs.get(b, 0), f"block {b}: ref count {self.ref_counts[b]} != {refs.get(b, 0)} tables"
            assert (b in free) == (self.ref_counts[b] == 0), f"block {b}: free={b in free} but ref count {self.ref_counts[b]}"
