"""Paged attention on CUDA with FlashInfer: its kernels read the block table directly (the CUDA side of the seam).

Same interface as attention.py's TorchAttention (`kv_cache`, `prepare`, `forward`). The cache is FlashInfer's
NHD layout, per layer [num_blocks + 1, block_size, kv_heads, head_dim]: the extra last block is scratch that
padded rows of a CUDA-graph batch write to and read from, so real blocks are never touched by padding.
`prepare` plans both wrappers once per step; every layer then reuses the plan.
Install with the `cuda` extra (`pip install triton-vlm[cuda]`, i.e. flashinfer-python).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from .attention import StepInput, blocks_in_use, step_positions, step_slots

WORKSPACE_BYTES = 128 << 20
HEAD_DIMS = (64, 128, 256)  # what FlashInfer's prebuilt kernels cover; others take the torch path


def flashinfer_available(head_dim: int = 128) -> bool:
    if head_dim not in HEAD_DIMS:
        return False
    try:
        import flashinfer  # noqa: F401
    except ImportError:
        return False
    return True


class PagedTables:
    """FlashInfer's CSR form of block tables: indptr [B + 1], indices [blocks], last_page_len [B] (int32)."""

    def __init__(self, tables: list[list[int]], context_lens: list[int], block_size: int):
        indptr = [0]
        for t in tables:
            indptr.append(indptr[-1] + len(t))
        self.indptr = torch.tensor(indptr, dtype=torch.int32)
        self.indices = torch.tensor([b for t in tables for b in t], dtype=torch.int32)
        self.last_page_len = torch.tensor([(n - 1) % block_size + 1 for n in context_lens], dtype=torch.int32)


@dataclass
class FlashInferMetadata:
    positions: torch.Tensor
    slot_mapping: torch.Tensor
    num_decodes: int
    decode: object | None  # a planned BatchDecodeWithPagedKVCacheWrapper, when the step has decodes
    prefill: object | None  # a planned BatchPrefillWithPagedKVCacheWrapper, when it has prefill chunks


class FlashInferAttention:
    supports_graphs = True

    def __init__(self, block_size: int, device: torch.device, heads: int, kv_heads: int, head_dim: int,
                 dtype: torch.dtype):
        import flashinfer

        self.block_size, self.device = block_size, device
        self.heads, self.kv_heads, self.head_dim, self.dtype = heads, kv_heads, head_dim, dtype
        self.workspace = torch.empty(WORKSPACE_BYTES, dtype=torch.uint8, device=device)
        self.decode = flashinfer.BatchDecodeWithPagedKVCacheWrapper(self.workspace, "NHD")
        self.prefill = flashinfer.BatchPrefillWithPagedKVCacheWrapper(self.workspace, "NHD")
        self.pad_block = -1  # set by kv_cache

    def kv_cache(self, num_layers: int, num_blocks: int, kv_heads: int, head_dim: int,
                 dtype: torch.dtype) -> torch.Tensor:
        self.pad_block = num_blocks
        return torch.zeros(2, num_layers, num_blocks + 1, self.block_size, kv_heads, head_dim, dtype=dtype,
                           device=self.device)

    def plan_decode(self, wrapper, tables: PagedTables) -> None:
        wrapper.plan(tables.indptr.to(self.device), tables.indices.to(self.device),
                     tables.last_page_len.to(self.device), self.heads, self.kv_heads, self.head_dim, self.block_size,
                     pos_encoding_mode="NONE", q_data_type=self.dtype, kv_data_type=self.dtype,
                     sm_scale=self.head_dim ** -0.5)

    def prepare(self, step: StepInput) -> FlashInferMetadata:
        bs, nd, n = self.block_size, step.num_decodes, len(step.lens)
        ctx = [s + q for s, q in zip(step.starts, step.lens)]
        decode = prefill = None
        if nd:
            self.plan_decode(self.decode, PagedTables(blocks_in_use(step, 0, nd, bs), ctx[:nd], bs))
            decode = self.decode
        if nd < n:
            tables = PagedTables(blocks_in_use(step, nd, n, bs), ctx[nd:], bs)
            qo = [0]
            for q in step.lens[nd:]:
                qo.append(qo[-1] + q)
            self.prefill.plan(torch.tensor(qo, dtype=torch.int32, device=self.device), tables.indptr.to(self.device),
                              tables.indices.to(self.device), tables.last_page_len.to(self.device), self.heads,
                              self.kv_heads, self.head_dim, bs, causal=True, pos_encoding_mode="NONE",
                              q_data_type=self.dtype, kv_data_type=self.dtype, sm_scale=self.head_dim ** -0.5)
            prefill = self.prefill
        put = lambda x: torch.tensor(x, dtype=torch.long).to(self.device, non_blocking=True)  # noqa: E731
        return FlashInferMetadata(put(step_positions(step)), put(step_slots(step, bs)), nd, decode, prefill)

    def forward(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, k_cache: torch.Tensor,
                v_cache: torch.Tensor, meta: FlashInferMetadata, scale: float) -> torch.Tensor:
        # Writing by slot is a fixed-shape scatter: it records into a CUDA graph as it is.
        k_cache.view(-1, *k_cache.shape[2:]).index_copy_(0, meta.slot_mapping, k)
        v_cache.view(-1, *v_cache.shape[2:]).index_copy_(0, meta.slot_mapping, v)
        nd = meta.num_decodes
        parts = []
        if meta.decode is not None:
            parts.append(meta.decode.run(q[:nd], (k_cache, v_cache)))
        if meta.prefill is not None:
            parts.append(meta.prefill.run(q[nd:], (k_cache, v_cache)))
        return parts[0] if len(parts) == 1 else torch.cat(parts)
