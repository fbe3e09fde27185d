"""Paged attention (the CPU backend, with and without its compiled decode kernel) against dense causal
attention, on ragged mixed batches."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from triton_vlm.engine import cpu_kernel
from triton_vlm.engine.attention import StepInput, TorchAttention, write_kv
from triton_vlm.engine.block_pool import BlockPool

BLOCK = 4
KERNEL = pytest.param(True, id="kernel", marks=pytest.mark.skipif(
    cpu_kernel.load() is None, reason="no C compiler here: the compiled decode kernel cannot be built"))
DECODE_PATHS = [pytest.param(False, id="torch"), KERNEL]


def dense_reference(q, k_all, v_all, start, n, scale):
    """q [n, heads, dim] at positions start..start+n-1 over k/v [start+n, kv_heads, dim], causal."""
    group = q.shape[1] // k_all.shape[1]
    k = k_all.repeat_interleave(group, dim=1)
    v = v_all.repeat_interleave(group, dim=1)
    scores = torch.einsum("qhd,khd->hqk", q.double(), k.double()) * scale
    visible = torch.arange(start, start + n)[:, None] >= torch.arange(start + n)[None, :]
    probs = scores.masked_fill(~visible, float("-inf")).softmax(-1)
    return torch.einsum("hqk,khd->qhd", probs, v.double()).float()


def run_step(seqs: list[tuple[int, int]], heads: int, kv_heads: int, dim: int = 8, num_blocks: int = 64,
             use_kernel: bool = False):
    """seqs: (tokens already cached, new tokens), decodes (n == 1) first. Returns (paged, dense) outputs."""
    torch.manual_seed(0)
    backend = TorchAttention(BLOCK, torch.device("cpu"), use_kernel)
    k_cache, v_cache = backend.kv_cache(1, num_blocks, kv_heads, dim, torch.float32)[:, 0]
    assert (backend.kernel is not None) == use_kernel
    pool = BlockPool(num_blocks)
    pool.allocate(7)  # so tables do not start at block 0
    tables, full_k, full_v = [], [], []
    for start, n in seqs:
        tables.append(pool.allocate(-(-(start + n) // BLOCK)))
        full_k.append(torch.randn(start + n, kv_heads, dim))
        full_v.append(torch.randn(start + n, kv_heads, dim))
    # The cached part, written by an earlier prefill step.
    cached = [i for i, (s, _) in enumerate(seqs) if s]
    if cached:
        prefix = StepInput([0] * len(cached), [seqs[i][0] for i in cached], [tables[i] for i in cached], 0)
        k_old = torch.cat([full_k[i][:seqs[i][0]] for i in cached])
        v_old = torch.cat([full_v[i][:seqs[i][0]] for i in cached])
        backend.forward(torch.randn(len(k_old), heads, dim), k_old, v_old, k_cache, v_cache, backend.prepare(prefix),
                        1.0)
    step = StepInput([s for s, _ in seqs], [n for _, n in seqs], tables, sum(n == 1 for _, n in seqs))
    q = torch.randn(sum(step.lens), heads, dim)
    k_new = torch.cat([k[s:] for k, (s, _) in zip(full_k, seqs)])
    v_new = torch.cat([v[s:] for v, (s, _) in zip(full_v, seqs)])
    scale = dim ** -0.5
    meta = backend.prepare(step)
    out = backend.forward(q, k_new, v_new, k_cache, v_cache, meta, scale)
    expected, offset = [], 0
    for (start, n), k, v in zip(seqs, full_k, full_v):
        expected.append(dense_reference(q[offset:offset + n], k, v, start, n, scale))
        offset += n
    for table in tables:
        pool.free(table)
    pool.free(range(7))
    pool.check([])
    return out, torch.cat(expected), meta


@pytest.mark.parametrize("use_kernel", DECODE_PATHS)
@pytest.mark.parametrize("heads,kv_heads", [(4, 4), (8, 2), (6, 1)])
def test_mixed_decodes_and_prefill_chunks_match_dense(heads, kv_heads, use_kernel):
    # Decodes at block boundaries (context 4, 5, 8, 1) and in the middle; prefill chunks that start at 0,
    # mid-block and on a boundary, one of them a whole prompt of one block.
    seqs = [(3, 1), (4, 1), (7, 1), (0, 1), (13, 1), (0, 9), (6, 5), (8, 4), (0, 4)]
    out, expected, meta = run_step(seqs, heads, kv_heads, use_kernel=use_kernel)
    assert meta.num_decodes == 5
    torch.testing.assert_close(out, expected, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("use_kernel", DECODE_PATHS)
@pytest.mark.parametrize("dim", [64, 128, 24])  # the kernel's two specialised head sizes and its general loop
def test_decode_only_batch_matches_dense(use_kernel, dim):
    seqs = [(s, 1) for s in (0, 3, 4, 15, 16, 31, 2)]
    out, expected, meta = run_step(seqs, 8, 2, dim=dim, use_kernel=use_kernel)
    assert meta.num_decodes == len(seqs) and meta.pre_mask.numel() == 0
    torch.testing.assert_close(out, expected, atol=1e-5, rtol=1e-5)


def test_prefill_only_batch_matches_dense():
    out, expected, meta = run_step([(0, 17), (5, 3), (12, 12)], 4, 2)
    assert meta.num_decodes == 0 and meta.dec_blocks.numel() == 0
    torch.testing.assert_close(out, expected, atol=1e-5, rtol=1e-5)


def test_metadata_is_o_of_live_blocks():
    # Two decodes, one long and one short: the short one gathers only its own block, never padding.
    _, _, meta = run_step([(40, 1), (1, 1)], 4, 4)
    assert meta.dec_tables.numel() == 0
    assert meta.dec_blocks.numel() == 11 + 1
    assert meta.dec_block_row.tolist() == [0] * 11 + [1]
    # The last block of the long decode holds 1 live token (position 40), the short one 2.
    assert torch.isinf(meta.dec_block_bias[10, 0, 0]).tolist() == [False, True, True, True]
    assert torch.isinf(meta.dec_block_bias[11, 0, 0]).tolist() == [False, False, True, True]


@pytest.mark.parametrize("use_kernel", [KERNEL])
def test_kernel_metadata_is_the_tables_in_use(use_kernel):
    # The kernel reads blocks in place: it is given each decode's blocks in use and its context, no gather.
    _, _, meta = run_step([(40, 1), (1, 1), (3, 1)], 4, 4, use_kernel=True)
    assert meta.dec_offsets.tolist() == [0, 11, 12, 13] and meta.dec_context.tolist() == [41, 2, 4]
    assert meta.dec_tables.tolist()[:11] == list(range(7, 18)) and meta.dec_blocks.numel() == 0


def test_write_kv_puts_each_token_in_its_slot():
    backend = TorchAttention(BLOCK, torch.device("cpu"))
    k_cache, v_cache = backend.kv_cache(1, 4, 2, 3, torch.float32)[:, 0]
    k = torch.arange(1, 2 * 2 * 3 + 1, dtype=torch.float32).view(2, 2, 3)
    # Position 1 of a sequence in block 1 (slot 5), position 6 of one whose second block is 3 (slot 14).
    meta = backend.prepare(StepInput([1, 6], [1, 1], [[1], [0, 3]], 2))
    assert meta.slot_mapping.tolist() == [5, 14]
    write_kv(k_cache, v_cache, k, -k, meta.cache_rows)
    assert torch.equal(k_cache[1, :, 1], k[0]) and torch.equal(k_cache[3, :, 2], k[1])
    assert torch.equal(v_cache[3, :, 2], -k[1])
    assert int((k_cache != 0).sum()) == int((k != 0).sum())


def test_sdpa_reference_agrees_with_dense_reference():
    # The reference itself against torch's SDPA on one causal sequence, so a wrong reference cannot hide.
    torch.manual_seed(1)
    q, k, v = torch.randn(6, 4, 8), torch.randn(6, 2, 8), torch.randn(6, 2, 8)
    sdpa = F.scaled_dot_product_attention(q.transpose(0, 1), k.transpose(0, 1), v.transpose(0, 1), is_causal=True,
                                          enable_gqa=True).transpose(0, 1)
    torch.testing.assert_close(dense_reference(q, k, v, 0, 6, 8 ** -0.5), sdpa, atol=1e-5, rtol=1e-5)
