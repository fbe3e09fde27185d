"""The model runner: owns the decoder and the KV cache, turns a scheduled batch into tensors and logits."""
from __future__ import annotations

import torch

from ..geometry import ModelGeometry
from .attention import AttentionMetadata
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


class ModelRunner:
    def __init__(self, checkpoint: str, geometry: ModelGeometry, config: EngineConfig):
        self.geometry = geometry
        self.block_size = config.block_size
        self.device, self.dtype = pick_device_dtype(config.device, config.dtype, geometry.dtype)
        with torch.device(self.device):
            self.model = LlamaForCausalLM(geometry.text).to(self.dtype)
        load_decoder_weights(self.model, checkpoint)
        self.model.eval()
        g = geometry.text
        self.num_blocks = config.num_kv_blocks or self._blocks_that_fit(config)
        self.kv_cache = torch.zeros(2, g.num_layers, self.num_blocks, self.block_size, g.num_kv_heads, g.head_dim,
                                    dtype=self.dtype, device=self.device)

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
        """Compute the batch's new tokens; return logits [S, vocab] for the S sequences that reached their end.

        For the batch positions in `all_rows_of`, the logits of every row they computed follow
        (prompt logprobs), in batch order.
        """
        ids, positions, slots, logit_rows, extra_rows = [], [], [], [], []
        image_at, image_rows = [], []
        bs = self.block_size
        offset = 0
        for i, (seq, n) in enumerate(zip(batch.seqs, batch.num_new_tokens)):
            start, end = seq.num_computed, seq.num_computed + n
            if i in all_rows_of:
                extra_rows.extend(range(offset, offset + n))
            ids.extend(seq.token_ids[start:end])
            pos = torch.arange(start, end)
            table = torch.tensor(seq.block_table)
            positions.append(pos)
            slots.append(table[pos // bs] * bs + pos % bs)
            at, rows = seq.image_rows_in(start, min(end, seq.prompt_len))
            if at:
                image_at.extend(offset + p - start for p in at)
                image_rows.append(seq.image_embeds[rows.start:rows.stop])
            offset += n
            if end == seq.num_tokens:
                logit_rows.append(offset - 1)
        dev = self.device
        embeds = self.model.embed_tokens(torch.tensor(ids, device=dev))
        if image_at:
            embeds[torch.tensor(image_at, device=dev)] = torch.cat(image_rows).to(dev, self.dtype)
        meta = self._metadata(batch, torch.cat(slots).to(dev))
        hidden = self.model(embeds, torch.cat(positions).to(dev), self.kv_cache, meta)
        return self.model.logits(hidden[torch.tensor(logit_rows + extra_rows, device=dev, dtype=torch.long)])

    def _metadata(self, batch: Batch, slot_mapping: torch.Tensor) -> AttentionMetadata:
        starts, ctx_lens = [], []
        offset = 0
        for seq, n in zip(batch.seqs, batch.num_new_tokens):
            starts.append(offset)
            ctx_lens.append(seq.num_computed + n)
            offset += n
        width = max(len(s.block_table) for s in batch.seqs)
        tables = torch.zeros(len(batch.seqs), width, dtype=torch.long)
        for i, seq in enumerate(batch.seqs):
            tables[i, :len(seq.block_table)] = torch.tensor(seq.block_table)
        return AttentionMetadata(slot_mapping=slot_mapping, query_starts=starts, query_lens=list(batch.num_new_tokens),
                                 context_lens=ctx_lens, context_lens_tensor=torch.tensor(ctx_lens, device=self.device),
                                 block_tables=tables.to(self.device),
                                 all_decode=all(n == 1 for n in batch.num_new_tokens))
