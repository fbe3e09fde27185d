"""Paged attention in plain torch: the CPU implementation (and the CUDA fallback without FlashInfer).

The seam: an attention backend has `kv_cache`, `prepare` and `forward`; `attention_cuda.py` holds the
other implementation (FlashInfer). `prepare` turns the step's block tables into every index, mask,
slot and position the step needs, once per step; `forward` runs one layer from them.

Cache layout here: per layer [num_blocks, kv_heads, block_size, head_dim], so a gathered block is
ready for a batched matmul. A token's slot is block_table[pos // block_size] * block_size + pos % block_size.

The flat batch holds the decodes first (one token each), then the prefill chunks:
- decodes, in fp32 where a C compiler is found: cpu_kernel.py's compiled kernel reads each sequence's
  blocks in place through its block table (no copy), one online softmax per sequence and kv head.
- decodes otherwise attend block by block in torch (flash-decoding): scores of each gathered block
  against its sequence's query, a softmax per block, then the blocks of one sequence merged by their
  log-sum-exp (a [decodes, blocks] 0/1 matmul sums the blocks of each sequence). Work and copies are
  O(live tokens), rounded up to whole blocks.
- prefill chunks attend in one batched SDPA call: each chunk's queries and gathered blocks padded to the
  step's longest chunk and context (a block-diagonal mask over all chunks would cost chunks^2 times more).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import NamedTuple

import torch
import torch.nn.functional as F

from . import cpu_kernel


class StepInput(NamedTuple):
    """One step's sequences, as plain data: decodes first, then prefill chunks."""

    starts: list[int]  # tokens already in the cache, per sequence
    lens: list[int]  # new tokens this step, per sequence (1 for each of the first num_decodes)
    block_tables: list[list[int]]
    num_decodes: int


def step_positions(step: StepInput) -> list[int]:
    return [p for start, n in zip(step.starts, step.lens) for p in range(start, start + n)]


def step_slots(step: StepInput, block_size: int) -> list[int]:
    return [table[p // block_size] * block_size + p % block_size
            for start, n, table in zip(step.starts, step.lens, step.block_tables) for p in range(start, start + n)]


def blocks_in_use(step: StepInput, first: int, last: int, block_size: int) -> list[list[int]]:
    """Each sequence's blocks that hold its context after this step."""
    return [step.block_tables[i][:-(-(step.starts[i] + step.lens[i]) // block_size)] for i in range(first, last)]


@dataclass
class TorchMetadata:
    positions: torch.Tensor  # [T]
    slot_mapping: torch.Tensor  # [T]
    cache_rows: torch.Tensor  # [T * kv_heads]: each new token's row per kv head in a cache viewed as [-1, head_dim]
    num_decodes: int
    # decodes, torch path: the gathered blocks, the decode row each belongs to, -inf past the context in its
    # last block. Kernel path: every decode's blocks in use (int32, flat), where each decode's blocks begin in
    # that list, and each decode's context length. Each path leaves the other's fields empty.
    dec_blocks: torch.Tensor  # [NB]
    dec_block_row: torch.Tensor  # [NB]
    dec_block_bias: torch.Tensor  # [NB, 1, 1, block_size]
    dec_select: torch.Tensor  # [num_decodes, NB]: 1 where the block belongs to the decode
    dec_tables: torch.Tensor  # [NB] int32
    dec_offsets: torch.Tensor  # [num_decodes + 1] int32
    dec_context: torch.Tensor  # [num_decodes] int32
    # prefill chunks, padded to P x max_q queries over P x (max_blocks * block_size) slots
    pre_blocks: torch.Tensor  # [P * max_blocks], padded with block 0 (masked out)
    pre_rows: torch.Tensor  # [Tp]: each prefill query's row in the padded [P * max_q] layout
    pre_mask: torch.Tensor  # [P, 1, max_q, max_blocks * block_size]: 0 where the query sees the slot, else -inf


class TorchAttention:
    def __init__(self, block_size: int, device: torch.device, use_kernel: bool = True):
        self.block_size = block_size
        self.device = device
        self.kv_heads, self.dtype = 1, torch.float32  # set by kv_cache
        self.use_kernel = use_kernel
        self.kernel = None  # cpu_kernel's paged_decode, loaded by kv_cache where it applies

    def kv_cache(self, num_layers: int, num_blocks: int, kv_heads: int, head_dim: int,
                 dtype: torch.dtype) -> torch.Tensor:
        self.kv_heads, self.dtype = kv_heads, dtype
        if self.use_kernel and self.device.type == "cpu" and dtype == torch.float32:
            self.kernel = cpu_kernel.load()
        return torch.zeros(2, num_layers, num_blocks, kv_heads, self.block_size, head_dim, dtype=dtype,
                           device=self.device)

    def prepare(self, step: StepInput) -> TorchMetadata:
        """Every index, mask, slot and position of the step, once; the layers only read them."""
        slots = torch.tensor(step_slots(step, self.block_size), dtype=torch.long)
        put = lambda x: torch.as_tensor(x).to(self.device, non_blocking=True)  # noqa: E731
        return TorchMetadata(put(torch.tensor(step_positions(step), dtype=torch.long)), put(slots),
                             put(self._cache_rows(slots)), step.num_decodes,
                             *map(put, self._decode_part(step)), *map(put, self._kernel_part(step)),
                             *map(put, self._prefill_part(step)))

    def _cache_rows(self, slots: torch.Tensor) -> torch.Tensor:
        """Row of each (token, kv head) in a cache viewed as [blocks * kv_heads * bs, head_dim]."""
        bs = self.block_size
        heads = torch.arange(self.kv_heads)
        return (((slots // bs)[:, None] * self.kv_heads + heads) * bs + (slots % bs)[:, None]).flatten()

    def _kernel_part(self, step: StepInput) -> tuple[torch.Tensor, ...]:
        if self.kernel is None:
            return (torch.empty(0, dtype=torch.int32),) * 3
        tables = blocks_in_use(step, 0, step.num_decodes, self.block_size)
        offsets = [0]
        for table in tables:
            offsets.append(offsets[-1] + len(table))
        as_int32 = lambda x: torch.tensor(x, dtype=torch.int32)  # noqa: E731
        return (as_int32([b for t in tables for b in t]), as_int32(offsets),
                as_int32([start + 1 for start in step.starts[:step.num_decodes]]))

    def _decode_part(self, step: StepInput) -> tuple[torch.Tensor, ...]:
        bs, nd = self.block_size, step.num_decodes
        if self.kernel is not None:
            nd = 0  # the kernel path needs none of these
        tables = blocks_in_use(step, 0, nd, bs)
        rows = [i for i, table in enumerate(tables) for _ in table]
        # Position of each block's first token, and its decode's context length after this step.
        first = torch.tensor([j * bs for table in tables for j in range(len(table))], dtype=torch.long)
        ctx = torch.tensor([step.starts[i] + 1 for i in rows], dtype=torch.long)
        past_end = (first[:, None] + torch.arange(bs)[None, :]) >= ctx[:, None]
        bias = torch.zeros(len(rows), 1, 1, bs, dtype=self.dtype).masked_fill_(past_end[:, None, None, :],
                                                                                float("-inf"))
        select = torch.zeros(nd, len(rows), dtype=self.dtype)
        select[torch.tensor(rows, dtype=torch.long), torch.arange(len(rows))] = 1.0
        blocks = torch.tensor([b for t in tables for b in t], dtype=torch.long)
        return blocks, torch.tensor(rows, dtype=torch.long), bias, select

    def _prefill_part(self, step: StepInput) -> tuple[torch.Tensor, ...]:
        bs, nd = self.block_size, step.num_decodes
        tables = blocks_in_use(step, nd, len(step.lens), bs)
        lens = step.lens[nd:]
        max_q, max_nb = max(lens, default=0), max(map(len, tables), default=0)
        blocks = [b for t in tables for b in t + [0] * (max_nb - len(t))]
        rows = [i * max_q + j for i, n in enumerate(lens) for j in range(n)]
        q_pos = torch.tensor(step.starts[nd:], dtype=torch.long)[:, None] + torch.arange(max_q)  # [P, max_q]
        key_pos = torch.arange(max_nb * bs)
        visible = key_pos[None, None, :] <= q_pos[:, :, None]  # causal; keys past a chunk's context follow
        # A padding row sees slot 0 only, so its softmax stays finite; its output is dropped.
        visible[torch.arange(max_q)[None, :] >= torch.tensor(lens, dtype=torch.long)[:, None]] = key_pos == 0
        # Additive and in the model's dtype, so SDPA does not convert a bool mask again in every layer.
        mask = torch.zeros(visible.shape, dtype=self.dtype).masked_fill_(~visible, float("-inf"))[:, None]
        return torch.tensor(blocks, dtype=torch.long), torch.tensor(rows, dtype=torch.long), mask

    def forward(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, k_cache: torch.Tensor,
                v_cache: torch.Tensor, meta: TorchMetadata, scale: float) -> torch.Tensor:
        """q [T, heads, head_dim], k/v [T, kv_heads, head_dim] -> [T, heads, head_dim], causal per sequence."""
        write_kv(k_cache, v_cache, k, v, meta.cache_rows)
        nd = meta.num_decodes
        if nd == q.shape[0]:
            return self._decode(q, k_cache, v_cache, meta, scale)
        pre = prefill_attention(q[nd:], k_cache, v_cache, meta, scale)
        return pre if nd == 0 else torch.cat((self._decode(q[:nd], k_cache, v_cache, meta, scale), pre))

    def _decode(self, q, k_cache, v_cache, meta: TorchMetadata, scale: float) -> torch.Tensor:
        if self.kernel is None:
            return decode_attention(q, k_cache, v_cache, meta, scale)
        return cpu_kernel.paged_decode(self.kernel, q, k_cache, v_cache, meta.dec_tables, meta.dec_offsets,
                                       meta.dec_context, scale)


def write_kv(k_cache: torch.Tensor, v_cache: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
             cache_rows: torch.Tensor) -> None:
    """k, v [T, kv_heads, head_dim] into their rows (TorchMetadata.cache_rows): a plain row copy."""
    dim = k.shape[-1]
    k_cache.view(-1, dim).index_copy_(0, cache_rows, k.reshape(-1, dim))
    v_cache.view(-1, dim).index_copy_(0, cache_rows, v.reshape(-1, dim))


def decode_attention(q, k_cache, v_cache, meta: TorchMetadata, scale: float) -> torch.Tensor:
    """One query per sequence: softmax within each gathered block, then merge the blocks of a sequence."""
    nd, heads, dim = q.shape
    kv_heads = k_cache.shape[1]
    rows = meta.dec_block_row
    kb = k_cache.index_select(0, meta.dec_blocks)  # [NB, kv_heads, bs, dim]
    vb = v_cache.index_select(0, meta.dec_blocks)
    qb = q.view(nd, kv_heads, heads // kv_heads, dim).index_select(0, rows)  # [NB, kv_heads, group, dim]
    s = torch.matmul(qb, kb.transpose(-1, -2)).mul_(scale).add_(meta.dec_block_bias)  # [NB, kv_heads, group, bs]
    m = s.amax(-1, keepdim=True)  # every block holds at least one live token, so m is finite
    e = s.sub_(m).exp_()
    partial_sum = e.sum(-1, keepdim=True)
    partial_out = torch.matmul(e, vb)  # [NB, kv_heads, group, dim]
    # Merge: rescale every block to its sequence's largest block maximum.
    index = rows.view(-1, 1, 1, 1).expand_as(m)
    seq_max = torch.full((nd, *m.shape[1:]), float("-inf"), dtype=m.dtype, device=m.device)
    seq_max.scatter_reduce_(0, index, m, "amax")
    w = m.sub_(seq_max.index_select(0, rows)).exp_()
    num = torch.mm(meta.dec_select, partial_out.mul_(w).flatten(1))  # [nd, kv_heads * group * dim]
    den = torch.mm(meta.dec_select, partial_sum.mul_(w).flatten(1))  # [nd, kv_heads * group]
    return num.view(nd, heads, dim).div_(den.view(nd, heads, 1))


def prefill_attention(q, k_cache, v_cache, meta: TorchMetadata, scale: float) -> torch.Tensor:
    """All prefill chunks in one batched SDPA call, padded to the longest chunk and context."""
    p, _, max_q, width = meta.pre_mask.shape
    _, kv_heads, bs, dim = k_cache.shape
    heads = q.shape[1]
    padded_q = q.new_zeros(p * max_q, heads, dim).index_copy_(0, meta.pre_rows, q)

    def gather(cache):  # [P, kv_heads, max_blocks * bs, dim]
        blocks = cache.index_select(0, meta.pre_blocks).view(p, -1, kv_heads, bs, dim)
        return blocks.transpose(1, 2).reshape(p, kv_heads, width, dim)

    o = F.scaled_dot_product_attention(padded_q.view(p, max_q, heads, dim).transpose(1, 2), gather(k_cache),
                                       gather(v_cache), attn_mask=meta.pre_mask, scale=scale,
                                       enable_gqa=heads != kv_heads)
    return o.transpose(1, 2).reshape(p * max_q, heads, dim).index_select(0, meta.pre_rows)
