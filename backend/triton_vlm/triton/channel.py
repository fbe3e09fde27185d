"""Token streams from `llm` to `vlm` over a Unix socket, beside Triton.

Why not BLS streaming: in Triton 2.51 the vlm stub deadlocked (gdb: a thread returning from
`exec(decoupled=True)` holds the GIL and waits for the stub's response-iterator map lock; the
stub's message thread holds that lock and waits for one iterator's lock; the thread woken in
that iterator's `next()` holds it and waits for the GIL). A BLS stream whose only response is its
first one never waits in `next()`, so it cannot take part. So vlm's request to llm carries
`reply_to`, the path of vlm's socket; llm answers the BLS call with one empty final response (or
its refusal) and streams the outputs here. It also saves each token a round trip through the
server process.

Frames: a 4-byte big-endian length, then one JSON object naming its request in "id". Only our
own stubs connect: the socket sits in a directory only this user can enter.
"""
from __future__ import annotations

import json
import logging
import os
import queue
import shutil
import socket
import struct
import tempfile
import threading
from typing import Callable

log = logging.getLogger(__name__)
HEADER = struct.Struct(">I")
MAX_FRAME = 64 << 20
LOST = "llm closed its stream to vlm (its stub stopped?)"


def write_frame(sock: socket.socket, message: dict) -> None:
    body = json.dumps(message, separators=(",", ":")).encode()
    sock.sendall(HEADER.pack(len(body)) + body)


def read_frame(stream) -> dict | None:
    """The next message from a socket's file object, or None at the end of the stream."""
    header = stream.read(HEADER.size)
    if len(header) < HEADER.size:
        return None
    (size,) = HEADER.unpack(header)
    if size > MAX_FRAME:
        raise ValueError(f"frame of {size} bytes")
    body = stream.read(size)
    if len(body) < size:
        return None
    return json.loads(body)


class Listener:
    """vlm's end: one socket; each request's messages go to the queue opened for its id.

    When a connection ends, every open request that had heard from it gets an error message: its
    llm is gone and will say nothing more.
    """

    def __init__(self):
        self._dir = tempfile.mkdtemp(prefix="tvlm-")  # mode 0700: no other user may connect
        self.path = os.path.join(self._dir, "vlm.sock")
        self._sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self._sock.bind(self.path)
        self._sock.listen(64)
        self._lock = threading.Lock()
        self._inboxes: dict[str, queue.SimpleQueue] = {}
        self._heard_on: dict[str, int] = {}  # request id -> the connection that spoke for it
        self._closed = False
        threading.Thread(target=self._accept, name="vlm-channel", daemon=True).start()

    def open(self, request_id: str) -> queue.SimpleQueue:
        inbox: queue.SimpleQueue = queue.SimpleQueue()
        with self._lock:
            self._inboxes[request_id] = inbox
        return inbox

    def close(self, request_id: str) -> None:
        with self._lock:
            self._inboxes.pop(request_id, None)
            self._heard_on.pop(request_id, None)

    def stop(self) -> None:
        self._closed = True
        try:
            self._sock.close()
        finally:
            shutil.rmtree(self._dir, ignore_errors=True)

    def _accept(self) -> None:
        n = 0
        while not self._closed:
            try:
                conn, _ = self._sock.accept()
            except OSError:
                return  # stopped
            n += 1
            threading.Thread(target=self._read, args=(conn, n), name=f"vlm-channel-{n}", daemon=True).start()

    def _read(self, conn: socket.socket, conn_id: int) -> None:
        try:
            with conn, conn.makefile("rb") as stream:
                while (message := read_frame(stream)) is not None:
                    self._deliver(message, conn_id)
        except (OSError, ValueError) as e:
            log.error("vlm channel: connection %d failed: %s", conn_id, e)
        with self._lock:
            orphans = [rid for rid, c in self._heard_on.items() if c == conn_id]
            inboxes = [self._inboxes.get(rid) for rid in orphans]
        for rid, inbox in zip(orphans, inboxes):
            if inbox is not None:
                inbox.put({"id": rid, "error": LOST})

    def _deliver(self, message: dict, conn_id: int) -> None:
        rid = message.get("id")
        with self._lock:
            inbox = self._inboxes.get(rid)
            if inbox is not None:
                self._heard_on[rid] = conn_id
        if inbox is not None:  # else its request has ended on our side already
            inbox.put(message)


class Sender:
    """llm's end for one vlm socket: a queue and a thread, so the engine thread never blocks on a
    slow reader. `on_lost(request_id)` is called for each message that could not be delivered."""

    def __init__(self, path: str, on_lost: Callable[[str], None]):
        self.path = path
        self.on_lost = on_lost
        self._queue: queue.SimpleQueue = queue.SimpleQueue()
        self._sock: socket.socket | None = None
        threading.Thread(target=self._run, name="llm-channel", daemon=True).start()

    def send(self, message: dict) -> None:
        self._queue.put(message)

    def stop(self) -> None:
        self._queue.put(None)

    def _run(self) -> None:
        while (message := self._queue.get()) is not None:
            try:
                if self._sock is None:
                    self._sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
                    self._sock.connect(self.path)
                write_frame(self._sock, message)
            except OSError as e:
                log.error("llm channel to %s: %s", self.path, e)
                self._drop_socket()
                self._lost(message)
        self._drop_socket()

    def _drop_socket(self) -> None:
        if self._sock is not None:
            self._sock.close()
            self._sock = None

    def _lost(self, message: dict) -> None:
        try:
            self.on_lost(message["id"])
        except Exception:  # noqa: BLE001
            log.exception("on_lost failed for %s", message.get("id"))


class Senders:
    """One Sender per vlm socket path, made on first use."""

    def __init__(self, on_lost: Callable[[str], None]):
        self.on_lost = on_lost
        self._lock = threading.Lock()
        self._senders: dict[str, Sender] = {}

    def to(self, path: str) -> Sender:
        with self._lock:
            if path not in self._senders:
                self._senders[path] = Sender(path, self.on_lost)
            return self._senders[path]

    def stop(self) -> None:
        with self._lock:
            for sender in self._senders.values():
                sender.stop()
            self._senders.clear()
