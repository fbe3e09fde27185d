"""Launch the tritonserver that ships inside nvidia-pytriton, wait for readiness, stop cleanly."""
from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import sysconfig
import time
import urllib.request
from dataclasses import dataclass
from pathlib import Path

PACKAGE_ROOT = Path(__file__).resolve().parent
BACKEND_DIR = PACKAGE_ROOT.parent  # holds triton_vlm; put on PYTHONPATH for the stubs


def pytriton_dir() -> Path:
    import pytriton  # noqa: F401  (located, not used)

    return Path(pytriton.__file__).resolve().parent / "tritonserver"


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


class TritonServer:
    """A running tritonserver process over one model repository."""

    def __init__(self, model_repository: str | Path, ports: Ports | None = None, host: str = "127.0.0.1",
                 log_path: str | Path | None = None, verbose: bool = False):
        self.model_repository = Path(model_repository).resolve()
        self.ports = ports or Ports.pick()
        self.host = host
        self.log_path = Path(log_path) if log_path else None
        self.verbose = verbose
        self.proc: subprocess.Popen | None = None
        self._log_file = None

    @property
    def http_url(self) -> str:
        return f"{self.host}:{self.ports.http}"

    @property
    def grpc_url(self) -> str:
        return f"{self.host}:{self.ports.grpc}"

    @property
    def metrics_url(self) -> str:
        return f"http://{self.host}:{self.ports.metrics}/metrics"

    def command(self) -> list[str]:
        root = pytriton_dir()
        return [
            str(root / "bin" / "tritonserver"),
            f"--model-repository={self.model_repository}",
            f"--backend-directory={root / 'backends'}",
            f"--cache-directory={root / 'caches'}",
            f"--http-address={self.host}", f"--http-port={self.ports.http}",
            f"--grpc-address={self.host}", f"--grpc-port={self.ports.grpc}",
            f"--metrics-address={self.host}", f"--metrics-port={self.ports.metrics}",
            "--allow-metrics=true",
            # Python-backend shared-memory regions are named from this prefix; two servers on one
            # host with the same prefix corrupt each other's tensors.
            f"--backend-config=python,shm-region-prefix-name=triton_vlm_{os.getpid()}_{self.ports.grpc}_",
            "--exit-on-error=true",
            "--strict-readiness=true",
            f"--log-verbose={1 if self.verbose else 0}",
        ]

    def start(self, timeout: float = 300.0) -> "TritonServer":
        install_stub()
        if self.log_path:
            self.log_path.parent.mkdir(parents=True, exist_ok=True)
            self._log_file = open(self.log_path, "wb")
            out = self._log_file
        else:
            out = None  # inherit: the user sees the server's own log
        # Own process group, so stop() also reaches the stubs.
        self.proc = subprocess.Popen(self.command(), env=server_env(), stdout=out, stderr=subprocess.STDOUT,
                                     start_new_session=True)
        self._wait_ready(timeout)
        return self

    def _wait_ready(self, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        url = f"http://{self.http_url}/v2/health/ready"
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"tritonserver exited with code {self.proc.returncode} before it was ready:\n"
                                   + self.log_tail())
            try:
                with urllib.request.urlopen(url, timeout=2) as r:
                    if r.status == 200:
                        return
            except OSError:
                pass
            time.sleep(0.5)
        tail = self.log_tail()
        self.stop()
        raise TimeoutError(f"tritonserver not ready after {timeout:.0f}s:\n{tail}")

    def log_tail(self, lines: int = 60) -> str:
        if not self.log_path or not self.log_path.exists():
            return "(server log went to the terminal)"
        if self._log_file:
            self._log_file.flush()
        text = self.log_path.read_text(errors="replace").splitlines()
        return "\n".join(text[-lines:])

    def stop(self, timeout: float = 60.0) -> None:
        if self.proc is None:
            return
        if self.proc.poll() is None:
            try:
                os.killpg(self.proc.pid, signal.SIGINT)
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait()
            except ProcessLookupError:
                pass
        # Stubs normally exit with the server; make sure none outlive it.
        try:
            os.killpg(self.proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        if self._log_file:
            self._log_file.close()
            self._log_file = None
        self.proc = None

    def __enter__(self) -> "TritonServer":
        return self.start() if self.proc is None else self

    def __exit__(self, *exc) -> None:
        self.stop()
