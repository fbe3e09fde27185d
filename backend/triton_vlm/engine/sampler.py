"""Turn one row of logits per sequence into the next token, for all rows in one batched pass.

Order (as vLLM's): allowed_token_ids, bad_words, min_tokens, the grammar mask, logit_bias and
penalties shape the logits; greedy rows take their argmax; the others are divided by their
temperature, filtered by top-k, top-p and min-p, and drawn by the exponential race
(argmax of p / E, E ~ Exp(1)), which samples p exactly. A seeded row draws its E from its own
generator, so its tokens do not depend on what else shares the batch.

Logprobs are of the raw model distribution (vLLM's default), for every row: the sampled token's
feeds cumulative_logprob; rows that ask get the top-k and the sampled token's rank.

Rows are prepared one by one in Python (plain data, no tensors); the tensor work is batched and
reads back to the host once. What breaks one row fails that row only.
"""
from __future__ import annotations

from typing import NamedTuple

import torch

from . import structured
from .sequence import Sequence

NEG_INF = float("-inf")


class Row(NamedTuple):
    """One sequence's sampling settings, as plain values."""
    temperature: float  # 1.0 for greedy rows: dividing does not change an argmax
    top_k: int  # vocab size when off
    top_p: float
    min_p: float
    greedy: bool
    generator: torch.Generator | None
    banned: list[int]  # bad words, and stop tokens before min_tokens
    logprobs: int  # top logprobs asked for; -1: none


class SampleOutput(NamedTuple):
    tokens: list[int | Exception]  # per row: the token, or the exception that row raised
    logprobs: list[float]  # the sampled token's raw logprob
    ranks: list[int | None]  # its rank (1 = most likely), for rows that asked for logprobs
    top: list[list[tuple[int, float]] | None]  # the row's top-k (token, logprob), for rows that asked


def sample(logits: torch.Tensor, seqs: list[Sequence], eos_ids: frozenset = frozenset()) -> SampleOutput:
    """logits: [B, vocab], one row per sequence, in order."""
    rows: list[Row | Exception] = []
    for seq in seqs:
        try:
            rows.append(_row(seq, logits.shape[-1], eos_ids))
        except Exception as e:  # noqa: BLE001  (reported per row by the engine)
            rows.append(e)
    good = [i for i, r in enumerate(rows) if not isinstance(r, Exception)]
    out = SampleOutput(list(rows), [0.0] * len(rows), [None] * len(rows), [None] * len(rows))
    if not good:
        return out
    # fp32: half-precision logits overflow at small temperatures. Nothing below writes into `sub`, so when every
    # row is good it is a view (rows past the sequences', prompt logprobs' own, are not ours).
    sub = (logits[:len(rows)] if len(good) == len(rows) else logits[good]).float()
    live = [rows[i] for i in good]
    live_seqs = [seqs[i] for i in good]
    dev = sub.device
    shaped = shape_logits(sub, live_seqs, live)
    tokens = shaped.max(dim=-1).indices  # the first maximum, as argmax; about twice as fast on CPU
    # Greedy rows (the common case) draw no noise and build no distribution.
    sampled = [j for j, r in enumerate(live) if not r.greedy]
    not_finite = torch.zeros(len(live), dtype=torch.bool, device=dev)
    if sampled:
        at = torch.tensor(sampled, device=dev)
        probs = probabilities(shaped[at], [live[j] for j in sampled])
        tokens[at] = _draw(probs, [live[j] for j in sampled])
        not_finite[at] = ~torch.isfinite(probs).all(dim=-1)
    # A row is broken if nothing is allowed; only rows with a mask can be.
    masked = [j for j, (r, s) in enumerate(zip(live, live_seqs)) if _masked(s, r)]
    masked_out = torch.zeros(len(live), dtype=torch.bool, device=dev)
    if masked:
        at = torch.tensor(masked, device=dev)
        masked_out[at] = torch.isneginf(shaped[at]).all(dim=-1)
    # The sampled token's raw logprob: x - logsumexp(x), without a full log_softmax per row.
    chosen = sub.gather(1, tokens[:, None]).squeeze(1) - torch.logsumexp(sub, dim=-1)
    ask = [j for j, r in enumerate(live) if r.logprobs >= 0]
    k = max((live[j].logprobs for j in ask), default=0)
    if ask:
        asked = torch.log_softmax(sub[ask], dim=-1)
        chosen[ask] = asked.gather(1, tokens[ask, None]).squeeze(1)  # the same numbers as its ranks and top
        ranks = (asked > chosen[ask, None]).sum(dim=-1) + 1
        top_lp, top_ids = asked.topk(k, dim=-1)
    # The one read-back to the host.
    t_list, lp_list, bad_mask, bad_prob = tokens.tolist(), chosen.tolist(), masked_out.tolist(), not_finite.tolist()
    if ask:
        rank_list, top_lp_list, top_id_list = ranks.tolist(), top_lp.tolist(), top_ids.tolist()
        for n, j in enumerate(ask):
            want = live[j].logprobs
            out.ranks[good[j]] = rank_list[n]
            out.top[good[j]] = list(zip(top_id_list[n][:want], top_lp_list[n][:want]))
    for j, i in enumerate(good):
        if bad_mask[j]:
            out.tokens[i] = ValueError("every token is masked (allowed_token_ids, bad_words, grammar)")
        elif bad_prob[j]:
            out.tokens[i] = ValueError(f"probabilities are not finite (temperature {live[j].temperature})")
        else:
            out.tokens[i] = t_list[j]
            out.logprobs[i] = lp_list[j]
    return out


def _row(seq: Sequence, vocab: int, eos_ids: frozenset) -> Row:
    p = seq.params
    greedy = p.greedy
    if not greedy and seq.generator is None and p.seed is not None:
        seq.generator = torch.Generator().manual_seed(_child_seed(p.seed, seq.index))
    banned = _banned_by_bad_words(seq)
    if seq.num_generated < p.min_tokens:
        banned.extend(p.stop_token_ids)
        if not p.ignore_eos:
            banned.extend(eos_ids)
    top_k = p.top_k if 0 < p.top_k < vocab else vocab
    return Row(1.0 if greedy else p.temperature, top_k, p.top_p, p.min_p, greedy, seq.generator,
               [t for t in banned if 0 <= t < vocab], -1 if p.logprobs is None else p.logprobs)


def _child_seed(seed: int, index: int) -> int:
    """Completion i of a seeded request uses seed + i (wrapped into the seed range)."""
    if index == 0:
        return seed
    s = seed + index
    return s - 2**64 if s > 2**64 - 1 else s


def _banned_by_bad_words(seq: Sequence) -> list[int]:
    """A bad word's last token is banned when the output so far ends with the rest of it."""
    out = seq.generated_ids
    banned = []
    for word in seq.bad_word_ids:
        head = word[:-1]
        if not head or out[len(out) - len(head):] == head and len(out) >= len(head):
            banned.append(word[-1])
    return banned


def _masked(seq: Sequence, row: Row) -> bool:
    """Whether some tokens of this row are masked or biased (and so the row can end up all -inf)."""
    return bool(row.banned or seq.params.allowed_token_ids or seq.matcher is not None or seq.params.logit_bias)


def _penalised(p) -> bool:
    return p.repetition_penalty != 1.0 or p.frequency_penalty != 0.0 or p.presence_penalty != 0.0


def shape_logits(logits: torch.Tensor, seqs: list[Sequence], rows: list[Row]) -> torch.Tensor:
    """Masks, logit bias and penalties, all rows at once: what greedy rows take the argmax of.

    Returns `logits` itself, unwritten, when no row shapes anything; else a shaped copy."""
    if not any(_masked(s, r) or _penalised(s.params) for s, r in zip(seqs, rows)):
        return logits
    x = logits.clone()
    vocab = x.shape[-1]
    dev = x.device
    allowed = [(j, s.params.allowed_token_ids) for j, s in enumerate(seqs) if s.params.allowed_token_ids]
    if allowed:
        keep = torch.zeros(len(allowed), vocab, dtype=torch.bool, device=dev)
        r = [n for n, (_, ids) in enumerate(allowed) for _ in ids]
        c = [t for _, ids in allowed for t in ids]
        keep[r, c] = True
        js = [j for j, _ in allowed]
        x[js] = x[js].masked_fill(~keep, NEG_INF)
    constrained = [j for j, s in enumerate(seqs) if s.matcher is not None]
    if constrained:
        ok = structured.allowed_mask([seqs[j].matcher for j in constrained], vocab).to(dev)
        x[constrained] = x[constrained].masked_fill(~ok, NEG_INF)
    r = [j for j, row in enumerate(rows) for _ in row.banned]
    if r:
        x[r, [t for row in rows for t in row.banned]] = NEG_INF
    bias = [(j, t, b) for j, s in enumerate(seqs) for t, b in (s.params.logit_bias or {}).items() if t < vocab]
    if bias:
        r, c, b = zip(*bias)
        x.index_put_((torch.tensor(r, device=dev), torch.tensor(c, device=dev)), torch.tensor(b, device=dev),
                     accumulate=True)
    _penalties(x, seqs)
    return x


def _penalties(x: torch.Tensor, seqs: list[Sequence]) -> None:
    """vLLM's: repetition over prompt and output tokens; frequency and presence over output counts."""
    rows = [j for j, s in enumerate(seqs) if _penalised(s.params)]
    if not rows:
        return
    vocab, dev = x.shape[-1], x.device
    counts = torch.zeros(len(rows) * vocab, device=dev)
    seen = torch.zeros(len(rows) * vocab, dtype=torch.bool, device=dev)
    out_flat = [n * vocab + t for n, j in enumerate(rows) for t in seqs[j].generated_ids if t < vocab]
    all_flat = [n * vocab + t for n, j in enumerate(rows) for t in seqs[j].token_ids if t < vocab]
    if out_flat:
        counts.index_add_(0, torch.tensor(out_flat, device=dev), torch.ones(len(out_flat), device=dev))
    seen[torch.tensor(all_flat, dtype=torch.long, device=dev)] = True
    counts, seen = counts.view(len(rows), vocab), seen.view(len(rows), vocab)
    p = [seqs[j].params for j in rows]
    rep = torch.tensor([q.repetition_penalty for q in p], device=dev)[:, None]
    freq = torch.tensor([q.frequency_penalty for q in p], device=dev)[:, None]
    pres = torch.tensor([q.presence_penalty for q in p], device=dev)[:, None]
    sub = x[rows]
    sub = torch.where(seen, torch.where(sub > 0, sub / rep, sub * rep), sub)
    sub = sub - freq * counts - pres * (counts > 0)
    x[rows] = sub


def probabilities(shaped: torch.Tensor, rows: list[Row]) -> torch.Tensor:
    """Temperature, top-k, top-p and min-p over all rows: the distribution sampled rows draw from."""
    dev = shaped.device
    vocab = shaped.shape[-1]
    x = shaped / torch.tensor([r.temperature for r in rows], device=dev)[:, None]
    if any(r.top_k < vocab or r.top_p < 1.0 for r in rows):
        ordered, order = x.sort(dim=-1, descending=True)
        k = torch.tensor([r.top_k for r in rows], device=dev)[:, None]
        ordered = ordered.masked_fill(torch.arange(vocab, device=dev)[None] >= k, NEG_INF)
        p = ordered.softmax(dim=-1)
        # Keep the smallest prefix whose mass reaches top_p (the first token always stays).
        top_p = torch.tensor([r.top_p for r in rows], device=dev)[:, None]
        ordered = ordered.masked_fill(p.cumsum(dim=-1) - p >= top_p, NEG_INF)
        x = torch.empty_like(x).scatter_(-1, order, ordered)
    probs = x.softmax(dim=-1)
    if any(r.min_p > 0 for r in rows):
        min_p = torch.tensor([r.min_p for r in rows], device=dev)[:, None]
        probs = probs.masked_fill(probs < min_p * probs.max(dim=-1, keepdim=True).values, 0.0)
        probs = probs / probs.sum(dim=-1, keepdim=True)
    return probs


def _draw(probs: torch.Tensor, rows: list[Row]) -> torch.Tensor:
    """One token per row by the exponential race; seeded rows draw their noise from their own generator."""
    noise = torch.empty_like(probs).exponential_()
    for j, r in enumerate(rows):
        if r.generator is not None:
            noise[j] = torch.empty(probs.shape[-1]).exponential_(generator=r.generator).to(probs.device)
    return (probs / noise.clamp_(min=1e-30)).argmax(dim=-1)  # a 0 draw would make 0 / 0 = NaN win
