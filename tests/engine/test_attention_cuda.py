"""The CUDA side of the attention seam (FlashInfer) and decode CUDA graphs; skipped without a GPU."""
from __future__ import annotations

import pytest
import torch

from triton_vlm.engine.attention import StepInput, TorchAttention
from triton_vlm.engine.attention_cuda import flashinfer_available

pytestmark = [
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU (none on this machine)"),
    pytest.mark.skipif(not flashinfer_available(), reason="needs flashinfer-python (pip install triton-vlm[cuda])"),
]


def test_flashinfer_matches_torch_attention_on_a_mixed_batch():
    from triton_vlm.engine.attention_cuda import FlashInferAttention

    torch.manual_seed(0)
    dev, dtype, bs, heads, kv_heads, dim = torch.device("cuda"), torch.float16, 16, 8, 2, 64
    seqs = [(15, 1), (16, 1), (40, 1), (0, 33), (20, 7)]  # decodes at block boundaries, two prefill chunks
    tables, nxt = [], 3
    for s, n in seqs:
        k = -(-(s + n) // bs)
        tables.append(list(range(nxt, nxt + k)))
        nxt += k
    step = StepInput([s for s, _ in seqs], [n for _, n in seqs], tables, 3)
    fi = FlashInferAttention(bs, dev, heads, kv_heads, dim, dtype)
    th = TorchAttention(bs, dev)
    fi_cache = fi.kv_cache(1, 64, kv_heads, dim, dtype)[:, 0]
    th_cache = th.kv_cache(1, 64, kv_heads, dim, dtype)[:, 0]
    # Fill the cached prefixes: the same tokens through each backend's own write path.
    prefix = StepInput([0] * len(seqs), [s for s, _ in seqs], tables, 0)
    total = sum(prefix.lens)
    kp, vp = torch.randn(total, kv_heads, dim, device=dev, dtype=dtype), torch.randn(total, kv_heads, dim, device=dev,
                                                                                      dtype=dtype)
    qp = torch.randn(total, heads, dim, device=dev, dtype=dtype)
    fi.forward(qp, kp, vp, *fi_cache, fi.prepare(prefix), dim ** -0.5)
    th.forward(qp, kp, vp, *th_cache, th.prepare(prefix), dim ** -0.5)
    t = sum(step.lens)
    q = torch.randn(t, heads, dim, device=dev, dtype=dtype)
    k, v = torch.randn(t, kv_heads, dim, device=dev, dtype=dtype), torch.randn(t, kv_heads, dim, device=dev, dtype=dtype)
    a = fi.forward(q, k, v, *fi_cache, fi.prepare(step), dim ** -0.5)
    b = th.forward(q, k, v, *th_cache, th.prepare(step), dim ** -0.5)
    torch.testing.assert_close(a, b, atol=2e-3, rtol=2e-3)


def test_cuda_graph_decode_equals_eager_and_hf(tmp_path):
    from transformers import AutoModelForImageTextToText

    from triton_vlm.checkpoint import make_tiny
    from triton_vlm.engine.config import EngineConfig
    from triton_vlm.engine.llm_engine import LLMEngine
    from triton_vlm.engine.sampling_params import SamplingParams

    tiny_checkpoint = make_tiny(tmp_path / "hd64", hidden=128, heads=2, kv_heads=1, intermediate=256)  # head_dim 64
    prompts = [[1, 20 + i, 21, 22, 23 + i] * (1 + i) for i in range(5)]
    params = SamplingParams(max_tokens=16, temperature=0, ignore_eos=True)
    outs = {}
    for graphs in (True, False):
        engine = LLMEngine(str(tiny_checkpoint), EngineConfig(num_kv_blocks=128, device="cuda", dtype="float16",
                                                              max_num_seqs=8, cuda_graphs=graphs))
        assert (engine.runner.graphs is not None) == graphs
        outs[graphs] = engine.generate(prompts, params)
        engine.check()
    assert outs[True] == outs[False]
    hf = AutoModelForImageTextToText.from_pretrained(tiny_checkpoint, torch_dtype=torch.float16).cuda().eval()
    for p, ours in zip(prompts, outs[True]):
        ids = torch.tensor([p], device="cuda")
        ref = hf.generate(input_ids=ids, max_new_tokens=16, min_new_tokens=16, do_sample=False)[0, len(p):].tolist()
        assert ours == ref, "fp16 greedy differs from HF on CUDA (a near-tie, or a bug)"
