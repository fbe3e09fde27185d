"""The model runner: owns the decoder and the KV cache, turns a scheduled batch into tensors and logits."""
from __future__ import annotations

import torch

from ..geometry import ModelGeometry
from .attention import StepInput, TorchAttention
from .config import EngineConfig
from .llama import LlamaForCausalLM
from .scheduler import Batch
from .weights import load_decoder_weights

GIB = 1 << 30


def pick_device_dtype(device: str, dtype: str, checkpoint_dtype: str) -> tuple[torch.device, torch.dtype]:
    dev = torch.device("cuda" if device == "auto" and torch.cuda.is_available() else
                       ("cpu" if device == "auto" else device))
    if dtype != "auto":
        return dev, getattr(torch, dtype)
    if dev.type == "cpu":
        return dev, torch.float32  # CPUs lack fast half matmuls, and fp32 keeps outputs exact
    return dev, {"bfloat16": torch.bfloat16}.get(checkpoint_dtype, torch.float16)


def make_attention(device: torch.device, block_size: int, geometry: ModelGeometry, dtype: torch.dtype):
    """FlashInfer on CUDA in fp16/bf16 when installed; the plain-torch implementation everywhere else."""
    if device.type == "cuda":
        from .attention_cuda import FlashInferAttention, flashinfer_available

        g = geometry.text
        if dtype in (torch.float16, torch.bfloat16) and flashinfer_available(g.head_dim):
            return FlashInferAttention(block_size, device, g.num_heads, g.num_kv_heads, g.head_dim, dtype)
    return TorchAttention(block_size, device)


class ModelRunner:
    def __init__(self, checkpoint: str, geometry: ModelGeometry, config: EngineConfig):
        self.geometry = geometry
        self.block_size = config.block_size
        self.device, self.dtype = pick_device_dtype(config.device, config.dtype, geometry.dtype)
        with torch.device(self.device):
            self.model = LlamaForCausalLM(geometry.text).to(self.dtype)
        load_decoder_weights(self.model, checkpoint)
        self.model.fuse()
        self.model.pack()
        self.model.eval()
        g = geometry.text
        self.num_blocks = config.num_kv_blocks or self._blocks_that_fit(config)
        self.max_model_len = min(config.max_model_len or geometry.max_model_len, geometry.max_model_len)
        self.attention = make_attention(self.device, self.block_size, geometry, self.dtype)
        self.kv_cache = self.attention.kv_cache(g.num_layers, self.num_blocks, g.num_kv_heads, g.head_dim, self.dtype)
        # Rows of rotary positions per token: 3 for M-RoPE (temporal, height, width), else 1.
        self.position_rows = 3 if g.mrope_section else 1
        self.graphs = None
        # Graphs recompute plain 1-D positions inside; M-RoPE positions come per sequence (see run).
        if config.cuda_graphs and self.position_rows == 1 and getattr(self.attention, "supports_graphs", False):
            from .cuda_graphs import DecodeGraphs

            with torch.inference_mode():
                self.graphs = DecodeGraphs(self, max_batch=config.max_num_seqs)

    def _block_bytes(self) -> int:
        g = self.geometry.text
        return 2 * g.num_layers * self.block_size * g.num_kv_heads * g.head_dim * self.dtype.itemsize

    def _blocks_that_fit(self, config: EngineConfig) -> int:
        if self.device.type == "cuda":
            free, _ = torch.cuda.mem_get_info(self.device)
            budget = free * config.kv_cache_free_gpu_mem_fraction
        else:
            budget = config.kv_cache_cpu_gib * GIB
        return max(1, int(budget // self._block_bytes()))

    @torch.inference_mode()
    def run(self, batch: Batch, all_rows_of: frozenset = frozenset()) -> torch.Tensor:
        """Compute the batch's new tokens; return logits [S, vocab] for the S sequences that reached their end,
        in batch order.

        For the batch positions in `all_rows_of`, the logits of every row they computed follow
        (prompt logprobs), in batch order.
        """
        # Decodes first: the attention backends take them as one batch, then the prefill chunks.
        order = sorted(range(len(batch.seqs)), key=lambda i: batch.num_new_tokens[i] != 1)
        seqs = [batch.seqs[i] for i in order]
        lens = [batch.num_new_tokens[i] for i in order]
        step = StepInput([s.num_computed for s in seqs], lens, [s.block_table for s in seqs],
                         num_decodes=sum(n == 1 for n in lens))
        ids, image_at, image_rows, last_row, all_rows, positions = [], [], [], {}, {}, []
        offset = 0
        for i, seq, n in zip(order, seqs, lens):
            start, end = seq.num_computed, seq.num_computed + n
            ids.extend(seq.token_ids[start:end])
            if self.position_rows > 1:
                positions.append(seq.positions_of(start, end, self.position_rows))
            if start < seq.prompt_len and seq.image_positions:
                at, rows = seq.image_rows_in(start, min(end, seq.prompt_len))
                if at:
                    image_at.extend(offset + p - start for p in at)
                    image_rows.append(seq.image_embeds[rows.start:rows.stop])
            if i in all_rows_of:
                all_rows[i] = range(offset, offset + n)
            offset += n
            if end == seq.num_tokens:
                last_row[i] = offset - 1
        dev = self.device
        embeds = self.model.embed_tokens(torch.tensor(ids, device=dev))
        if image_at:
            embeds[torch.tensor(image_at, device=dev)] = torch.cat(image_rows).to(dev, self.dtype)
        hidden = self.forward(embeds, step, torch.cat(positions, dim=1).to(dev) if positions else None)
        rows = [last_row[i] for i in sorted(last_row)] + [r for i in sorted(all_rows) for r in all_rows[i]]
        return self.model.logits(hidden[torch.tensor(rows, device=dev, dtype=torch.long)])

    def forward(self, embeds: torch.Tensor, step: StepInput, positions: torch.Tensor | None = None) -> torch.Tensor:
        """Hidden states [T, hidden] for the step's flat batch; all its metadata is built here, once.

        positions: [rows, T] when they are not the token indexes (M-RoPE)."""
        graph = self.graphs.get(step) if self.graphs else None
        if graph is not None:
            return graph.replay(embeds, step)
        meta = self.attention.prepare(step)
        return self.model(embeds, meta.positions if positions is None else positions, self.kv_cache, self.attention,
                          meta)
