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

import hashlib
import itertools
import logging
import queue
import threading
import time
from typing import Callable, NamedTuple

import torch

from ..detokenizer import Detokenizer
from ..geometry import ModelGeometry
from .block_pool import BlockPool
from .config import EngineConfig
from .model_runner import ModelRunner
from .sampler import sample
from .sampling_params import SamplingParams
from .scheduler import Scheduler, SchedulerConfig
from .sequence import ImageSpan, Sequence, Status
from .stats import EngineStats, FinishedRequest, IterationStats
from .structured import Grammars

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
    """What one completion produced since its last output.

    `finished` says the whole request is over (every completion); `finish_reason` is set on the
    output in which this completion ended.
    """
    request_id: str
    new_token_ids: list[int]
    finished: bool
    finish_reason: str | None = None  # "stop", "length", "abort" or "error"
    error: str | None = None
    index: int = 0  # which of the request's n completions
    text: str = ""  # the new text (held back while it may still become a stop string)
    # Per new token {token_id: (logprob, rank, decoded_token)}, the sampled token and the top
    # `logprobs`; None unless the request asked for logprobs.
    logprobs: list[dict] | None = None
    cumulative_logprob: float = 0.0  # of this completion's tokens so far
    # Once, when the prompt is done (index 0): None for its first token, then one dict as above per token.
    prompt_logprobs: list[dict | None] | None = None


OutputCallback = Callable[[RequestOutput], None]


def coalesce(outputs: list[RequestOutput]) -> list[RequestOutput]:
    """One request's outputs, in order, as one per completion: what a slow consumer found waiting.

    Completions come in the order of their last output, so the request's final output stays last.
    """
    merged: dict[int, RequestOutput] = {}
    for out in outputs:
        before = merged.pop(out.index, None)
        merged[out.index] = out if before is None else _merge(before, out)
    return list(merged.values())


def _merge(a: RequestOutput, b: RequestOutput) -> RequestOutput:
    logprobs = None if a.logprobs is None and b.logprobs is None else (a.logprobs or []) + (b.logprobs or [])
    return b._replace(new_token_ids=a.new_token_ids + b.new_token_ids, finished=a.finished or b.finished,
                      finish_reason=b.finish_reason or a.finish_reason, error=a.error or b.error, text=a.text + b.text,
                      logprobs=logprobs, prompt_logprobs=a.prompt_logprobs or b.prompt_logprobs)


class Live(NamedTuple):
    """A request the engine owns: its completions (the first alone until its prompt is cached) and
    how to reach its caller."""

    seqs: list[Sequence]
    on_output: OutputCallback
    is_cancelled: Callable[[], bool] | None

    @property
    def seq(self) -> Sequence:
        return self.seqs[0]

    @property
    def done(self) -> bool:
        return all(s.status is Status.FINISHED for s in self.seqs)


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
                                                   config.max_num_batched_tokens, max_len,
                                                   bool(config.enable_prefix_caching)), self.pool)
        self.eos_ids = frozenset(self.geometry.eos_token_ids)
        from transformers import AutoTokenizer  # the checkpoint's own: text, stop strings, grammars
        self.tokenizer = AutoTokenizer.from_pretrained(checkpoint)
        self.grammars = Grammars(self.tokenizer, self.geometry.text.vocab_size, self.tokenizer.eos_token_id)
        self._live: dict[str, Live] = {}
        self._inbox: queue.SimpleQueue = queue.SimpleQueue()
        self._wake = threading.Event()
        self._thread: threading.Thread | None = None
        self._stopping = False
        self._ids = itertools.count()
        # Called on the loop thread after each step, e.g. to export metrics; the IterationStats is the
        # callee's from then on.
        self.on_step: Callable[[EngineStats, IterationStats], None] | None = None
        self._iteration = IterationStats()
        self.on_death: Callable[[str], None] | None = None  # called with dead_reason if the loop dies
        self.dead_reason: str | None = None  # None while the engine serves
        self._next_cancel_check = 0.0
        # add() runs on the callers' threads: the lock orders it against death and guards the count.
        self._lock = threading.Lock()
        self._num_waiting = 0  # added but never run yet: the inbox plus the sequences in _queued
        self._queued: set[Sequence] = set()  # admitted, never scheduled (engine thread only)
        self.num_admitted = 0

    # ---- the public surface -------------------------------------------------
    @property
    def alive(self) -> bool:
        return self.dead_reason is None

    def new_request_id(self) -> str:
        return f"req-{next(self._ids)}"

    def make_sequence(self, request_id: str, prompt_ids: list[int], params: SamplingParams,
                      image_embeds: torch.Tensor | None = None, image_hashes: list[bytes] | None = None,
                      image_rows: list[int] | None = None, positions: torch.Tensor | None = None) -> Sequence:
        """Validate a request and build its sequence; raises ValueError naming the bad field.

        `image_rows` says how many of image_embeds' rows each image has (default: all rows one image),
        `image_hashes` each image's content hash (default: a hash of its rows' bytes), for prefix caching.
        positions: the prompt's rotary positions [rows, prompt tokens] where they are not the token indexes
        (M-RoPE's 3 rows); generated tokens then continue from the largest + 1.
        """
        params.validate()
        vocab = self.geometry.text.vocab_size
        if not prompt_ids:
            raise ValueError("input_ids: empty prompt")
        bad = next((t for t in prompt_ids if not 0 <= t < vocab), None)
        if bad is not None:
            raise ValueError(f"input_ids: token id {bad} is outside the vocabulary [0, {vocab})")
        image_ids = {self.geometry.image_token_id, self.geometry.video_token_id}
        image_at = [i for i, t in enumerate(prompt_ids) if t in image_ids]
        rows = 0 if image_embeds is None else image_embeds.shape[0]
        if image_embeds is not None and (image_embeds.dim() != 2 or image_embeds.shape[1] != self.geometry.text.hidden_size):
            raise ValueError(f"image_embeds: expected [rows, {self.geometry.text.hidden_size}], got {list(image_embeds.shape)}")
        if rows != len(image_at):
            raise ValueError(f"image_embeds: {rows} rows for {len(image_at)} image placeholder tokens in input_ids")
        spans = image_spans(image_embeds, image_hashes, image_rows)
        seq = Sequence(request_id, list(prompt_ids), params, image_embeds=image_embeds, image_positions=image_at,
                       image_spans=spans)
        if positions is not None:
            seq.positions = self._check_positions(positions, len(prompt_ids))
            seq.position_delta = int(seq.positions.max()) + 1 - len(prompt_ids)
        self.scheduler.check_admissible(seq)
        for name in ("stop_token_ids", "allowed_token_ids", "logit_bias"):
            bad = next((t for t in getattr(params, name) or () if t >= vocab), None)
            if bad is not None:
                raise ValueError(f"sampling_parameters.{name}: token id {bad} is outside the vocabulary [0, {vocab})")
        seq.bad_word_ids = self._bad_word_ids(params.bad_words)
        if params.structured_outputs:
            seq.matcher = self.grammars.matcher(params.structured_outputs)
        return seq

    def _check_positions(self, positions: torch.Tensor, n: int) -> torch.Tensor:
        rows = self.runner.position_rows
        if rows == 1:  # 1-D rotary positions are always the token indexes here
            raise ValueError("position_ids: this model takes none (its positions are the token indexes)")
        if positions.dim() != 2 or tuple(positions.shape) != (rows, n):
            raise ValueError(f"position_ids: expected [{rows}, {n}] (rows x prompt tokens), got {list(positions.shape)}")
        if positions.min() < 0 or positions.max() >= self.scheduler.max_seq_len:
            raise ValueError(f"position_ids: values must lie in [0, {self.scheduler.max_seq_len})")
        return positions.to(torch.long)

    def _bad_word_ids(self, words: list[str]) -> list[list[int]]:
        """Each bad word as tokens, alone and after a space (as vLLM: mid-text words carry the space)."""
        found = []
        for word in words:
            for text in (word, " " + word.lstrip()):
                ids = self.tokenizer.encode(text, add_special_tokens=False)
                if ids and ids not in found:
                    found.append(ids)
        return found

    def add(self, seq: Sequence, on_output: OutputCallback, is_cancelled: Callable[[], bool] | None = None) -> None:
        """Queue a validated sequence; safe from any thread.

        Raises EngineBusy when max_num_waiting requests wait already, EngineDead once the loop has ended.
        """
        self._submit(Live([seq], on_output, is_cancelled), bounded=True)

    def abort(self, request_id: str) -> None:
        self._inbox.put(request_id)
        self._wake.set()

    def has_work(self) -> bool:
        return len(self.scheduler) > 0 or not self._inbox.empty()

    def stats(self) -> EngineStats:
        s = self.scheduler
        return EngineStats(self.pool.num_blocks - self.pool.num_free, self.pool.num_blocks, len(s.running),
                           len(s.waiting), s.num_preemptions, self.num_admitted, s.prefix_queries, s.prefix_hits)

    def check(self) -> None:
        """Assert the block pool agrees with every live block table."""
        self.pool.check(self.scheduler.block_tables())

    def generate(self, prompts: list[list[int]], params: SamplingParams | list[SamplingParams],
                 image_embeds: list[torch.Tensor | None] | None = None,
                 positions: list[torch.Tensor | None] | None = None) -> list[list[int]]:
        """Offline, synchronous: run every prompt to completion and return the generated ids."""
        outs = self.generate_outputs(prompts, params, image_embeds, positions)
        return [[t for o in outs[rid] if o.index == 0 for t in o.new_token_ids] for rid in outs]

    def generate_outputs(self, prompts: list[list[int]], params: SamplingParams | list[SamplingParams],
                         image_embeds: list[torch.Tensor | None] | None = None,
                         positions: list[torch.Tensor | None] | None = None) -> dict[str, list[RequestOutput]]:
        """Offline, synchronous: every RequestOutput of every prompt, by request id in prompt order."""
        params = params if isinstance(params, list) else [params] * len(prompts)
        embeds = image_embeds or [None] * len(prompts)
        positions = positions or [None] * len(prompts)
        results: dict[str, list[RequestOutput]] = {}
        for prompt, p, e, pos in zip(prompts, params, embeds, positions):
            rid = self.new_request_id()
            results[rid] = []
            # Unbounded: the caller waits for all of them anyway.
            seq = self.make_sequence(rid, prompt, p, e, positions=pos)
            self._submit(Live([seq], results[rid].append, None), bounded=False)
        while self.has_work():
            self._step_or_fail_all()
            self._iteration = IterationStats()  # no one reads them offline
        return results

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
        iteration, self._iteration = self._iteration, IterationStats()
        if self.on_step:
            try:
                self.on_step(self.stats(), iteration)
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
        now = time.monotonic()
        for seq in batch.seqs:
            self._leave_queue(seq)
            seq.scheduled_at = seq.scheduled_at or now
        if not batch.seqs:
            return
        # Prompt logprobs need the logits of every prompt row (the first completion's, recorded once).
        full = frozenset(i for i, (seq, n) in enumerate(zip(batch.seqs, batch.num_new_tokens))
                         if seq.params.prompt_logprobs is not None and seq.index == 0
                         and seq.num_computed + n >= len(seq.prompt_logprobs or [None])
                         and seq.num_computed < seq.prompt_len - 1)
        try:
            logits = self.runner.run(batch, full) if full else self.runner.run(batch)
        except Exception as e:  # a failed step fails its requests, not the server
            log.exception("model step failed")
            for seq in batch.seqs:
                self._fail(seq, _describe("model step failed", e))
            return
        done, row = [], sum(s.num_computed + n == s.num_tokens for s, n in zip(batch.seqs, batch.num_new_tokens))
        for i, (seq, n) in enumerate(zip(batch.seqs, batch.num_new_tokens)):
            if i in full:
                try:
                    self._record_prompt_logprobs(seq, seq.num_computed, logits[row:row + n])
                except Exception as e:  # noqa: BLE001
                    self._fail(seq, _describe("prompt logprobs failed", e))
                row += n
            seq.num_computed += n
            try:
                self.scheduler.cache_computed(seq)
            except Exception as e:  # noqa: BLE001  (this request only)
                self._fail(seq, _describe("caching its blocks failed", e))  # its logits row is still in `done`
            if seq.num_computed == seq.num_tokens:
                done.append(seq)
                if not seq.forked:
                    try:
                        self._fork(seq)
                    except Exception as e:  # noqa: BLE001  (this request only)
                        self._fail(seq, _describe("starting its n completions failed", e))
        try:
            result = sample(logits, done, self.eos_ids)
        except Exception as e:  # the sampler broke as a whole: no row can be trusted
            result = None
            error = e
        for i, seq in enumerate(done):
            token = error if result is None else result.tokens[i]
            if isinstance(token, Exception):
                self._fail(seq, _describe("sampling failed", token))
            elif seq.status is not Status.FINISHED:  # a sibling's failure may have ended the request
                self._append(seq, token, result.logprobs[i], result.ranks[i], result.top[i])

    # ---- helpers ---------------------------------------------------------------
    def _submit(self, live: Live, bounded: bool) -> None:
        with self._lock:  # the put happens under it too, so _close finds every accepted request
            if self.dead_reason is not None:
                raise EngineDead(self.dead_reason)
            if bounded and self._num_waiting >= self.config.max_num_waiting:
                raise EngineBusy(f"server busy: {self._num_waiting} requests already waiting "
                                 f"(max_num_waiting); retry later")
            self._num_waiting += 1
            live.seq.arrival_time = time.monotonic()
            self._inbox.put(live)
        self._wake.set()

    def _leave_queue(self, seq: Sequence) -> None:
        """The sequence runs now, or finished before it ran: it no longer counts as waiting."""
        if seq in self._queued:
            self._queued.discard(seq)
            with self._lock:
                self._num_waiting -= 1

    def _record_prompt_logprobs(self, seq: Sequence, start: int, logits: torch.Tensor) -> None:
        """Logprobs of the prompt tokens these rows predict (row q predicts token q + 1), as vLLM's
        prompt_logprobs: None for the first token, then {token_id: (logprob, rank, decoded)} each."""
        seq.prompt_logprobs = seq.prompt_logprobs or [None]
        first, end = len(seq.prompt_logprobs), min(start + len(logits), seq.prompt_len - 1) + 1
        if first >= end:
            return
        rows = torch.arange(first - 1 - start, end - 1 - start)
        targets = torch.tensor(seq.token_ids[first:end])
        lp = torch.log_softmax(logits[rows.to(logits.device)].float(), dim=-1)
        chosen = lp.gather(1, targets[:, None].to(lp.device))
        ranks = ((lp > chosen).sum(dim=-1) + 1).tolist()
        top_lp, top_ids = lp.topk(seq.params.prompt_logprobs, dim=-1)
        decode = lambda t: self.tokenizer.decode([t])  # noqa: E731
        for t, c, r, ids, lps in zip(targets.tolist(), chosen[:, 0].tolist(), ranks, top_ids.tolist(), top_lp.tolist()):
            entry = {t: (c, r, decode(t))}
            for rank, (u, v) in enumerate(zip(ids, lps), start=1):
                entry.setdefault(u, (v, rank, decode(u)))
            seq.prompt_logprobs.append(entry)

    def _fork(self, seq: Sequence) -> None:
        """The prompt is in the cache: make the request's other n - 1 completions.

        Each child holds the prompt's full blocks (ref counts) and recomputes only the tokens of
        the last, partial block, into a block of its own; it then samples its own first token.
        """
        seq.forked = True
        live = self._live.get(seq.request_id)
        if seq.params.n == 1 or live is None or len(live.seqs) > 1:
            return
        full = min(seq.prompt_len - 1, seq.num_computed) // self.scheduler.config.block_size
        shared = seq.block_table[:full]
        children = []
        for index in range(1, seq.params.n):  # what may raise comes first, before any block is shared
            child = Sequence(seq.request_id, seq.token_ids[:seq.prompt_len], seq.params, image_embeds=seq.image_embeds,
                             image_positions=seq.image_positions, positions=seq.positions,
                             position_delta=seq.position_delta, prompt_len=seq.prompt_len, index=index, forked=True)
            child.bad_word_ids = seq.bad_word_ids
            child.arrival_time, child.scheduled_at = seq.arrival_time, seq.scheduled_at
            child.block_hashes = seq.block_hashes[:full]
            child.num_cached_blocks = min(full, seq.num_cached_blocks)
            child.matcher = None if seq.matcher is None else seq.matcher.deep_copy()
            self._prepare(child)
            children.append(child)
        for child in children:
            self.pool.share(shared)
            child.block_table = list(shared)
            child.num_computed = full * self.scheduler.config.block_size
            live.seqs.append(child)
        for child in reversed(children):
            self.scheduler.add(child, first=True)

    def _append(self, seq: Sequence, token: int, logprob: float = 0.0, rank: int | None = None,
                top: list[tuple[int, float]] | None = None) -> None:
        self._count_token(seq)
        try:
            if seq.params.logprobs is not None:
                seq.logprobs.append(self._logprob_entry(seq, token, logprob, rank, top or []))
            seq.cumulative_logprob += logprob
            seq.token_ids.append(token)
            if seq.matcher is not None and not seq.matcher.consume_token(token):
                raise ValueError(f"the grammar refused token {token}: {seq.matcher.get_error()}")
            reason = self._finish_reason(seq, token)
        except Exception as e:  # noqa: BLE001
            self._fail(seq, _describe("stop check failed", e))
            return
        if reason:
            self._finish(seq, reason)
        else:
            self._emit(seq)

    def _count_token(self, seq: Sequence) -> None:
        """Token counts and latencies for IterationStats: vLLM's TTFT (per request) and inter-token gaps."""
        now, it = time.monotonic(), self._iteration
        it.generation_tokens += 1
        if seq.last_token_at is not None:
            it.itl_s.append(now - seq.last_token_at)
        elif seq.index == 0:
            it.ttft_s.append(now - seq.arrival_time)
            it.prompt_tokens += seq.prompt_len
        seq.last_token_at = now

    def _logprob_entry(self, seq: Sequence, token: int, logprob: float, rank: int | None,
                       top: list[tuple[int, float]]) -> dict:
        """{token_id: (logprob, rank, decoded_token)}: the sampled token first, then the top ones.

        decoded_token is the text the token would add after this completion's text so far."""
        entry = {token: (logprob, rank, seq.detokenizer.peek(token))}
        for r, (t, lp) in enumerate(top, start=1):
            if t not in entry:
                entry[t] = (lp, r, seq.detokenizer.peek(t))
        return entry

    def _finish_reason(self, seq: Sequence, token: int) -> str | None:
        p = seq.params
        may_stop = seq.num_generated > p.min_tokens or seq.num_generated == p.min_tokens
        if may_stop and ((token in self.eos_ids and not p.ignore_eos) or token in p.stop_token_ids):
            return "stop"  # the stop token's text is not part of the output
        delta = seq.detokenizer.add([token])
        seq.text += delta
        if p.logprobs is not None:  # the sampled token's piece is the text it added: the pieces add up to the text
            seq.logprobs[-1][token] = seq.logprobs[-1][token][:2] + (delta,)
        if may_stop and p.stop and self._cut_at_stop_string(seq):
            return "stop"
        if seq.matcher is not None and seq.matcher.is_stopped() and not p.ignore_eos:
            return "stop"  # the grammar is complete and allows nothing more
        if seq.num_generated >= p.max_tokens or seq.num_tokens >= self.scheduler.max_seq_len:
            return "length"
        return None

    @staticmethod
    def _cut_at_stop_string(seq: Sequence) -> bool:
        """Find the earliest stop string in the text not yet checked (plus its possible overlap)."""
        p = seq.params
        longest = max(len(s) for s in p.stop)
        start = max(seq.text_sent, seq.checked_text - longest + 1)
        seq.checked_text = len(seq.text)
        hits = [(at, s) for s in p.stop if (at := seq.text.find(s, start)) >= 0]
        if not hits:
            return False
        at, stop = min(hits)
        seq.text = seq.text[:at + len(stop) if p.include_stop_str_in_output else at]
        seq.stopped_by_string = True
        return True

    def _emit(self, seq: Sequence, error: str | None = None) -> None:
        """Send a completion's news; the request's last output carries finished=True."""
        live = self._live.get(seq.request_id)
        finished_seq = seq.status is Status.FINISHED
        done = live is None or live.done
        new = seq.token_ids[seq.prompt_len + seq.num_sent:]
        seq.num_sent += len(new)
        seq.emitted_at = time.monotonic()
        if finished_seq and not seq.stopped_by_string and seq.detokenizer is not None and seq.finish_reason != "error":
            seq.text += seq.detokenizer.flush()
        hold = 0 if finished_seq or not seq.params.stop else max(len(s) for s in seq.params.stop) - 1
        upto = max(seq.text_sent, len(seq.text) - hold)
        text, seq.text_sent = seq.text[seq.text_sent:upto], upto
        logprobs = None
        if seq.params.logprobs is not None:
            logprobs, seq.logprobs_sent = seq.logprobs[seq.logprobs_sent:], len(seq.logprobs)
        if live is None:
            return
        if done:
            self._live.pop(seq.request_id, None)
            first = live.seq
            self._iteration.finished.append(FinishedRequest(
                seq.emitted_at - first.arrival_time, (first.scheduled_at or seq.emitted_at) - first.arrival_time,
                first.prompt_len, sum(s.num_generated for s in live.seqs), first.params.n,
                first.finish_reason or seq.finish_reason or "error"))
        prompt_logprobs = None
        if seq.prompt_logprobs and not seq.prompt_logprobs_sent and (new or finished_seq):
            prompt_logprobs, seq.prompt_logprobs_sent = seq.prompt_logprobs, True
        out = RequestOutput(seq.request_id, new, done, seq.finish_reason if finished_seq else None, error,
                            seq.index, text, logprobs, seq.cumulative_logprob, prompt_logprobs)
        try:
            live.on_output(out)
        except Exception as e:  # a broken consumer must not stop the loop
            log.exception("output callback failed for %s", seq.request_id)
            if not done:
                self._fail(seq, _describe("output callback failed", e))

    def _finish(self, seq: Sequence, reason: str, error: str | None = None) -> None:
        """End one completion (the request ends with its last)."""
        if seq.status is Status.FINISHED:
            return
        self._leave_queue(seq)
        self.scheduler.finish(seq, reason)
        self._emit(seq, error=error)

    def _finish_request(self, seq: Sequence, reason: str) -> None:
        """End every completion of seq's request (abort, cancellation)."""
        live = self._live.get(seq.request_id)
        for s in list(live.seqs) if live else [seq]:
            self._finish(s, reason)

    def _fail(self, seq: Sequence, error: str) -> None:
        """Fail seq's whole request and free its blocks; whatever else breaks, its caller still hears why."""
        log.error("request %s failed: %s", seq.request_id, error)
        live = self._live.get(seq.request_id)
        siblings = [s for s in live.seqs if s is not seq] if live else []
        try:
            for s in siblings:  # quietly: the error goes out once, with the last completion
                self._leave_queue(s)
                self.scheduler.finish(s, "error")
            self._finish(seq, "error", error=error)
        except Exception:  # noqa: BLE001
            log.exception("could not finish request %s cleanly", seq.request_id)
        live = self._live.pop(seq.request_id, None)
        if live is not None:  # _finish did not get as far as answering
            _send(live, RequestOutput(seq.request_id, [], True, "error", error, seq.index))

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
                        self._finish_request(seq, "abort")
                    except Exception as e:  # noqa: BLE001
                        self._fail(seq, _describe("abort failed", e))
            else:
                self._admit(item)

    def _admit(self, live: Live) -> None:
        seq = live.seq
        try:
            if seq.request_id in self._live:
                raise ValueError(f"request id {seq.request_id!r} is already in flight")
            self._prepare(seq)
            self.scheduler.add(seq)
        except Exception as e:  # noqa: BLE001  (refused: this request only)
            with self._lock:
                self._num_waiting -= 1
            _send(live, RequestOutput(seq.request_id, [], True, "error", _describe("admission failed", e)))
            return
        self._live[seq.request_id] = live
        self._queued.add(seq)
        self.num_admitted += 1

    def _prepare(self, seq: Sequence) -> None:
        if seq.detokenizer is None:
            seq.detokenizer = Detokenizer(self.tokenizer, seq.params.skip_special_tokens,
                                          seq.params.spaces_between_special_tokens)

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
            try:
                if cancelled:
                    self._finish_request(live.seq, "abort")
                elif now - max(s.emitted_at for s in live.seqs) >= KEEPALIVE_S:
                    self._emit(next((s for s in live.seqs if s.status is not Status.FINISHED), live.seq))
            except Exception as e:  # noqa: BLE001  (this request only)
                self._fail(live.seq, _describe("abort or keep-alive failed", e))

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
                for seq in live.seqs:
                    self.scheduler.finish(seq, "error")  # give its blocks back
            except Exception:  # noqa: BLE001
                log.exception("could not free the blocks of %s", live.seq.request_id)
            _send(live, RequestOutput(live.seq.request_id, [], True, "error", reason))
        if died and self.on_death:
            try:
                self.on_death(reason)
            except Exception:  # noqa: BLE001
                log.exception("on_death hook failed")


def image_spans(embeds: torch.Tensor | None, hashes: list[bytes] | None, rows: list[int] | None) -> list[ImageSpan]:
    """Each image's rows and content hash; raises ValueError naming the bad field."""
    total = 0 if embeds is None else embeds.shape[0]
    rows = [total] if rows is None and total else list(rows or [])
    if any(r <= 0 for r in rows) or sum(rows) != total:
        raise ValueError(f"image_rows: {rows} must be positive and add up to image_embeds' {total} rows")
    if hashes is not None and len(hashes) != len(rows):
        raise ValueError(f"image_hashes: {len(hashes)} hashes for {len(rows)} images (image_rows)")
    spans, first = [], 0
    for i, n in enumerate(rows):
        # Without a hash from the caller, the rows themselves are the image's content.
        h = hashes[i] if hashes is not None else _content_hash(embeds[first:first + n])
        spans.append(ImageSpan(first, n, h))
        first += n
    return spans


def _content_hash(rows: torch.Tensor) -> bytes:
    return hashlib.sha256(rows.detach().to("cpu", torch.float32).contiguous().numpy().tobytes()).digest()


def _send(live: Live, out: RequestOutput) -> None:
    """A last word to a caller: its failure is logged, never raised."""
    try:
        live.on_output(out)
    except Exception:  # noqa: BLE001
        log.exception("output callback failed for %s", out.request_id)
