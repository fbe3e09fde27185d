"""Paged attention in plain torch: the CPU implementation (and the CUDA fallback without FlashInfer).

The seam: an attention backend has `kv_cache`, `prepare` and `forward`; `attention_cuda.py` holds the
other implementation (FlashInfer). `prepare` turns the step's block tables into every index, mask,
slot and position the step needs, once per step; `forward` runs one layer from them.

Cache layout here: per layer [num_blocks, kv_heads, block_size, head_dim], so a gathered block is
ready for a batched matmul. A token's slot is block_table[pos // block_size] * block_size + pos % block_size.

The flat batch holds the decodes first (one token each), then the prefill chunks:
- decodes attend block by block (flash-decoding): scores of each gathered block against its
  sequence's query, a softmax per block, then the blocks of one sequence merged by their
  log-sum-exp (a [decodes, blocks] 0/1 matmul sums the blocks of each sequence). Work and copies are
  O(live tokens), rounded up to whole blocks.
- prefill chunks attend in one SDPA call over their gathered blocks, with a block-diagonal causal mask.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import NamedTuple

import torch
import torch.nn.functional as F


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
    # decodes: the gathered blocks, the decode row each belongs to, -inf past the context in its last block
    dec_blocks: torch.Tensor  # [NB]
    dec_block_row: torch.Tensor  # [NB]
    dec_block_bias: torch.Tensor  # [NB, 1, 1, block_size]
    dec_select: torch.Tensor  # [num_decodes, NB]: 1 where the block belongs to the decode
    # prefill chunks: their gathered blocks and which of those slots each query may see
    pre_blocks: torch.Tensor  # [NBp]
    pre_mask: torch.Tensor  # [Tp, NBp * block_size]: 0 where the query sees the slot, -inf elsewhere


class TorchAttention:
    def __init__(self, block_size: int, device: torch.device):
        self.block_size = block_size
        self.device = device
        self.kv_heads, self.dtype = 1, torch.float32  # set by kv_cache

    def kv_cache(self, num_layers: int, num_blocks: int, kv_heads: int, head_dim: int,
                 dtype: torch.dtype) -> torch.Tensor:
        self.kv_heads, self.dtype = kv_heads, dtype
        return torch.zeros(2, num_layers, num_blocks, kv_heads, self.block_size, head_dim, dtype=dtype,
                           device=self.device)

    def prepare(self, step: StepInput) -> TorchMetadata:
        bs, nd = self.block_size, step.num_decodes
        dev = self.device
        dec_tables = blocks_in_use(step, 0, nd, bs)
        dec_rows = [i for i, table in enumerate(dec_tables) for _ in table]
        # Position of each decode block's first token, and the decode's context length after this step.
        dec_first = [j * bs for table in dec_tables for j in range(len(table))]
        dec_ctx = [step.starts[i] + 1 for i in dec_rows]
        past_end = (torch.tensor(dec_first)[:, None] + torch.arange(bs)[None, :]) >= torch.tensor(dec_ctx)[:, None]
        bias = torch.zeros(len(dec_rows), 1, 1, bs).masked_fill_(past_end[:, None, None, :], float("-inf"))
        select = torch.zeros(nd, len(dec_rows))
        select[torch.tensor(dec_rows, dtype=torch.long), torch.arange(len(dec_rows))] = 1.0
        # Cache row of (token, kv head) in [blocks * kv_heads * bs, head_dim]: block, then head, then offset.
        slots = torch.tensor(step_slots(step, bs), dtype=torch.long)
        heads = torch.arange(self.kv_heads)
        cache_rows = (((slots // bs)[:, None] * self.kv_heads + heads) * bs + (slots % bs)[:, None]).flatten()

        pre_tables = blocks_in_use(step, nd, len(step.lens), bs)
        # Every prefill key slot: (prefill sequence, position); every prefill query: the same.
        key_seq = torch.tensor([i for i, table in enumerate(pre_tables) for _ in range(len(table) * bs)],
                               dtype=torch.long)
        key_pos = torch.tensor([p for table in pre_tables for p in range(len(table) * bs)], dtype=torch.long)
        q_seq = torch.tensor([i for i, n in enumerate(step.lens[nd:]) for _ in range(n)], dtype=torch.long)
        q_pos = torch.tensor([p for start, n in zip(step.starts[nd:], step.lens[nd:]) for p in range(start, start + n)],
                             dtype=torch.long)
        visible = (q_seq[:, None] == key_seq[None, :]) & (q_pos[:, None] >= key_pos[None, :])
        # Additive and in the model's dtype, so SDPA does not convert a bool mask again in every layer.
        pre_mask = torch.zeros(visible.shape, dtype=self.dtype).masked_fill_(~visible, float("-inf"))

        def put(x):
            return torch.as_tensor(x, dtype=torch.long).to(dev, non_blocking=True)

        return TorchMetadata(positions=put(step_positions(step)), slot_mapping=slots.to(dev), cache_rows=put(cache_rows),
                             num_decodes=nd, dec_blocks=put([b for t in dec_tables for b in t]),
                             dec_block_row=put(dec_rows), dec_block_bias=bias.to(dev, self.dtype),
                             dec_select=select.to(dev, self.dtype),
                             pre_blocks=put([b for t in pre_tables for b in t]), pre_mask=pre_mask.to(dev))

    def forward(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, k_cache: torch.Tensor,
                v_cache: torch.Tensor, meta: TorchMetadata, scale: float) -> torch.Tensor:
        """q [T, heads, head_dim], k/v [T, kv_heads, head_dim] -> [T, heads, head_dim], causal per sequence."""
        write_kv(k_cache, v_cache, k, v, meta.cache_rows)
        nd = meta.num_decodes
        if nd == q.shape[0]:
            return decode_attention(q, k_cache, v_cache, meta, scale)
        pre = prefill_attention(q[nd:], k_cache, v_cache, meta, scale)
        return pre if nd == 0 else torch.cat((decode_attention(q[:nd], k_cache, v_cache, meta, scale), pre))


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
    """All prefill chunks in one SDPA call over their gathered blocks."""
    kv_heads = k_cache.shape[1]
    k = k_cache.index_select(0, meta.pre_blocks).transpose(0, 1).flatten(1, 2)  # [kv_heads, NBp * bs, dim]
    v = v_cache.index_select(0, meta.pre_blocks).transpose(0, 1).flatten(1, 2)
    o = F.scaled_dot_product_attention(q.transpose(0, 1), k, v, attn_mask=meta.pre_mask, scale=scale,
                                       enable_gqa=q.shape[1] != kv_heads)
    return o.transpose(0, 1)
