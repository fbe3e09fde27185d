"""The scheduler: waiting and running queues, one token budget per step, preemption by recompute.

Each step, running sequences go first (one decode token each, or the next prefill chunk),
then waiting ones are admitted in arrival order while the token budget and KV blocks last.
When a running sequence needs a block and none is free, the newest running sequence is
preempted: its blocks are freed and it waits again, to be recomputed from its tokens.

With prefix caching, a sequence admitted with nothing computed (new, or preempted) first takes the
longest prefix of its full blocks that the pool has cached, and computes from there; it always
computes at least its last token, whose logits it needs. After each step, `cache_computed`
registers the blocks that became full and computed.
"""
from __future__ import annotations

from collections import deque
from dataclasses import dataclass
from typing import NamedTuple

from .block_pool import BlockPool
from .sequence import Sequence, Status


@dataclass
class SchedulerConfig:
    block_size: int = 8
    max_num_seqs: int = 64
    max_num_batched_tokens: int = 2048
    max_model_len: int = 4096
    enable_prefix_caching: bool = True


class Batch(NamedTuple):
    seqs: list[Sequence]
    num_new_tokens: list[int]  # how many of each sequence's tokens this step computes


class Scheduler:
    def __init__(self, config: SchedulerConfig, pool: BlockPool):
        self.config = config
        self.pool = pool
        self.waiting: deque[Sequence] = deque()
        self.running: list[Sequence] = []
        self.num_preemptions = 0
        self.prefix_queries = 0  # prompt tokens looked up in the prefix cache, and found there
        self.prefix_hits = 0
        # A sequence never outgrows the whole pool, so one alone can always run.
        self.max_seq_len = min(config.max_model_len, pool.num_blocks * config.block_size)

    def __len__(self) -> int:
        return len(self.waiting) + len(self.running)

    def check_admissible(self, seq: Sequence) -> None:
        """Refuse what could never run, rather than let it wait forever."""
        if seq.num_tokens >= self.max_seq_len:
            raise ValueError(f"input_ids: prompt has {seq.num_tokens} tokens; at most {self.max_seq_len - 1} fit "
                             f"(max_model_len {self.config.max_model_len}, KV cache "
                             f"{self.pool.num_blocks} x {self.config.block_size} tokens)")

    def add(self, seq: Sequence, first: bool = False) -> None:
        """Queue a sequence; `first` puts it at the head (a forked completion, its prompt already cached)."""
        self.check_admissible(seq)
        seq.status = Status.WAITING
        if first:
            self.waiting.appendleft(seq)
        else:
            self.waiting.append(seq)

    def schedule(self) -> Batch:
        budget = self.config.max_num_batched_tokens
        seqs, counts = [], []
        preempted = False
        i = 0
        while i < len(self.running) and budget > 0:
            seq = self.running[i]
            n = min(seq.num_tokens - seq.num_computed, budget)
            if self._reserve(seq, seq.num_computed + n):
                seqs.append(seq)
                counts.append(n)
                budget -= n
                i += 1
            else:
                # Lowest priority is the newest; it may be `seq` itself, which ends the loop.
                self._preempt(self.running.pop())
                preempted = True
        # Admitting new work right after a preemption would only thrash.
        while self.waiting and not preempted and budget > 0 and len(self.running) < self.config.max_num_seqs:
            seq = self.waiting[0]
            if not self._admit(seq, budget):
                break
            n = min(seq.num_tokens - seq.num_computed, budget)
            self.waiting.popleft()
            seq.status = Status.RUNNING
            self.running.append(seq)
            seqs.append(seq)
            counts.append(n)
            budget -= n
        return Batch(seqs, counts)

    def finish(self, seq: Sequence, reason: str) -> None:
        """Take a sequence out of the queues and give its blocks back."""
        if seq.status is Status.FINISHED:
            return
        # Look in both queues: after a failure mid-step its status may not say where it is.
        for q in (self.running, self.waiting):
            if seq in q:
                q.remove(seq)
        self.pool.free(seq.block_table)
        seq.block_table = []
        seq.num_cached_blocks = 0
        seq.status = Status.FINISHED
        seq.finish_reason = reason

    def block_tables(self) -> list[list[int]]:
        return [s.block_table for s in self.running] + [s.block_table for s in self.waiting]

    def _blocks_for(self, num_tokens: int) -> int:
        return -(-num_tokens // self.config.block_size)

    def _reserve(self, seq: Sequence, num_tokens: int) -> bool:
        need = self._blocks_for(num_tokens) - len(seq.block_table)
        if need <= 0:
            return True
        if need > self.pool.num_free:
            return False
        seq.block_table.extend(self.pool.allocate(need))
        return True

    def _admit(self, seq: Sequence, budget: int) -> bool:
        """Reserve blocks for a waiting sequence's next chunk, starting from its cached prefix when it has
        nothing computed yet; False (and nothing taken) if the blocks are not there."""
        bs = self.config.block_size
        # Prompt logprobs need every prompt row's logits, so such a sequence computes them all.
        looks = not seq.block_table and self.config.enable_prefix_caching and seq.params.prompt_logprobs is None
        hits = self.pool.lookup(seq.full_block_hashes(bs)[:(seq.num_tokens - 1) // bs]) if looks else []
        cached = len(hits) * bs  # the last token is always computed: its logits are needed
        n = min(seq.num_tokens - max(cached, seq.num_computed), budget)
        need = self._blocks_for(max(cached, seq.num_computed) + n) - len(hits) - len(seq.block_table)
        if need > self.pool.num_free - self.pool.num_idle(hits):
            return False
        if looks:
            self.prefix_queries += seq.num_tokens
            self.prefix_hits += cached
            if seq.num_generated == 0:
                seq.num_cached_tokens = cached
        if hits:
            self.pool.reuse(hits)
            seq.block_table = hits
            seq.num_computed, seq.num_cached_blocks = cached, len(hits)
        return self._reserve(seq, seq.num_computed + n)

    def cache_computed(self, seq: Sequence) -> None:
        """Register the sequence's blocks that are now full and computed, under their hashes."""
        if not self.config.enable_prefix_caching:
            return
        bs = self.config.block_size
        full = min(seq.num_computed // bs, len(seq.block_table))
        if full <= seq.num_cached_blocks:
            return
        hashes = seq.full_block_hashes(bs)
        for i in range(seq.num_cached_blocks, full):
            self.pool.cache(seq.block_table[i], hashes[i])
        seq.num_cached_blocks = full

    def _preempt(self, seq: Sequence) -> None:
        self.pool.free(seq.block_table)
        seq.block_table = []
        seq.num_computed = seq.num_cached_blocks = 0
        seq.status = Status.WAITING
        self.waiting.appendleft(seq)
        self.num_preemptions += 1
