"""The `triton-vlm` command as a user runs it: make-tiny, build, serve, stop with SIGTERM."""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from triton_vlm import client
from triton_vlm.server import free_port

CLI = [sys.executable, "-m", "triton_vlm.cli"]


def stub_pids() -> set[int]:
    out = subprocess.run(["pgrep", "-f", "triton_python_backend_stub"], capture_output=True, text=True).stdout
    return {int(p) for p in out.split()}


def wait_for_line(proc: subprocess.Popen, needle: str, timeout: float) -> str:
    deadline = time.monotonic() + timeout
    seen = []
    while time.monotonic() < deadline:
        line = proc.stdout.readline()
        if not line:
            if proc.poll() is not None:
                break
            continue
        seen.append(line)
        if needle in line:
            return line
    raise AssertionError(f"never saw {needle!r}; output:\n{''.join(seen[-40:])}")


def test_make_tiny_build_serve_and_sigterm(tmp_path):
    ckpt, repo = tmp_path / "ckpt", tmp_path / "repo"
    subprocess.run(CLI + ["make-tiny", str(ckpt)], check=True, capture_output=True)
    subprocess.run(CLI + ["build", "--model", str(ckpt), "--output", str(repo), "--llm-param", "num_kv_blocks=64"],
                   check=True, capture_output=True)
    before = stub_pids()
    http, grpc, metrics = free_port(), free_port(), free_port()
    proc = subprocess.Popen(CLI + ["serve", "--model-repository", str(repo), "--http-port", str(http),
                                   "--grpc-port", str(grpc), "--metrics-port", str(metrics),
                                   "--log-file", str(tmp_path / "server.log")],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        wait_for_line(proc, "triton-vlm: ready", 300)
        answer = client.generate_grpc(f"127.0.0.1:{grpc}", "USER: hi\nASSISTANT:", [], {"max_tokens": 4})
        assert isinstance(answer, str)
        assert stub_pids() - before, "the models should run in Python-backend stubs"
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=90) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
    time.sleep(1)
    assert not (stub_pids() - before), "stub processes outlived the server"


def test_a_broken_repository_shows_the_servers_own_error(tmp_path):
    bad = tmp_path / "repo" / "broken"
    (bad / "1").mkdir(parents=True)
    (bad / "config.pbtxt").write_text('backend: "python"\ninput [ { name: "x" data_type: TYPE_NOPE dims: [1] } ]\n')
    proc = subprocess.run(CLI + ["serve", "--model-repository", str(tmp_path / "repo"), "--http-port",
                                 str(free_port()), "--grpc-port", str(free_port()), "--metrics-port",
                                 str(free_port()), "--log-file", str(tmp_path / "server.log"), "--timeout", "60"],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 1
    assert "tritonserver exited" in proc.stderr and "TYPE_NOPE" in proc.stderr
