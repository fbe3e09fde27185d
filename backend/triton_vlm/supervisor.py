"""Keep a TritonServer serving: restart a dead server, reload a model whose Python-backend stub died.

Triton 2.51 does not restart a crashed stub: its model keeps answering ready, new requests fail and
in-flight BLS streams hang. Unloading the model at once makes it not ready (so vlm fails its
in-flight requests and readiness probes see the outage); loading it again starts a fresh stub.
"""
from __future__ import annotations

import sys
import time
from collections import deque
from dataclasses import dataclass, field
from pathlib import Path

import psutil

from .server import TritonServer

STUB = "triton_python_backend_stub"
PINGED = ("vlm", "llm")  # the models that answer a `ping` input


class GaveUp(RuntimeError):
    """Too many recoveries in too little time: exit and let the orchestrator start afresh."""


def find_stubs(server_pid: int) -> dict[str, str]:
    """The server's live stubs, instance name (e.g. llm_0_0) -> model.

    A stub's argv: stub, <repo>/<model>/<version>/model.py, ..., instance, kind."""
    try:
        children = psutil.Process(server_pid).children()
    except psutil.Error:
        return {}
    stubs = {}
    for p in children:
        try:
            argv = p.cmdline()  # a zombie's raises
            if len(argv) >= 4 and argv[0].endswith(STUB) and p.status() != psutil.STATUS_ZOMBIE:
                stubs[argv[-2]] = Path(argv[1]).parents[1].name
        except psutil.Error:
            continue
    return stubs


def exit_reason(proc) -> str:
    if proc is None:
        return "tritonserver is not running"
    code = proc.returncode
    return f"tritonserver was killed by signal {-code}" if code < 0 else f"tritonserver exited with code {code}"


def log(message: str) -> None:
    print(f"{time.strftime('%Y-%m-%dT%H:%M:%S')} triton-vlm supervisor: {message}", file=sys.stderr, flush=True)


@dataclass
class Supervisor:
    """Checks a started server (model_control=True) every `interval` seconds until it is stopped.

    More than `max_restarts` recoveries within `window_s` raise GaveUp; recoveries after the first
    in a window wait 1, 2, 4 ... (at most 30) seconds first. A server that does not answer
    /v2/health/live for `unresponsive_s`, or takes longer than `load_timeout` to reload a model, is
    wedged (a stub's death can abort tritonserver, whose crash handler may then hang): it is
    restarted, with `start_timeout` to get ready. So is a server whose `vlm` or `llm` stub has not
    answered a ping for `deadlocked_s` (probed every `probe_every_s`): Triton 2.51's stub can
    deadlock inside its own BLS code (see README, Robustness), and a frozen stub stays "alive".
    """
    server: TritonServer
    interval: float = 1.0
    max_restarts: int = 5
    window_s: float = 600.0
    load_timeout: float = 120.0
    start_timeout: float = 300.0
    unresponsive_s: float = 30.0
    deadlocked_s: float = 60.0
    probe_every_s: float = 5.0
    answered: float = field(default_factory=time.monotonic)  # when the server last answered
    pinged: float = field(default_factory=time.monotonic)  # when every pinged stub last answered
    probed: float = 0.0  # when the stubs were last pinged
    # Every stub instance seen so far -> its model. Kept across reloads and restarts, so a stub that
    # dies before any round saw it alive (say right after a restart) is still noticed.
    instances: dict[str, str] = field(default_factory=dict)
    recoveries: deque = field(default_factory=deque)  # monotonic times of recent recoveries

    def run(self) -> None:
        if self.server.proc is None:
            raise ValueError("start the server before supervising it")
        self.answered = self.pinged = time.monotonic()
        while not self.server.stopping:
            self.check()
            self._sleep(self.interval)

    def check(self) -> None:
        """One round: restart a dead server, or reload the models whose stubs died."""
        proc = self.server.proc
        if self.server.stopping:
            return
        if proc is None or proc.poll() is not None:
            self._restart_server(exit_reason(proc))
            return
        if self.server.live():
            self.answered = time.monotonic()
        elif time.monotonic() - self.answered > self.unresponsive_s:
            self._restart_server(f"tritonserver has not answered for {self.unresponsive_s:.0f} s")
            return
        if self._deadlocked():
            self._restart_server(f"a Python-backend stub has not answered a ping for {self.deadlocked_s:.0f} s "
                                 "(deadlocked)")
            return
        missing = self._missing(proc.pid)
        if not missing:
            return
        try:
            # A model whose stub died still claims to be ready. To tell it from one that is loading or
            # unloaded on purpose, it must be ready both before and after a second look at the stubs.
            ready = {model for model in missing if self.server.model_ready(model)}
            crashed = sorted(m for m in ready & self._missing(proc.pid) if self.server.model_ready(m))
        except OSError:
            return  # no answer: look again next round
        if crashed:
            self._reload(crashed)

    def _deadlocked(self) -> bool:
        now = time.monotonic()
        if now - self.probed < self.probe_every_s:
            return False
        self.probed = now
        # A model being reloaded is not ready and does not count; ping answers take milliseconds.
        timeout = min(10.0, self.deadlocked_s / 2)
        try:
            if all(self.server.ping(m, timeout) for m in PINGED if self.server.model_ready(m)):
                self.pinged = time.monotonic()
        except OSError:
            return False  # the server does not answer at all: `unresponsive_s` covers that
        return time.monotonic() - self.pinged > self.deadlocked_s

    def _missing(self, server_pid: int) -> set[str]:
        """Models with an instance seen before that has no live stub now."""
        live = find_stubs(server_pid)
        self.instances.update(live)
        return {model for instance, model in self.instances.items() if instance not in live}

    def _reload(self, models: list[str]) -> None:
        self._count_recovery()
        try:
            for model in models:
                log(f"the Python-backend stub of model {model!r} died; unloading {model!r}")
                self.server.unload_model(model, timeout=10)  # readiness turns false, vlm fails in-flight work
            self._sleep(self._backoff())
            for model in models:
                if self.server.stopping:
                    return
                log(f"loading {model!r} again")
                self.server.load_model(model, timeout=self.load_timeout)
                log(f"{model!r} is ready again")
        except (OSError, RuntimeError) as e:
            if self.server.stopping:
                return
            log(f"reloading {', '.join(models)} failed: {e}")
            self._restart_server("a model could not be reloaded", counted=True)
        self.answered = self.pinged = time.monotonic()

    def _restart_server(self, why: str, counted: bool = False) -> None:
        if not counted:
            self._count_recovery()
        self._sleep(self._backoff())
        if self.server.stopping:
            return
        log(f"{why}; restarting tritonserver")
        try:
            self.server.restart(timeout=self.start_timeout)
        except (OSError, RuntimeError) as e:  # TimeoutError is an OSError
            if not self.server.stopping:
                log(f"restarting tritonserver failed: {e}")
            return  # the next check finds it not running and tries again, counted
        finally:
            self.answered = self.pinged = time.monotonic()
        log("tritonserver is ready again")

    def _count_recovery(self) -> None:
        now = time.monotonic()
        while self.recoveries and now - self.recoveries[0] > self.window_s:
            self.recoveries.popleft()
        if len(self.recoveries) >= self.max_restarts:
            raise GaveUp(f"giving up: failed again after {len(self.recoveries)} recoveries "
                         f"within {self.window_s:.0f} s (max_restarts={self.max_restarts})")
        self.recoveries.append(now)

    def _backoff(self) -> float:
        earlier = len(self.recoveries) - 1
        return 0.0 if earlier <= 0 else min(30.0, 2.0 ** (earlier - 1))

    def _sleep(self, seconds: float) -> None:
        end = time.monotonic() + seconds
        while not self.server.stopping and time.monotonic() < end:
            time.sleep(min(0.2, end - time.monotonic()))
