"""`triton-vlm serve` under its supervisor, as a user runs it: a crashed llm stub or tritonserver comes
back with no manual action, requests caught in the crash end with an error instead of hanging, a
crash loop ends the command with a non-zero status, and --restrict-admin guards the model APIs.

One server serves the whole module; the tests run in file order and each leaves it serving."""
from __future__ import annotations

import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path

import psutil
import pytest
import tritonclient.grpc as grpcclient
from helpers import LLM_PARAMS
from tritonclient.utils import InferenceServerException

from triton_vlm import client
from triton_vlm.repository import BuildOptions, build_repository
from triton_vlm.server import GRPC_HEADER_PREFIX, free_port

CLI = [sys.executable, "-m", "triton_vlm.cli"]
ADMIN = ("admin-key", "open-sesame")
MAX_RESTARTS = 3
PROMPT = "USER: Tell me a story about a cat.\nASSISTANT:"
GREEDY = {"max_tokens": 8, "temperature": 0}
LONG = {"max_tokens": 2000, "ignore_eos": True, "temperature": 0}  # runs far longer than the tests wait
RECOVERY_S = 120  # from a crash to serving again


def wait_until(predicate, timeout: float, interval: float = 0.1) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(interval)
    return predicate()


def alive(p: psutil.Process) -> bool:
    try:
        return p.is_running() and p.status() != psutil.STATUS_ZOMBIE
    except psutil.Error:
        return False


def survivors(repo: Path) -> list[psutil.Process]:
    """Live processes of this repository's server: tritonserver names it, each stub its model.py in it."""
    found = []
    for p in psutil.process_iter():
        try:
            if alive(p) and any(str(repo) in arg for arg in p.cmdline()):
                found.append(p)
        except psutil.Error:
            pass
    return found


@dataclass
class Served:
    proc: subprocess.Popen  # triton-vlm serve
    repo: Path
    http: str
    grpc: str
    output: list[str] = field(default_factory=list)  # its stdout and stderr, line by line

    def text(self) -> str:
        return "".join(self.output)

    def server(self) -> psutil.Process:
        (server,) = [p for p in psutil.Process(self.proc.pid).children() if p.name() == "tritonserver"]
        return server

    def stub(self, instance: str) -> psutil.Process | None:
        try:
            children = self.server().children()
        except (psutil.Error, ValueError):  # serve or its server is gone
            return None
        for p in children:
            try:
                if alive(p) and p.cmdline()[-2] == instance:
                    return p
            except (psutil.Error, IndexError):
                pass
        return None

    def ready(self) -> bool:
        try:
            with urllib.request.urlopen(f"http://{self.http}/v2/health/ready", timeout=2) as r:
                return r.status == 200
        except OSError:
            return False

    def settled(self) -> bool:
        """Ready, and the supervisor's last word, if any, is that it recovered."""
        last = [line for line in self.output if line.startswith(("triton-vlm", "20"))][-1]
        return ("triton-vlm: ready" in last or "ready again" in last) and self.ready()

    def post(self, path: str, headers: dict | None = None) -> int:
        req = urllib.request.Request(f"http://{self.http}{path}", data=b"", method="POST", headers=headers or {})
        try:
            with urllib.request.urlopen(req, timeout=120) as r:
                return r.status
        except urllib.error.HTTPError as e:
            return e.code

    def answer(self) -> str:
        return client.generate_grpc(self.grpc, PROMPT, [], GREEDY)


@pytest.fixture(scope="module")
def served(tiny_checkpoint, tmp_path_factory):
    repo = build_repository(tiny_checkpoint, tmp_path_factory.mktemp("supervised") / "repo",
                            BuildOptions(llm=LLM_PARAMS))
    http, grpc = free_port(), free_port()
    proc = subprocess.Popen(CLI + ["serve", "--model-repository", str(repo), "--http-port", str(http),
                                   "--grpc-port", str(grpc), "--metrics-port", str(free_port()),
                                   "--log-file", str(repo.parent / "server.log"), "--restrict-admin", "=".join(ADMIN),
                                   "--max-restarts", str(MAX_RESTARTS)],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    served = Served(proc, repo, f"127.0.0.1:{http}", f"127.0.0.1:{grpc}")

    def read():
        for line in proc.stdout:
            served.output.append(line)

    threading.Thread(target=read, daemon=True).start()
    try:
        assert wait_until(lambda: "triton-vlm: ready" in served.text() or proc.poll() is not None, 300), served.text()
        assert "triton-vlm: ready" in served.text(), served.text()
        yield served
    finally:
        if proc.poll() is None:
            proc.terminate()
            try:
                proc.wait(90)
            except subprocess.TimeoutExpired:
                proc.kill()
        time.sleep(0.5)
        (repo.parent / "serve.out").write_text(served.text())  # the supervisor's log, for a failure's autopsy
        assert survivors(repo) == [], "the server or a stub outlived triton-vlm serve"


def test_admin_apis_need_the_header_and_inference_stays_open(served):
    grpc = grpcclient.InferenceServerClient(served.grpc)
    assert served.post("/v2/repository/models/llm/unload") == 403
    with pytest.raises(InferenceServerException, match="restricted"):
        grpc.unload_model("llm")
    assert grpc.is_model_ready("llm") and served.ready()
    # Inference, health and statistics need no header.
    before = served.answer()
    assert before
    with urllib.request.urlopen(f"http://{served.http}/v2/models/llm/stats", timeout=10) as r:
        assert r.status == 200

    # With the header: unload, and the supervisor leaves a deliberate unload alone.
    stub = served.stub("llm_0_0")
    with pytest.raises(InferenceServerException, match="restricted"):
        grpc.unload_model("llm", headers=dict([ADMIN]))  # gRPC wants the key prefixed
    grpc.unload_model("llm", headers={GRPC_HEADER_PREFIX + ADMIN[0]: ADMIN[1]})
    assert not grpc.is_model_ready("llm")
    assert wait_until(lambda: not alive(stub), 60), "unloading llm should end its stub"
    time.sleep(3)  # three supervisor rounds
    assert not grpc.is_model_ready("llm") and served.stub("llm_0_0") is None
    assert served.post("/v2/repository/models/llm/load", dict([ADMIN])) == 200
    assert served.ready() and served.answer() == before
    assert "died" not in served.text() and "restarting" not in served.text()


class InFlight:
    """Long greedy streams over gRPC, each on its own thread; `results` holds how each ended."""

    def __init__(self, served: Served, n: int = 3):
        self.results: list = [None] * n
        self.started = [threading.Event() for _ in range(n)]
        self.threads = [threading.Thread(target=self._generate, args=(served, i), daemon=True) for i in range(n)]
        for t in self.threads:
            t.start()
        assert all(e.wait(60) for e in self.started) and self.results == [None] * n, self.results

    def _generate(self, served: Served, i: int) -> None:
        try:
            for _ in client.stream_grpc(served.grpc, PROMPT, [], LONG, timeout=60):
                self.started[i].set()
            self.results[i] = "finished"
        except Exception as e:  # VLMError from the server; queue.Empty if it went silent
            self.results[i] = e
        self.started[i].set()

    def join(self, deadline: float) -> None:
        for t in self.threads:
            t.join(timeout=max(0.0, deadline - time.monotonic()))
        assert not any(t.is_alive() for t in self.threads), "requests caught in the crash still hang"
        assert all(isinstance(r, client.VLMError) for r in self.results), self.results


def test_a_killed_llm_stub_is_reloaded_and_its_requests_fail_fast(served):
    before = served.answer()
    requests = InFlight(served)
    served.stub("llm_0_0").kill()
    killed = time.monotonic()
    assert wait_until(lambda: not served.ready(), 10), "readiness should turn false once llm is unloaded"
    requests.join(deadline=killed + 30)
    assert wait_until(served.settled, RECOVERY_S), served.text()
    assert served.answer() == before
    assert time.monotonic() - killed < RECOVERY_S
    # Usually the supervisor unloads and reloads llm. Sometimes tritonserver itself aborts on the dead
    # stub's shared-memory lock (boost::interprocess::lock_exception) and the whole server is restarted.
    log = served.text()
    assert "stub of model 'llm' died; unloading 'llm'" in log or "killed by signal 6; restarting" in log, log


def test_a_killed_tritonserver_is_restarted(served):
    before = served.answer()
    requests = InFlight(served)
    server = served.server()
    stubs = server.children()
    server.kill()
    killed = time.monotonic()
    assert wait_until(lambda: not served.ready(), 10)
    requests.join(deadline=killed + 30)
    assert wait_until(served.settled, RECOVERY_S), served.text()
    assert served.answer() == before
    assert time.monotonic() - killed < RECOVERY_S
    assert served.server().pid != server.pid
    assert not any(alive(s) for s in stubs), "the dead server's stubs outlived it"
    log = served.text()
    assert "tritonserver was killed by signal 9; restarting tritonserver" in log, log


def test_a_crash_loop_makes_serve_exit_nonzero(served):
    kills = 0
    while served.proc.poll() is None and kills <= MAX_RESTARTS:
        assert wait_until(served.settled, RECOVERY_S), served.text()
        stub = served.stub("llm_0_0")
        stub.kill()
        kills += 1
        # Either the supervisor reloads llm (a new stub serves) or it gives up and serve exits.
        assert wait_until(lambda: served.proc.poll() is not None or (
            served.settled() and served.stub("llm_0_0") not in (None, stub)), RECOVERY_S), served.text()
    assert served.proc.wait(60) == 1
    assert "giving up" in served.text()
    time.sleep(0.5)
    assert survivors(served.repo) == []
