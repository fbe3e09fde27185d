"""The engine: requests in, tokens out, every in-flight request batched continuously.

`step()` runs one scheduler decision through the model. `start()` runs steps on a
background thread; `add_request` and `abort` may be called from any thread.
"""
from __future__ import annotations

import itertools
import logging
import queue
import threading
import time
from typing import Callable, NamedTuple

import torch

from ..geometry import ModelGeometry
from .block_pool import BlockPool
from .config import EngineConfig
from .model_runner import ModelRunner
from .sampler import sample
from .sampling_params import SamplingParams
from .scheduler import Scheduler, SchedulerConfig
from .sequence import Sequence, Status

log = logging.getLogger(__name__)
CANCEL_CHECK_INTERVAL_S = 0.05


class RequestOutput(NamedTuple):
    request_id: str
    new_token_ids: list[int]
    finished: bool
    finish_reason: str | None = None  # "stop", "length", "abort" or "error"
    error: str | None = None


class EngineStats(NamedTuple):
    kv_blocks_used: int
    kv_blocks_total: int
    num_running: int
    num_waiting: int
    num_preemptions: int


OutputCallback = Callable[[RequestOutput], None]


class Live(NamedTuple):
    """A request the engine owns: its sequence and how to reach its caller."""

    seq: Sequence
    on_output: OutputCallback
    is_cancelled: Callable[[], bool] | None


class LLMEngine:
    def __init__(self, checkpoint: str, config: EngineConfig | None = None):
        self.config = config = config or EngineConfig()
        self.geometry = ModelGeometry.from_checkpoint(checkpoint)
        self.runner = ModelRunner(checkpoint, self.geometry, config)
        self.pool = BlockPool(self.runner.num_blocks)
        max_len = min(config.max_model_len or self.geometry.max_model_len, self.geometry.max_model_len)
        self.scheduler = Scheduler(SchedulerConfig(config.block_size, config.max_num_seqs,
                                                   config.max_num_batched_tokens, max_len), self.pool)
        self.eos_ids = frozenset(self.geometry.eos_token_ids)
        self._live: dict[str, Live] = {}
        self._inbox: queue.SimpleQueue = queue.SimpleQueue()
        self._wake = threading.Event()
        self._thread: threading.Thread | None = None
        self._stopping = False
        self._ids = itertools.count()
        self.on_step: Callable[[EngineStats], None] | None = None  # e.g. to export metrics
        self._next_cancel_check = 0.0

    # ---- the public surface -------------------------------------------------
    def new_request_id(self) -> str:
        return f"req-{next(self._ids)}"

    def make_sequence(self, request_id: str, prompt_ids: list[int], params: SamplingParams,
                      image_embeds: torch.Tensor | None = None) -> Sequence:
        """Validate a request and build its sequence; raises ValueError naming the bad field."""
        vocab = self.geometry.text.vocab_size
        if not prompt_ids:
            raise ValueError("input_ids: empty prompt")
        bad = next((t for t in prompt_ids if not 0 <= t < vocab), None)
        if bad is not None:
            raise ValueError(f"input_ids: token id {bad} is outside the vocabulary [0, {vocab})")
        positions = [i for i, t in enumerate(prompt_ids) if t == self.geometry.image_token_id]
        rows = 0 if image_embeds is None else image_embeds.shape[0]
        if image_embeds is not None and (image_embeds.dim() != 2 or image_embeds.shape[1] != self.geometry.text.hidden_size):
            raise ValueError(f"image_embeds: expected [rows, {self.geometry.text.hidden_size}], got {list(image_embeds.shape)}")
        if rows != len(positions):
            raise ValueError(f"image_embeds: {rows} rows for {len(positions)} image placeholder tokens in input_ids")
        seq = Sequence(request_id, list(prompt_ids), params, image_embeds=image_embeds, image_positions=positions)
        self.scheduler.check_admissible(seq)
        return seq

    def add(self, seq: Sequence, on_output: OutputCallback, is_cancelled: Callable[[], bool] | None = None) -> None:
        """Queue a validated sequence; safe from any thread."""
        self._inbox.put(Live(seq, on_output, is_cancelled))
        self._wake.set()

    def abort(self, request_id: str) -> None:
        self._inbox.put(request_id)
        self._wake.set()

    def has_work(self) -> bool:
        return len(self.scheduler) > 0 or not self._inbox.empty()

    def stats(self) -> EngineStats:
        s = self.scheduler
        return EngineStats(self.pool.num_blocks - self.pool.num_free, self.pool.num_blocks, len(s.running),
                           len(s.waiting), s.num_preemptions)

    def check(self) -> None:
        """Assert the block pool agrees with every live block table."""
        self.pool.check(self.scheduler.block_tables())

    def generate(self, prompts: list[list[int]], params: SamplingParams | list[SamplingParams],
                 image_embeds: list[torch.Tensor | None] | None = None) -> list[list[int]]:
        """Offline, synchronous: run every prompt to completion and return the generated ids."""
        params = params if isinstance(params, list) else [params] * len(prompts)
        embeds = image_embeds or [None] * len(prompts)
        results: dict[str, list[int]] = {}
        ids = []
        for prompt, p, e in zip(prompts, params, embeds):
            rid = self.new_request_id()
            ids.append(rid)
            results[rid] = []
            self.add(self.make_sequence(rid, prompt, p, e),
                     lambda out: results[out.request_id].extend(out.new_token_ids))
        while self.has_work():
            self.step()
        return [results[r] for r in ids]

    # ---- the loop -------------------------------------------------------------
    def start(self) -> None:
        self._thread = threading.Thread(target=self._loop, name="llm-engine", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self._stopping = True
        self._wake.set()
        if self._thread:
            self._thread.join(timeout=30)

    def _loop(self) -> None:
        while not self._stopping:
            if not self.has_work():
                self._wake.wait()
                self._wake.clear()
                continue
            self.step()
            if self.on_step:
                self.on_step(self.stats())
            if not self.has_work():
                try:
                    self.check()  # cheap when idle, and catches leaks early
                except AssertionError:
                    log.exception("block pool invariant broken")

    def step(self) -> None:
        self._drain_inbox()
        self._drop_cancelled()
        batch = self.scheduler.schedule()
        if not batch.seqs:
            return
        try:
            logits = self.runner.run(batch)
        except Exception as e:  # a failed step fails its requests, not the server
            log.exception("model step failed")
            for seq in batch.seqs:
                self._finish(seq, "error", error=f"model step failed: {e}")
            return
        done = []
        for seq, n in zip(batch.seqs, batch.num_new_tokens):
            seq.num_computed += n
            if seq.num_computed == seq.num_tokens:
                done.append(seq)
        for seq, token in zip(done, sample(logits, done)):
            seq.token_ids.append(token)
            reason = self._finish_reason(seq, token)
            if reason:
                self._finish(seq, reason)
            else:
                self._emit(seq, finished=False)

    # ---- helpers ---------------------------------------------------------------
    def _finish_reason(self, seq: Sequence, token: int) -> str | None:
        p = seq.params
        if (token in self.eos_ids and not p.ignore_eos) or token in p.stop_token_ids:
            return "stop"
        if seq.num_generated >= p.max_tokens or seq.num_tokens >= self.scheduler.max_seq_len:
            return "length"
        return None

    def _emit(self, seq: Sequence, finished: bool, error: str | None = None) -> None:
        new = seq.token_ids[seq.prompt_len + seq.num_sent:]
        seq.num_sent += len(new)
        live = self._live.pop(seq.request_id) if finished else self._live[seq.request_id]
        try:
            live.on_output(RequestOutput(seq.request_id, new, finished, seq.finish_reason if finished else None, error))
        except Exception:  # a broken consumer must not stop the loop
            log.exception("output callback failed for %s", seq.request_id)
            if not finished:
                self._finish(seq, "abort")

    def _finish(self, seq: Sequence, reason: str, error: str | None = None) -> None:
        if seq.status is Status.FINISHED:
            return
        self.scheduler.finish(seq, reason)
        self._emit(seq, finished=True, error=error)

    def _drain_inbox(self) -> None:
        while not self._inbox.empty():
            item = self._inbox.get()
            if isinstance(item, str):  # an abort
                if item in self._live:
                    self._finish(self._live[item].seq, "abort")
            elif item.seq.request_id in self._live:
                item.on_output(RequestOutput(item.seq.request_id, [], True, "error",
                                             f"request id {item.seq.request_id!r} is already in flight"))
            else:
                self._live[item.seq.request_id] = item
                self.scheduler.add(item.seq)

    def _drop_cancelled(self) -> None:
        # Asking the caller crosses a process boundary (Triton's stub IPC): a few times a second is enough.
        now = time.monotonic()
        if now < self._next_cancel_check:
            return
        self._next_cancel_check = now + CANCEL_CHECK_INTERVAL_S
        for live in list(self._live.values()):
            if live.is_cancelled and live.is_cancelled():
                self._finish(live.seq, "abort")
