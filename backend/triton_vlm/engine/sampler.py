"""Turn one row of logits per sequence into the next token: greedy, temperature, top-k, top-p, seed."""
from __future__ import annotations

import torch

from .sequence import Sequence


def sample(logits: torch.Tensor, seqs: list[Sequence]) -> list[int]:
    """logits: [B, vocab] float32, one row per sequence, in order."""
    tokens = logits.argmax(dim=-1).tolist()  # greedy rows keep these
    for i, seq in enumerate(seqs):
        if not seq.params.greedy:
            tokens[i] = _sample_row(logits[i], seq)
    return tokens


def _sample_row(row: torch.Tensor, seq: Sequence) -> int:
    p = seq.params
    row = row / p.temperature
    if p.top_k > 0 and p.top_k < row.numel():
        kth = torch.topk(row, p.top_k).values[-1]
        row = row.masked_fill(row < kth, float("-inf"))
    probs = torch.softmax(row, dim=-1)
    if p.top_p < 1.0:
        sorted_probs, order = probs.sort(descending=True)
        # Keep the smallest prefix whose mass reaches top_p (the first token always stays).
        drop = sorted_probs.cumsum(-1) - sorted_probs >= p.top_p
        sorted_probs[drop] = 0.0
        probs = torch.zeros_like(probs).scatter_(0, order, sorted_probs)
    if seq.generator is None and p.seed is not None:
        seq.generator = torch.Generator(device=row.device).manual_seed(p.seed)
    return int(torch.multinomial(probs, 1, generator=seq.generator).item())
