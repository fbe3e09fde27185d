"""Launch the tritonserver that ships inside nvidia-pytriton, wait for readiness, stop cleanly."""
from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import sysconfig
import tempfile
import time
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path

PACKAGE_ROOT = Path(__file__).resolve().parent
BACKEND_DIR = PACKAGE_ROOT.parent  # holds triton_vlm; put on PYTHONPATH for the stubs


def pytriton_dir() -> Path:
    import pytriton  # noqa: F401  (located, not used)

    return Path(pytriton.__file__).resolve().parent / "tritonserver"


def server_dir() -> Path:
    """The tritonserver installation: $TRITON_VLM_SERVER_DIR (NVIDIA's image: /opt/tritonserver, whose
    stub was built for the image's Python), else the one inside nvidia-pytriton."""
    chosen = os.environ.get("TRITON_VLM_SERVER_DIR")
    return Path(chosen) if chosen else pytriton_dir()


def install_stub() -> Path:
    """Copy the stub for this Python into the backend dir: its RPATH only resolves there."""
    root = pytriton_dir()
    version = f"{sys.version_info.major}.{sys.version_info.minor}"
    src = root / "python_backend_stubs" / version / "triton_python_backend_stub"
    dst = root / "backends" / "python" / "triton_python_backend_stub"
    if not src.exists():
        raise RuntimeError(f"nvidia-pytriton ships no Python backend stub for Python {version}")
    if not dst.exists() or dst.stat().st_size != src.stat().st_size:
        shutil.copy2(src, dst)
        dst.chmod(0o755)
    return dst


def server_env() -> dict[str, str]:
    """PATH/LD_LIBRARY_PATH so the stub finds this interpreter's libpython and packages."""
    env = dict(os.environ)
    bindir = str(Path(sys.executable).parent)
    libdir = sysconfig.get_config_var("LIBDIR") or ""
    env["PATH"] = bindir + os.pathsep + env.get("PATH", "")
    env["LD_LIBRARY_PATH"] = os.pathsep.join(p for p in (libdir, env.get("LD_LIBRARY_PATH", "")) if p)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(BACKEND_DIR), env.get("PYTHONPATH", "")) if p)
    # Three stubs share the CPU; spinning OpenMP workers starve each other (measured: 1 ms -> 178 ms a step).
    env.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    return env


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@dataclass
class Ports:
    http: int
    grpc: int
    metrics: int

    @classmethod
    def pick(cls, http: int | None = None, grpc: int | None = None, metrics: int | None = None) -> "Ports":
        return cls(http or free_port(), grpc or free_port(), metrics or free_port())


# Admin APIs that --restrict-admin puts behind a header; inference, health, metadata, model config and
# statistics stay open.
RESTRICTED_APIS = "model-repository,shared-memory,trace,logging"
# Triton expects the header over gRPC as metadata named with this prefix: admin-key -> triton-grpc-protocol-admin-key.
GRPC_HEADER_PREFIX = "triton-grpc-protocol-"


class TritonServer:
    """A running tritonserver process over one model repository.

    model_control: explicit model control (every model loaded at start), so load_model/unload_model work.
    metrics: False turns Triton's metrics endpoint off (--allow-metrics=false).
    admin_header: (key, value) a request must carry to reach the RESTRICTED_APIS: as an HTTP header, and
        over gRPC as metadata GRPC_HEADER_PREFIX + key.
    """

    def __init__(self, model_repository: str | Path, ports: Ports | None = None, host: str = "127.0.0.1",
                 log_path: str | Path | None = None, verbose: bool = False, model_control: bool = False,
                 metrics: bool = True, admin_header: tuple[str, str] | None = None):
        self.model_repository = Path(model_repository).resolve()
        self.ports = ports or Ports.pick()
        self.host = host
        self.log_path = Path(log_path) if log_path else None
        self.verbose = verbose
        self.model_control = model_control
        self.metrics = metrics
        self.admin_header = admin_header
        if admin_header:
            check_admin_header(*admin_header)
        self.proc: subprocess.Popen | None = None
        self.stopping = False  # set by stop(): a supervisor must not act on a server being stopped
        self._log_file = None

    @property
    def http_url(self) -> str:
        return f"{self.host}:{self.ports.http}"

    @property
    def grpc_url(self) -> str:
        return f"{self.host}:{self.ports.grpc}"

    @property
    def metrics_url(self) -> str | None:
        return f"http://{self.host}:{self.ports.metrics}/metrics" if self.metrics else None

    @property
    def shm_prefix(self) -> str:
        # Python-backend shared-memory regions are named from this prefix; two servers on one
        # host with the same prefix corrupt each other's tensors.
        return f"triton_vlm_{os.getpid()}_{self.ports.grpc}_"

    def command(self) -> list[str]:
        root = server_dir()
        return [
            str(root / "bin" / "tritonserver"),
            f"--model-repository={self.model_repository}",
            f"--backend-directory={root / 'backends'}",
            f"--cache-directory={root / 'caches'}",
            f"--http-address={self.host}", f"--http-port={self.ports.http}",
            f"--grpc-address={self.host}", f"--grpc-port={self.ports.grpc}",
            f"--metrics-address={self.host}", f"--metrics-port={self.ports.metrics}",
            f"--allow-metrics={str(self.metrics).lower()}",
            f"--backend-config=python,shm-region-prefix-name={self.shm_prefix}",
            "--exit-on-error=true",
            "--strict-readiness=true",
            f"--log-verbose={1 if self.verbose else 0}",
        ] + self._control_flags() + self._restrict_flags()

    def _control_flags(self) -> list[str]:
        return ["--model-control-mode=explicit", "--load-model=*"] if self.model_control else []

    def _restrict_flags(self) -> list[str]:
        if not self.admin_header:
            return []
        rule = f"{RESTRICTED_APIS}:{self.admin_header[0]}={self.admin_header[1]}"
        return [f"--http-restricted-api={rule}", f"--grpc-restricted-protocol={rule}"]

    def start(self, timeout: float = 300.0) -> "TritonServer":
        """Launch and wait until every model is ready; on failure nothing of the server is left running."""
        if not os.environ.get("TRITON_VLM_SERVER_DIR"):
            install_stub()
        self.stopping = False
        self._launch(log_mode="wb")
        self._wait_ready_or_kill(timeout)
        return self

    def restart(self, timeout: float = 300.0, grace: float = 10.0) -> None:
        """Kill whatever is left of the server (SIGKILL after `grace` s) and start it again on the same
        ports, appending to its log."""
        if self.stopping:
            raise RuntimeError("tritonserver is being stopped; not restarting it")
        self._kill(grace)
        self._launch(log_mode="ab")
        self._wait_ready_or_kill(timeout)

    def _launch(self, log_mode: str) -> None:
        if self.log_path:
            self.log_path.parent.mkdir(parents=True, exist_ok=True)
            self._log_file = open(self.log_path, log_mode)
            out = self._log_file
        else:
            out = None  # inherit: the user sees the server's own log
        # Own process group, so stop() also reaches the stubs.
        self.proc = subprocess.Popen(self.command(), env=server_env(), stdout=out, stderr=subprocess.STDOUT,
                                     start_new_session=True)

    def _wait_ready_or_kill(self, timeout: float) -> None:
        try:
            self._wait_ready(timeout)
        except BaseException:
            self._kill()  # a failed load must not leave the server or its stubs behind
            raise

    def _wait_ready(self, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            proc = self.proc
            if self.stopping or proc is None:
                raise RuntimeError("tritonserver was stopped before it was ready")
            if proc.poll() is not None:
                raise RuntimeError(f"tritonserver exited with code {proc.returncode} before it was ready:\n"
                                   + self.log_tail())
            if self.ready():
                return
            time.sleep(0.5)
        raise TimeoutError(f"tritonserver not ready after {timeout:.0f}s:\n{self.log_tail()}")

    def _request(self, method: str, path: str, timeout: float) -> int:
        """HTTP status of one request to the server; the admin header goes along when configured."""
        headers = dict([self.admin_header]) if self.admin_header else {}
        req = urllib.request.Request(f"http://{self.http_url}{path}", method=method, headers=headers,
                                     data=b"" if method == "POST" else None)
        try:
            with urllib.request.urlopen(req, timeout=timeout) as r:
                return r.status
        except urllib.error.HTTPError as e:
            return e.code

    def ready(self) -> bool:
        """Every model ready (the server runs with --strict-readiness)."""
        try:
            return self._request("GET", "/v2/health/ready", timeout=2) == 200
        except OSError:
            return False

    def live(self) -> bool:
        """The server answers /v2/health/live (within 2 s)."""
        try:
            return self._request("GET", "/v2/health/live", timeout=2) == 200
        except OSError:
            return False

    def ping(self, model: str, timeout: float = 10.0) -> bool:
        """Whether a model's stub answers a `ping` request (vlm and llm take one) within `timeout`."""
        req = urllib.request.Request(f"http://{self.http_url}/v2/models/{model}/generate", data=b'{"ping": true}',
                                     headers={"Content-Type": "application/json"})
        try:
            with urllib.request.urlopen(req, timeout=timeout) as r:
                return r.status == 200
        except OSError:  # HTTPError and timeouts included
            return False

    def model_ready(self, name: str) -> bool:
        """Whether Triton calls the model ready; OSError when the server does not answer."""
        return self._request("GET", f"/v2/models/{name}/ready", timeout=5) == 200

    def load_model(self, name: str, timeout: float = 300.0) -> None:
        """Load (or reload) one model; returns once it is ready. Needs model_control."""
        status = self._request("POST", f"/v2/repository/models/{name}/load", timeout)
        if status != 200:
            raise RuntimeError(f"loading model {name!r} failed (HTTP {status}):\n{self.log_tail(20)}")

    def unload_model(self, name: str, timeout: float = 60.0) -> None:
        """Unload one model: it stops answering ready at once. Needs model_control."""
        status = self._request("POST", f"/v2/repository/models/{name}/unload", timeout)
        if status != 200:
            raise RuntimeError(f"unloading model {name!r} failed (HTTP {status})")

    def log_tail(self, lines: int = 60) -> str:
        if not self.log_path or not self.log_path.exists():
            return "(server log went to the terminal)"
        if self._log_file:
            self._log_file.flush()
        text = self.log_path.read_text(errors="replace").splitlines()
        return "\n".join(text[-lines:])

    def stop(self, timeout: float = 60.0) -> None:
        """Stop for good: SIGINT, then SIGKILL after `timeout`; a supervisor stops acting first."""
        self.stopping = True
        self._kill(timeout)

    def _kill(self, timeout: float = 60.0) -> None:
        proc = self.proc
        if proc is None:
            return
        if proc.poll() is None:
            try:
                # The server alone: it unloads its models and finalizes their stubs. A SIGINT to the
                # whole group also interrupted the stubs mid-call (llm then segfaulted in Triton's
                # metric code at exit).
                proc.send_signal(signal.SIGINT)
                proc.wait(timeout)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()
            except ProcessLookupError:
                pass
        # Stubs normally exit with the server; make sure none outlive it.
        try:
            os.killpg(proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        # A killed server leaves its stubs' shared-memory regions behind; the prefix is ours alone.
        for region in Path("/dev/shm").glob(self.shm_prefix + "*"):
            region.unlink(missing_ok=True)
        # The abort boards of its models' instances (triton/aborts.py) are named by its pid.
        for board in Path(tempfile.gettempdir()).glob(f"triton_vlm_aborts_{proc.pid}_*"):
            shutil.rmtree(board, ignore_errors=True)
        if self._log_file:
            self._log_file.close()
            self._log_file = None
        self.proc = None

    def __enter__(self) -> "TritonServer":
        return self.start() if self.proc is None else self

    def __exit__(self, *exc) -> None:
        self.stop()


def check_admin_header(key: str, value: str) -> None:
    """Triton splits the restriction flag on ':' and '=', and gRPC metadata keys are lower case."""
    if not key or not value or any(c in key + value for c in ":=, ") or key != key.lower():
        raise ValueError(f"admin header {key}={value}: key and value must be non-empty, the key lower case, "
                         "neither containing ':', '=', ',' or spaces")
