"""Engine settings: one dataclass, read by the model runner, the scheduler and the Triton adapter."""
from __future__ import annotations

from dataclasses import dataclass


@dataclass
class EngineConfig:
    block_size: int = 8  # not 16: half the last-block waste (issue 8), no slower on CPU (bench roofline)
    max_num_seqs: int = 64
    max_num_batched_tokens: int = 2048  # the per-step token budget; longer prompts prefill in chunks
    max_num_waiting: int = 256  # requests queued but not yet running; beyond that add() raises EngineBusy
    max_model_len: int = 0  # 0: the checkpoint's
    num_kv_blocks: int = 0  # 0: size the cache from the memory settings below
    kv_cache_cpu_gib: float = 1.0
    kv_cache_free_gpu_mem_fraction: float = 0.9
    device: str = "auto"  # auto: cuda when present, else cpu
    dtype: str = "auto"  # auto: checkpoint's fp16/bf16 on cuda (fp16 if fp32), fp32 on cpu
    enable_prefix_caching: int = 1  # 1: reuse the KV of cached full blocks (prompt prefixes, images); 0: never
    cuda_graphs: int = 1  # on cuda: 1 replays captured graphs for decode-only steps, 0 runs them eagerly (an int:
    # the Triton adapter casts its string parameters by field type, and bool("0") is True)
