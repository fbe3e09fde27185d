"""Attention over the paged KV cache, in plain torch (runs on CPU and CUDA alike).

The cache for one layer is a pair of tensors [num_blocks, block_size, kv_heads, head_dim].
A token's slot is block_table[pos // block_size] * block_size + pos % block_size.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F


@dataclass
class AttentionMetadata:
    """Everything attention needs about one step's flattened batch, built once per step."""

    slot_mapping: torch.Tensor  # [T] cache slot for each new token
    query_starts: list[int]  # offset of each sequence's new tokens in the flat batch
    query_lens: list[int]
    context_lens: list[int]  # tokens in the cache per sequence after this step
    context_lens_tensor: torch.Tensor  # the same, on the device, for the batched decode mask
    block_tables: torch.Tensor  # [B, max_blocks], padded with 0
    all_decode: bool  # every sequence adds exactly one token: take the batched path


def write_kv(k_cache: torch.Tensor, v_cache: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
             slot_mapping: torch.Tensor) -> None:
    k_cache.view(-1, *k_cache.shape[2:]).index_copy_(0, slot_mapping, k)
    v_cache.view(-1, *v_cache.shape[2:]).index_copy_(0, slot_mapping, v)


def paged_attention(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, meta: AttentionMetadata,
                    scale: float) -> torch.Tensor:
    """q: [T, heads, head_dim] -> [T, heads, head_dim], causal within each sequence."""
    if meta.all_decode:
        return _decode_attention(q, k_cache, v_cache, meta, scale)
    out = torch.empty_like(q)
    for i, (start, qlen, ctx) in enumerate(zip(meta.query_starts, meta.query_lens, meta.context_lens)):
        k, v = _gather(k_cache, v_cache, meta.block_tables[i], ctx)
        q_pos = torch.arange(ctx - qlen, ctx, device=q.device)
        mask = q_pos[:, None] >= torch.arange(ctx, device=q.device)[None, :]  # [qlen, ctx]
        o = F.scaled_dot_product_attention(q[start:start + qlen].transpose(0, 1), k.transpose(0, 1),
                                           v.transpose(0, 1), attn_mask=mask, scale=scale,
                                           enable_gqa=q.shape[1] != k.shape[1])
        out[start:start + qlen] = o.transpose(0, 1)
    return out


def _gather(k_cache, v_cache, block_table, ctx):
    nblocks = -(-ctx // k_cache.shape[1])
    blocks = block_table[:nblocks]
    k = k_cache[blocks].flatten(0, 1)[:ctx]
    v = v_cache[blocks].flatten(0, 1)[:ctx]
    return k, v


def _decode_attention(q, k_cache, v_cache, meta, scale):
    """One query per sequence: gather every context into a padded batch and attend at once."""
    bsz = q.shape[0]
    tables = meta.block_tables  # [B, max_blocks]
    k = k_cache[tables].flatten(1, 2)  # [B, max_blocks * block_size, kv_heads, head_dim]
    v = v_cache[tables].flatten(1, 2)
    mask = torch.arange(k.shape[1], device=q.device)[None, :] < meta.context_lens_tensor[:, None]  # [B, S]
    o = F.scaled_dot_product_attention(q.view(bsz, -1, 1, q.shape[-1]), k.transpose(1, 2), v.transpose(1, 2),
                                       attn_mask=mask[:, None, None, :], scale=scale,
                                       enable_gqa=q.shape[1] != k.shape[2])
    return o.view(bsz, -1, q.shape[-1])
