"""Turn one row of logits per sequence into the next token: greedy, temperature, top-k, top-p, seed."""
from __future__ import annotations

import torch

from .sequence import Sequence


def sample(logits: torch.Tensor, seqs: list[Sequence]) -> list[int | Exception]:
    """logits: [B, vocab], one row per sequence, in order.

    Each entry is the row's next token, or the exception sampling that row raised: one bad
    row fails its own request only.
    """
    tokens: list[int | Exception] = logits.argmax(dim=-1).tolist()  # greedy rows keep these
    for i, seq in enumerate(seqs):
        try:
            if not seq.params.greedy:
                tokens[i] = _sample_row(logits[i], seq)
        except Exception as e:  # noqa: BLE001  (reported per row by the engine)
            tokens[i] = e
    return tokens


def _sample_row(row: torch.Tensor, seq: Sequence) -> int:
    p = seq.params
    row = row.float() / p.temperature  # fp32: half-precision logits overflow at small temperatures
    if p.top_k > 0 and p.top_k < row.numel():
        kth = torch.topk(row, p.top_k).values[-1]
        row = row.masked_fill(row < kth, float("-inf"))
    probs = torch.softmax(row, dim=-1)
    if not torch.isfinite(probs).all():  # NaN logits, or a temperature that overflows them
        raise ValueError(f"probabilities are not finite (temperature {p.temperature})")
    if p.top_p < 1.0:
        sorted_probs, order = probs.sort(descending=True)
        # Keep the smallest prefix whose mass reaches top_p (the first token always stays).
        drop = sorted_probs.cumsum(-1) - sorted_probs >= p.top_p
        sorted_probs[drop] = 0.0
        probs = torch.zeros_like(probs).scatter_(0, order, sorted_probs)
    if seq.generator is None and p.seed is not None:
        seq.generator = torch.Generator(device=row.device).manual_seed(p.seed)
    return int(torch.multinomial(probs, 1, generator=seq.generator).item())
