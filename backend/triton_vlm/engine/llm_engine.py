"""The engine: requests in, tokens out, every in-flight request batched continuously.

`step()` runs one scheduler decision through the model. `start()` runs steps on a
background thread; `add` and `abort` may be called from any thread.

Failures stay as small as they can: what breaks while handling one request fails that request
(finish_reason "error", its KV blocks freed), a failed model step fails the requests in it, and
anything else that escapes a step fails every live request; the loop goes on in every case.
Should the loop end anyway, every request still waiting is answered, `dead_reason` says why,
`on_death` is called and `add` raises EngineDead: nothing waits forever.
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
# A request that waits (queued, prefilling, preempted) gets an empty output this often: its caller
# learns the engine is alive and gets a turn to notice its own client's cancellation.
KEEPALIVE_S = 0.25


class EngineBusy(RuntimeError):
    """max_num_waiting requests wait already: refused at once, in the caller's thread."""


class EngineDead(RuntimeError):
    """The engine's loop has ended; str(e) is the cause (also in `LLMEngine.dead_reason`)."""


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


def _describe(what: str, e: BaseException) -> str:
    return f"{what}: {type(e).__name__}: {e}"


class LLMEngine:
    def __init__(self, checkpoint: str, config: EngineConfig | None = None):
        self.config = config = config or EngineConfig()
        if config.max_num_waiting < 1:
            raise ValueError(f"max_num_waiting: must be >= 1, got {config.max_num_waiting}")
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
        self.on_death: Callable[[str], None] | None = None  # called with dead_reason if the loop dies
        self.dead_reason: str | None = None  # None while the engine serves
        self._next_cancel_check = 0.0
        # add() runs on the callers' threads: the lock orders it against death and guards the count.
        self._lock = threading.Lock()
        self._num_waiting = 0  # added but never run yet: the inbox plus the sequences in _queued
        self._queued: set[Sequence] = set()  # admitted, never scheduled (engine thread only)

    # ---- the public surface -------------------------------------------------
    @property
    def alive(self) -> bool:
        return self.dead_reason is None

    def new_request_id(self) -> str:
        return f"req-{next(self._ids)}"

    def make_sequence(self, request_id: str, prompt_ids: list[int], params: SamplingParams,
                      image_embeds: torch.Tensor | None = None) -> Sequence:
        """Validate a request and build its sequence; raises ValueError naming the bad field."""
        params.validate()
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
        """Queue a validated sequence; safe from any thread.

        Raises EngineBusy when max_num_waiting requests wait already, EngineDead once the loop has ended.
        """
        self._submit(Live(seq, on_output, is_cancelled), bounded=True)

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
            # Unbounded: the caller waits for all of them anyway.
            self._submit(Live(self.make_sequence(rid, prompt, p, e),
                              lambda out: results[out.request_id].extend(out.new_token_ids), None), bounded=False)
        while self.has_work():
            self._step_or_fail_all()
        return [results[r] for r in ids]

    # ---- the loop -------------------------------------------------------------
    def start(self) -> None:
        self._thread = threading.Thread(target=self._loop, name="llm-engine", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        """End the loop; requests still in flight get an "engine stopped" error."""
        self._stopping = True
        self._wake.set()
        if self._thread:
            self._thread.join(timeout=30)

    def _loop(self) -> None:
        try:
            while not self._stopping:
                if not self.has_work():
                    self._wake.wait()
                    self._wake.clear()
                    continue
                self._step_or_fail_all()
                self._after_step()
        except BaseException as e:  # noqa: BLE001  (whatever it was, the callers must hear of it)
            log.critical("engine loop died", exc_info=True)
            self._close(_describe("engine loop died", e), died=True)
        else:
            self._close("engine stopped", died=False)

    def _step_or_fail_all(self) -> None:
        try:
            self.step()
        except Exception as e:  # no single request to blame: fail them all, keep serving
            log.exception("engine step failed")
            error = _describe("engine step failed", e)
            for live in list(self._live.values()):
                self._fail(live.seq, error)

    def _after_step(self) -> None:
        if self.on_step:
            try:
                self.on_step(self.stats())
            except Exception:  # noqa: BLE001  (metrics are not worth a request)
                log.exception("on_step hook failed")
        if not self.has_work():
            try:
                self.check()  # cheap when idle, and catches leaks early
            except AssertionError:
                log.exception("block pool invariant broken")

    def step(self) -> None:
        """One scheduler decision through the model; a failure while handling one request fails only it."""
        self._drain_inbox()
        self._drop_cancelled()
        batch = self.scheduler.schedule()
        for seq in batch.seqs:
            self._leave_queue(seq)
        if not batch.seqs:
            return
        try:
            logits = self.runner.run(batch)
        except Exception as e:  # a failed step fails its requests, not the server
            log.exception("model step failed")
            for seq in batch.seqs:
                self._fail(seq, _describe("model step failed", e))
            return
        done = []
        for seq, n in zip(batch.seqs, batch.num_new_tokens):
            seq.num_computed += n
            if seq.num_computed == seq.num_tokens:
                done.append(seq)
        try:
            tokens = sample(logits, done)
        except Exception as e:  # the sampler broke as a whole: no row can be trusted
            tokens = [e] * len(done)
        for seq, token in zip(done, tokens):
            if isinstance(token, Exception):
                self._fail(seq, _describe("sampling failed", token))
            else:
                self._append(seq, token)

    # ---- helpers ---------------------------------------------------------------
    def _submit(self, live: Live, bounded: bool) -> None:
        with self._lock:  # the put happens under it too, so _close finds every accepted request
            if self.dead_reason is not None:
                raise EngineDead(self.dead_reason)
            if bounded and self._num_waiting >= self.config.max_num_waiting:
                raise EngineBusy(f"server busy: {self._num_waiting} requests already waiting "
                                 f"(max_num_waiting); retry later")
            self._num_waiting += 1
            self._inbox.put(live)
        self._wake.set()

    def _leave_queue(self, seq: Sequence) -> None:
        """The sequence runs now, or finished before it ran: it no longer counts as waiting."""
        if seq in self._queued:
            self._queued.discard(seq)
            with self._lock:
                self._num_waiting -= 1

    def _append(self, seq: Sequence, token: int) -> None:
        seq.token_ids.append(token)
        try:
            reason = self._finish_reason(seq, token)
        except Exception as e:  # noqa: BLE001
            self._fail(seq, _describe("stop check failed", e))
            return
        if reason:
            self._finish(seq, reason)
        else:
            self._emit(seq, finished=False)

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
        seq.emitted_at = time.monotonic()
        live = self._live.pop(seq.request_id, None) if finished else self._live.get(seq.request_id)
        if live is None:
            return
        try:
            live.on_output(RequestOutput(seq.request_id, new, finished, seq.finish_reason if finished else None, error))
        except Exception as e:  # a broken consumer must not stop the loop
            log.exception("output callback failed for %s", seq.request_id)
            if not finished:
                self._finish(seq, "error", error=_describe("output callback failed", e))

    def _finish(self, seq: Sequence, reason: str, error: str | None = None) -> None:
        if seq.status is Status.FINISHED:
            return
        self._leave_queue(seq)
        self.scheduler.finish(seq, reason)
        self._emit(seq, finished=True, error=error)

    def _fail(self, seq: Sequence, error: str) -> None:
        """Fail one request and free its blocks; whatever else breaks, its caller still hears why."""
        log.error("request %s failed: %s", seq.request_id, error)
        try:
            self._finish(seq, "error", error=error)
        except Exception:  # noqa: BLE001
            log.exception("could not finish request %s cleanly", seq.request_id)
        live = self._live.pop(seq.request_id, None)
        if live is not None:  # _finish did not get as far as answering
            _send(live, RequestOutput(seq.request_id, [], True, "error", error))

    def _drain_inbox(self) -> None:
        while True:
            try:
                item = self._inbox.get_nowait()
            except queue.Empty:
                return
            if isinstance(item, str):  # an abort
                if item in self._live:
                    seq = self._live[item].seq
                    try:
                        self._finish(seq, "abort")
                    except Exception as e:  # noqa: BLE001
                        self._fail(seq, _describe("abort failed", e))
            else:
                self._admit(item)

    def _admit(self, live: Live) -> None:
        seq = live.seq
        try:
            if seq.request_id in self._live:
                raise ValueError(f"request id {seq.request_id!r} is already in flight")
            self.scheduler.add(seq)
        except Exception as e:  # noqa: BLE001  (refused: this request only)
            with self._lock:
                self._num_waiting -= 1
            _send(live, RequestOutput(seq.request_id, [], True, "error", _describe("admission failed", e)))
            return
        self._live[seq.request_id] = live
        self._queued.add(seq)

    def _drop_cancelled(self) -> None:
        # Asking the caller crosses a process boundary (Triton's stub IPC): a few times a second is enough.
        now = time.monotonic()
        if now < self._next_cancel_check:
            return
        self._next_cancel_check = now + CANCEL_CHECK_INTERVAL_S
        for live in list(self._live.values()):
            try:
                cancelled = live.is_cancelled is not None and live.is_cancelled()
            except Exception as e:  # noqa: BLE001
                self._fail(live.seq, _describe("cancellation check failed", e))
                continue
            if cancelled:
                self._finish(live.seq, "abort")
            elif now - live.seq.emitted_at >= KEEPALIVE_S:
                self._emit(live.seq, finished=False)

    def _close(self, reason: str, died: bool) -> None:
        """The loop is over: refuse new requests, answer every accepted one, report a death."""
        with self._lock:
            self.dead_reason = reason
        lives = list(self._live.values())
        self._live.clear()
        while True:  # no add() can put more once dead_reason is set
            try:
                item = self._inbox.get_nowait()
            except queue.Empty:
                break
            if isinstance(item, Live):
                lives.append(item)
        for live in lives:
            try:
                self.scheduler.finish(live.seq, "error")  # give its blocks back
            except Exception:  # noqa: BLE001
                log.exception("could not free the blocks of %s", live.seq.request_id)
            _send(live, RequestOutput(live.seq.request_id, [], True, "error", reason))
        if died and self.on_death:
            try:
                self.on_death(reason)
            except Exception:  # noqa: BLE001
                log.exception("on_death hook failed")


def _send(live: Live, out: RequestOutput) -> None:
    """A last word to a caller: its failure is logged, never raised."""
    try:
        live.on_output(out)
    except Exception:  # noqa: BLE001
        log.exception("output callback failed for %s", out.request_id)
