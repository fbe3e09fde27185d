"""The `triton-vlm` command as a user runs it: make-tiny, build, serve, stop with SIGTERM."""
from __future__ import annotations

import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

import psutil
import pytest
from helpers import LLM_PARAMS

from triton_vlm import client
from triton_vlm.repository import BuildOptions, build_repository
from triton_vlm.server import free_port

CLI = [sys.executable, "-m", "triton_vlm.cli"]


def repo_processes(repo: Path) -> list[psutil.Process]:
    """Live processes serving this repository: tritonserver names it, each stub its model.py in it."""
    found = []
    for p in psutil.process_iter():
        try:
            if p.status() != psutil.STATUS_ZOMBIE and any(str(repo) in arg for arg in p.cmdline()):
                found.append(p)
        except psutil.Error:
            pass
    return found


def serve(repo: Path, tmp_path: Path, *flags: str) -> tuple[subprocess.Popen, int, int]:
    """`triton-vlm serve` on free ports; returns the process and its gRPC and metrics ports."""
    http, grpc, metrics = free_port(), free_port(), free_port()
    proc = subprocess.Popen(CLI + ["serve", "--model-repository", str(repo), "--http-port", str(http),
                                   "--grpc-port", str(grpc), "--metrics-port", str(metrics),
                                   "--log-file", str(tmp_path / "server.log"), *flags],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    return proc, grpc, metrics


def stop(proc: subprocess.Popen) -> None:
    """SIGTERM first: a SIGKILLed serve cannot stop its server, which then lives on."""
    if proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(90)
        except subprocess.TimeoutExpired:
            proc.kill()


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
    proc, grpc, _ = serve(repo, tmp_path)  # supervised, the default
    try:
        wait_for_line(proc, "triton-vlm: ready", 300)
        answer = client.generate_grpc(f"127.0.0.1:{grpc}", "USER: hi\nASSISTANT:", [], {"max_tokens": 4})
        assert isinstance(answer, str)
        names = [p.name() for p in repo_processes(repo)]
        assert names.count("tritonserver") == 1 and names.count("triton_python_backend_stub") == 3, names
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=90) == 0
    finally:
        stop(proc)
    time.sleep(1)
    assert repo_processes(repo) == [], "the server or its stubs outlived triton-vlm serve"


def test_serve_without_metrics_still_serves(tiny_checkpoint, hf_tiny, tmp_path):
    repo = build_repository(tiny_checkpoint, tmp_path / "repo", BuildOptions(llm=LLM_PARAMS))
    proc, grpc, metrics = serve(repo, tmp_path, "--no-metrics", "--no-supervise")
    try:
        line = wait_for_line(proc, "triton-vlm: ready", 300)
        assert "metrics=off" in line
        with pytest.raises(urllib.error.URLError):  # nothing listens on the metrics port
            urllib.request.urlopen(f"http://127.0.0.1:{metrics}/metrics", timeout=5)
        greedy = {"max_tokens": 8, "temperature": 0}
        assert client.generate_grpc(f"127.0.0.1:{grpc}", "USER: hi\nASSISTANT:", [], greedy) == \
            hf_tiny.generate("USER: hi\nASSISTANT:", [], 8)
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=90) == 0
    finally:
        stop(proc)
    time.sleep(1)
    assert repo_processes(repo) == []


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


@pytest.mark.parametrize("flag", ["novalue", "Admin-Key=x", "key=a:b", "=x"])
def test_a_malformed_restrict_admin_is_refused_by_name(flag, tmp_path):
    proc = subprocess.run(CLI + ["serve", "--model-repository", str(tmp_path), "--restrict-admin", flag],
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 2
    assert f"argument --restrict-admin: admin header {flag}" in proc.stderr, proc.stderr


def test_serve_with_openai_port_and_the_standalone_openai_command(tiny_checkpoint, hf_tiny, tmp_path):
    import openai

    repo = build_repository(tiny_checkpoint, tmp_path / "repo", BuildOptions(llm=LLM_PARAMS))
    openai_port, standalone_port = free_port(), free_port()
    proc, grpc, _ = serve(repo, tmp_path, "--no-supervise", "--openai-port", str(openai_port),
                          "--served-model-name", "tiny-llava")
    standalone = None
    try:
        wait_for_line(proc, f"triton-vlm: OpenAI API at http://127.0.0.1:{openai_port}/v1", 300)
        standalone = subprocess.Popen(CLI + ["openai", "--grpc-url", f"127.0.0.1:{grpc}", "--port",
                                             str(standalone_port)], stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                      text=True)
        wait_for_line(standalone, "triton-vlm: OpenAI API at", 60)
        prompt = "USER: hi\nASSISTANT:"  # what the tiny checkpoint's template makes of one user turn
        expected = hf_tiny.generate(prompt, [], 8)
        for port, name in ((openai_port, "tiny-llava"), (standalone_port, "tiny")):
            sdk = openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="unused", max_retries=3)
            assert [m.id for m in sdk.models.list().data] == [name]
            reply = sdk.chat.completions.create(model=name, messages=[{"role": "user", "content": "hi"}],
                                                max_tokens=8, temperature=0)
            assert reply.choices[0].message.content == expected
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=90) == 0
    finally:
        if standalone is not None:
            standalone.terminate()
            standalone.wait(30)
        stop(proc)


def test_build_refuses_an_unsupported_family_by_name(tmp_path):
    import json

    ckpt = tmp_path / "ckpt"
    ckpt.mkdir()
    (ckpt / "config.json").write_text(json.dumps({"model_type": "idefics3"}))
    done = subprocess.run(CLI + ["build", "--model", str(ckpt), "--output", str(tmp_path / "repo")],
                          capture_output=True, text=True, timeout=300)
    assert done.returncode != 0
    assert "model_type 'idefics3' is not supported; supported: llava, qwen2_5_vl, qwen2_vl" in done.stderr
    assert "Traceback" not in done.stderr


def test_make_tiny_qwen_and_build(tmp_path):
    ckpt = tmp_path / "qwen"
    subprocess.run(CLI + ["make-tiny", str(ckpt), "--family", "qwen2_5_vl"], check=True, timeout=300,
                   capture_output=True)
    repo = tmp_path / "repo"
    subprocess.run(CLI + ["build", "--model", str(ckpt), "--output", str(repo)], check=True, timeout=600,
                   capture_output=True)
    config = (repo / "vision_encoder" / "config.pbtxt").read_text()
    assert 'name: "image_grid_thw" data_type: TYPE_INT64 dims: [ -1, 3 ]' in config
    assert (repo / "vision_encoder" / "1" / "model.onnx").is_file()
    import importlib.util

    if importlib.util.find_spec("tensorrt") is not None:
        return  # a TensorRT host would build the plan; the refusal below is for hosts without it
    done = subprocess.run(CLI + ["build", "--model", str(ckpt), "--output", str(repo), "--vision-backend",
                                 "tensorrt"], capture_output=True, text=True, timeout=300)
    # No TensorRT here: refused by name, before the repository is touched.
    assert done.returncode != 0 and "--vision-backend onnxruntime" in done.stderr and "Traceback" not in done.stderr
    assert (repo / "vision_encoder" / "1" / "model.onnx").is_file()  # refused before touching the repository
