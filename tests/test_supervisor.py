"""The supervisor's decisions against a stand-in server (the real one is in integration/test_supervision.py)."""
from __future__ import annotations

import subprocess
import sys
import time
from dataclasses import dataclass, field

from triton_vlm.supervisor import PINGED, Supervisor


@dataclass
class FakeServer:
    """Live, every model ready, and stubs that answer pings while `answering`."""
    proc: subprocess.Popen
    answering: bool = True
    stopping: bool = False
    restarts: int = 0
    pinged: list = field(default_factory=list)

    def live(self) -> bool:
        return True

    def model_ready(self, model: str) -> bool:
        return True

    def ping(self, model: str, timeout: float) -> bool:
        self.pinged.append(model)
        return self.answering

    def restart(self, timeout: float) -> None:
        self.restarts += 1
        self.answering = True


def supervisor(server: FakeServer, deadlocked_s: float) -> Supervisor:
    sup = Supervisor(server, deadlocked_s=deadlocked_s, probe_every_s=0.0)
    sup._missing = lambda pid: set()  # no stub processes to look at here
    return sup


def test_a_server_whose_stubs_stop_answering_pings_is_restarted_after_deadlocked_s():
    proc = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        server = FakeServer(proc)
        sup = supervisor(server, deadlocked_s=0.3)
        sup.check()
        assert set(server.pinged) == set(PINGED) and server.restarts == 0
        server.answering = False
        sup.check()  # silent, but not for long yet
        assert server.restarts == 0
        time.sleep(0.4)
        sup.check()
        assert server.restarts == 1
        sup.check()  # answering again after the restart: no second one
        assert server.restarts == 1
    finally:
        proc.kill()
        proc.wait()


def test_answered_pings_never_restart():
    proc = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        server = FakeServer(proc)
        sup = supervisor(server, deadlocked_s=0.1)
        for _ in range(5):
            sup.check()
            time.sleep(0.05)
        assert server.restarts == 0 and len(server.pinged) == 5 * len(PINGED)
    finally:
        proc.kill()
        proc.wait()
