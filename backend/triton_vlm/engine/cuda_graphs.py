"""CUDA graphs for decode-only steps, one per batch-size bucket (as nano-vllm does).

A decode step launches a few hundred small kernels; replaying a captured graph launches them at once.
Each bucket owns static inputs (embeds, positions, slots) and a FlashInfer decode wrapper with fixed
buffers; a step of B decodes runs in the smallest bucket >= B, its padded rows pointed at the
backend's scratch block so they never touch a real sequence's cache.
"""
from __future__ import annotations

import torch

from .attention import StepInput, step_positions, step_slots
from .attention_cuda import FlashInferMetadata, PagedTables


def buckets(max_batch: int) -> list[int]:
    sizes = [b for b in (1, 2, 4, 8) if b < max_batch] + list(range(16, max_batch, 16))
    return sizes + [max_batch]


class Graph:
    def __init__(self, runner, batch: int, max_blocks: int, pool):
        import flashinfer

        att, dev = runner.attention, runner.device
        self.batch, self.attention = batch, att
        hidden = runner.geometry.text.hidden_size
        self.embeds = torch.zeros(batch, hidden, dtype=runner.dtype, device=dev)
        self.positions = torch.zeros(batch, dtype=torch.long, device=dev)
        self.slots = torch.full((batch,), att.pad_block * att.block_size, dtype=torch.long, device=dev)
        self.wrapper = flashinfer.BatchDecodeWithPagedKVCacheWrapper(
            att.workspace, "NHD", use_cuda_graph=True,
            paged_kv_indptr_buffer=torch.zeros(batch + 1, dtype=torch.int32, device=dev),
            paged_kv_indices_buffer=torch.zeros(max_blocks, dtype=torch.int32, device=dev),
            paged_kv_last_page_len_buffer=torch.zeros(batch, dtype=torch.int32, device=dev))
        self._plan([[att.pad_block]] * batch, [1] * batch)
        meta = FlashInferMetadata(self.positions, self.slots, batch, self.wrapper, None)
        model, cache = runner.model, runner.kv_cache
        model(self.embeds, self.positions, cache, att, meta)  # warm-up outside the graph
        self.graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(self.graph, pool=pool):
            self.out = model(self.embeds, self.positions, cache, att, meta)

    def _plan(self, tables: list[list[int]], context_lens: list[int]) -> None:
        self.attention.plan_decode(self.wrapper, PagedTables(tables, context_lens, self.attention.block_size))

    def replay(self, embeds: torch.Tensor, step: StepInput) -> torch.Tensor:
        n, pad, bs = len(step.lens), self.batch - len(step.lens), self.attention.block_size
        self.embeds[:n].copy_(embeds)
        self.positions[:n].copy_(torch.tensor(step_positions(step)), non_blocking=True)
        self.slots[:n].copy_(torch.tensor(step_slots(step, bs)), non_blocking=True)
        self.slots[n:].fill_(self.attention.pad_block * bs)
        ctx = [s + 1 for s in step.starts]
        tables = [t[:-(-c // bs)] for t, c in zip(step.block_tables, ctx)]
        self._plan(tables + [[self.attention.pad_block]] * pad, ctx + [1] * pad)
        self.graph.replay()
        return self.out[:n]


class DecodeGraphs:
    def __init__(self, runner, max_batch: int):
        max_blocks = -(-runner.max_model_len // runner.block_size)
        self.graphs: dict[int, Graph] = {}
        pool = None
        for b in reversed(buckets(max_batch)):  # largest first, so the smaller ones fit in its memory pool
            self.graphs[b] = Graph(runner, b, b * max_blocks, pool)
            pool = self.graphs[b].graph.pool()
        self.sizes = sorted(self.graphs)

    def get(self, step: StepInput) -> Graph | None:
        """The graph for a decode-only step, or None (prefill in the step, or too many decodes)."""
        n = len(step.lens)
        if step.num_decodes != n or n > self.sizes[-1]:
            return None
        return self.graphs[next(b for b in self.sizes if b >= n)]
