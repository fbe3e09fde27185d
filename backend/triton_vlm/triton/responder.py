"""The llm stub's response thread: the engine thread only computes, this thread talks to Triton.

The engine hands each RequestOutput to a queue (plain data). This thread takes everything waiting, merges
each request's outputs into one response per completion (under load several steps' tokens travel together;
unloaded, each token leaves at once), sends them under the stub's PB_LOCK, and asks each sender whether
its client cancelled, at most every CANCEL_CHECK_S, caching the answer for the engine's `is_cancelled`
(which then costs no round trip on the engine thread). As Triton's vLLM backend does.

A request that does not stream (`stream` = false) gets its outputs held and merged for up to HOLD_S:
one response when it ends within that, and its caller still hears from it that often (vlm polls its own
client's cancellation on each response, and its watchdog counts silence).
"""
from __future__ import annotations

import queue
import threading
import time
from dataclasses import dataclass, field

import triton_python_backend_utils as pb_utils

from ..engine.llm_engine import KEEPALIVE_S, RequestOutput, coalesce
from .params import error_response

FINAL = pb_utils.TRITONSERVER_RESPONSE_COMPLETE_FINAL
CANCEL_CHECK_S = 0.05
HOLD_S = KEEPALIVE_S  # a caller hears of a waiting request this often anyway


@dataclass(eq=False)
class Stream:
    """One llm request's response sender and what this thread knows of it."""
    sender: object
    hold: bool = False  # not streamed: merge outputs for up to HOLD_S
    cancelled: bool = False
    checked_at: float = 0.0
    pending: list[RequestOutput] = field(default_factory=list)  # not sent yet (responder thread only)
    pending_since: float = 0.0

    def due(self, now: float) -> bool:
        return not self.hold or now - self.pending_since >= HOLD_S or any(
            o.finished or o.error is not None for o in self.pending)


class Responder:
    def __init__(self, lock, to_arrays):
        self.lock = lock
        self.to_arrays = to_arrays  # RequestOutput -> {name: numpy array}
        self._queue: queue.SimpleQueue = queue.SimpleQueue()
        self.responses_sent = 0
        self._thread = threading.Thread(target=self._loop, name="llm-responder", daemon=True)
        self._thread.start()

    def stream(self, sender, hold: bool = False):
        """The engine's callbacks for one request: on_output (queues) and is_cancelled (cached)."""
        s = Stream(sender, hold)
        return (lambda out: self._queue.put((s, out))), (lambda: s.cancelled)

    def stop(self, timeout: float = 5.0) -> None:
        """Send what is queued, then end (call after the engine stopped: its last words are queued)."""
        self._queue.put(None)
        self._thread.join(timeout)

    def _loop(self) -> None:
        while True:
            items = [self._queue.get()]
            while True:
                try:
                    items.append(self._queue.get_nowait())
                except queue.Empty:
                    break
            streams: dict[Stream, None] = {}  # in order of first news
            now = time.monotonic()
            for item in items:
                if item is None:
                    self._send(list(streams), now, stopping=True)
                    return
                s, out = item
                s.pending_since = s.pending_since if s.pending else now
                s.pending.append(out)
                streams[s] = None
            self._send(list(streams), now)

    def _send(self, streams: list[Stream], now: float, stopping: bool = False) -> None:
        streams = [s for s in streams if stopping or s.due(now)]  # a held one comes back with its next output
        # Arrays are built outside the lock: plain numpy, and the engine's work, not the stub's.
        work = [(s, [(out, None if out.error else self.to_arrays(out)) for out in coalesce(s.pending)])
                for s in streams]
        with self.lock:
            for s, outs in work:
                s.pending = []
                if s.sender is None:
                    continue
                try:
                    self._send_one(s, outs, now)
                except Exception as e:  # noqa: BLE001  (one broken stream must not stop the others)
                    pb_utils.Logger.log_error(f"llm: sending a response failed: {e!r}")
                    s.sender = None

    def _send_one(self, s: Stream, outs: list, now: float) -> None:
        for out, arrays in outs:
            if out.error:
                response = error_response(pb_utils, out.error, pb_utils.TritonError.INTERNAL)
            else:
                response = pb_utils.InferenceResponse(
                    output_tensors=[pb_utils.Tensor(name, a) for name, a in arrays.items()])
            last = out.finished or out.error is not None
            s.sender.send(response, flags=FINAL if last else 0)
            self.responses_sent += 1
            if last:
                s.sender = None  # nothing more goes to it: drop it here, under the lock
                return
        if now - s.checked_at >= CANCEL_CHECK_S:
            s.checked_at = now
            s.cancelled = s.sender.is_cancelled()
