"""Per-completion state inside the engine: tokens, KV progress, block table, text and logprobs so far.

A request with `n` completions has n sequences with the same request_id and indexes 0..n-1; the
children share the prompt's full KV blocks with the first one (block ref counts).

Prefix caching keys each full block of tokens by a chained hash (see `block_hashes`): the parent
block's hash, the block's token ids and, for each image whose rows the block holds, the image's
content hash and the block's offset inside that image's rows. Image placeholders all share one
token id, so without the image hash two different images would share KV.
"""
from __future__ import annotations

import bisect
import enum
import hashlib
import struct
import time
from dataclasses import dataclass, field
from typing import Any, NamedTuple

import torch

from .sampling_params import SamplingParams


class Status(enum.Enum):
    WAITING = "waiting"
    RUNNING = "running"
    FINISHED = "finished"


class ImageSpan(NamedTuple):
    """One image's rows in `image_embeds` (and `image_positions`): where they start, how many, and the
    image's content hash (a cryptographic one: a cache hit cannot be checked against the pixels)."""
    first_row: int
    num_rows: int
    hash: bytes


@dataclass(eq=False)
class Sequence:
    request_id: str
    token_ids: list[int]
    params: SamplingParams
    # Rows to place at the prompt's image-placeholder positions, in order ([rows, hidden]).
    image_embeds: torch.Tensor | None = None
    image_positions: list[int] = field(default_factory=list)
    image_spans: list[ImageSpan] = field(default_factory=list)  # in row order, covering every row
    # Rotary positions of the prompt's tokens when they are not their indexes ([rows, prompt_len], e.g. the
    # 3 rows of M-RoPE); every later token p sits at p + position_delta in each row. None: positions = indexes.
    positions: torch.Tensor | None = None
    position_delta: int = 0
    prompt_len: int = 0
    block_table: list[int] = field(default_factory=list)
    num_computed: int = 0  # tokens whose K/V sit in the cache
    # Prefix caching: the chained hash of each full block of token_ids so far (they outlive preemption),
    # how many of block_table's blocks are registered in the pool's hash map (or were found there), and
    # how many prompt tokens the first admission found cached.
    block_hashes: list[bytes] = field(default_factory=list)
    num_cached_blocks: int = 0
    num_cached_tokens: int = 0
    status: Status = Status.WAITING
    finish_reason: str | None = None
    generator: torch.Generator | None = None
    num_sent: int = 0  # generated tokens already handed to the caller
    emitted_at: float = field(default_factory=time.monotonic)  # when the caller last heard of it
    # For the engine's latency figures (IterationStats), all time.monotonic().
    arrival_time: float = field(default_factory=time.monotonic)  # set again when added to the engine
    scheduled_at: float | None = None  # first scheduled
    last_token_at: float | None = None
    index: int = 0  # which of the request's n completions
    forked: bool = False  # the n - 1 other completions exist (made once the prompt is in the cache)
    # Text: the detokenizer, the output text so far (cut at a stop string) and how much was sent.
    detokenizer: Any = None
    text: str = ""
    text_sent: int = 0
    checked_text: int = 0  # text already searched for stop strings
    stopped_by_string: bool = False
    # Logprobs: the sampled tokens' sum, and per token {token_id: (logprob, rank, decoded)} when asked for.
    cumulative_logprob: float = 0.0
    logprobs: list[dict] = field(default_factory=list)
    logprobs_sent: int = 0
    prompt_logprobs: list | None = None  # [None, {token_id: (logprob, rank, decoded)}, ...] as far as computed
    prompt_logprobs_sent: bool = False
    bad_word_ids: list[list[int]] = field(default_factory=list)  # each bad word as token ids
    matcher: Any = None  # structured outputs: the grammar's state (llguidance.LLMatcher)

    def __post_init__(self):
        self.prompt_len = self.prompt_len or len(self.token_ids)

    @property
    def num_tokens(self) -> int:
        return len(self.token_ids)

    @property
    def num_generated(self) -> int:
        return len(self.token_ids) - self.prompt_len

    @property
    def generated_ids(self) -> list[int]:
        return self.token_ids[self.prompt_len:]

    def positions_of(self, start: int, end: int, rows: int) -> torch.Tensor:
        """Rotary positions [rows, end - start] of tokens start..end-1."""
        if self.positions is None:
            return torch.arange(start, end).expand(rows, -1)
        cut = min(max(start, self.prompt_len), end)
        later = torch.arange(cut, end) + self.position_delta
        return torch.cat([self.positions[:, start:cut], later.expand(rows, -1)], dim=1)

    def image_rows_in(self, start: int, end: int) -> tuple[list[int], range]:
        """Positions in [start, end) that hold image rows, and which rows they take."""
        lo = bisect.bisect_left(self.image_positions, start)
        hi = bisect.bisect_left(self.image_positions, end)
        return self.image_positions[lo:hi], range(lo, hi)

    def full_block_hashes(self, block_size: int) -> list[bytes]:
        """The chained hash of every full block of token_ids, extending those computed before."""
        while (len(self.block_hashes) + 1) * block_size <= self.num_tokens:
            i = len(self.block_hashes)
            parent = self.block_hashes[-1] if self.block_hashes else b""
            start, end = i * block_size, (i + 1) * block_size
            h = hashlib.sha256(parent)
            h.update(struct.pack(f"<{block_size}q", *self.token_ids[start:end]))
            for span_hash, offset in self._image_keys(start, end):
                h.update(span_hash)
                h.update(struct.pack("<q", offset))
            self.block_hashes.append(h.digest())
        return self.block_hashes

    def _image_keys(self, start: int, end: int) -> list[tuple[bytes, int]]:
        """(content hash, offset of the block's first row inside that image) for each image in [start, end)."""
        if not self.image_spans or start >= self.prompt_len:
            return []
        _, rows = self.image_rows_in(start, min(end, self.prompt_len))
        if not rows:  # earlier images reach this block through the parent hash
            return []
        return [(s.hash, max(rows.start - s.first_row, 0)) for s in self.image_spans
                if s.first_row < rows.stop and rows.start < s.first_row + s.num_rows]
