"""The cpu overlay's container, run as the kubelet would run it: the image's entrypoint
(deploy/start.sh) with the rendered env and args (ports moved to free ones). Its probes' paths and
ports answer as the probes expect, a crashed stub turns the readiness probe false until the model is
back, and the metrics the HPA scales on (through the prometheus-adapter rules) are exported."""
from __future__ import annotations

import os
import re
import secrets
import signal
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request

import pytest
import yaml

from helpers import PROMPTS
from k8s_manifests import DEPLOY, expand, flag, one, port_number, render, serving_container
from triton_vlm import client
from triton_vlm.server import free_port

PORT_FLAGS = ("http-port", "grpc-port", "metrics-port", "openai-port")
RECOVERY_S = 120


def status(url: str) -> int:
    try:
        with urllib.request.urlopen(url, timeout=2) as r:
            return r.status
    except urllib.error.HTTPError as e:
        return e.code
    except OSError:
        return 0


def wait_until(predicate, timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            return False
        time.sleep(0.2)
    return True


@pytest.fixture(scope="module")
def pod(tiny_checkpoint, tmp_path_factory):
    """(container spec, {container port: where it listens here}, the process)."""
    container = serving_container(one(render("cpu"), "Deployment"))
    env = {e["name"]: e.get("value", "") for e in container["env"]}
    env.update(ADMIN_KEY=secrets.token_hex(8), MODEL_DIR=str(tiny_checkpoint),
               REPOSITORY=str(tmp_path_factory.mktemp("pod") / "repository"),
               BUILD_FLAGS=env["BUILD_FLAGS"] + " --llm-param num_kv_blocks=512")  # a small pool for a test
    ports = {int(flag(container["args"], name)): free_port() for name in PORT_FLAGS}
    args = [expand(a, env) for a in container["args"]]
    for name in PORT_FLAGS:  # the container's ports may be taken on this shared host
        old = f"--{name}={flag(container['args'], name)}"
        args[args.index(old)] = f"--{name}={ports[int(flag(container['args'], name))]}"
    full_env = {**os.environ, **env, "PATH": f"{os.path.dirname(sys.executable)}:{os.environ['PATH']}"}
    proc = subprocess.Popen([str(DEPLOY / "start.sh"), *args], env=full_env, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)
    output: list[str] = []
    threading.Thread(target=lambda: output.extend(proc.stdout), daemon=True).start()
    try:
        assert wait_until(lambda: "triton-vlm: ready" in "".join(output) or proc.poll() is not None, 600)
        assert "triton-vlm: ready" in "".join(output), "".join(output)[-5000:]
        yield container, ports, proc
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(90)
        except subprocess.TimeoutExpired:
            proc.kill()


def probe_url(container: dict, ports: dict[int, int], probe: str) -> str:
    get = container[probe]["httpGet"]
    return f"http://127.0.0.1:{ports[port_number(container, get['port'])]}{get['path']}"


def test_probes_answer_where_they_look(pod):
    container, ports, _ = pod
    for probe in ("startupProbe", "readinessProbe", "livenessProbe"):
        assert status(probe_url(container, ports, probe)) == 200, probe
    # And what the probes look at is what clients use: the Service's http port serves vlm.
    http = ports[port_number(container, "http")]
    grpc = ports[port_number(container, "grpc")]
    assert client.generate_http(f"127.0.0.1:{http}", PROMPTS[0], [], {"max_tokens": 4, "temperature": 0})
    assert client.generate_grpc(f"127.0.0.1:{grpc}", PROMPTS[0], [], {"max_tokens": 4, "temperature": 0})
    openai = f"http://127.0.0.1:{ports[port_number(container, 'openai')]}/health"
    assert wait_until(lambda: status(openai) == 200, 30)  # uvicorn starts beside the server


def test_hpa_metrics_come_from_metrics_the_pod_exports(pod):
    container, ports, _ = pod
    objects = render("cpu")
    (endpoint,) = one(objects, "PodMonitor")["spec"]["podMetricsEndpoints"]
    scraped = urllib.request.urlopen(f"http://127.0.0.1:{ports[port_number(container, endpoint['port'])]}"
                                     f"{endpoint['path']}", timeout=10).read().decode()
    exported = set(re.findall(r"^([a-zA-Z_:][a-zA-Z0-9_:]*)(?:\{| )", scraped, re.M))
    rules = {r["name"]["as"]: r for r in
             yaml.safe_load(one(objects, "ConfigMap")["data"]["config.yaml"])["rules"]}
    for metric in one(objects, "HorizontalPodAutoscaler")["spec"]["metrics"]:
        rule = rules[metric["pods"]["metric"]["name"]]
        series = re.match(r"(\w+)\{", rule["seriesQuery"]).group(1)
        assert re.fullmatch(rule["name"]["matches"].strip("^$"), series)
        used = {series, *re.findall(r"\b(triton_vlm_\w+|nv_\w+)\{", rule["metricsQuery"])}
        assert used <= exported, f"{metric['pods']['metric']['name']}: {used - exported} not exported"


def test_a_crashed_stub_fails_the_readiness_probe_until_its_model_is_back(pod):
    import psutil

    container, ports, proc = pod
    ready = probe_url(container, ports, "readinessProbe")
    live = probe_url(container, ports, "livenessProbe")
    server = next(p for p in psutil.Process(proc.pid).children() if p.name() == "tritonserver")
    stub = next(p for p in server.children() if p.cmdline()[-2] == "llm_0_0")
    stub.kill()
    assert wait_until(lambda: status(ready) != 200, 10), "the pod would stay in the Service"
    assert status(live) == 200  # not restarted by the kubelet: the supervisor reloads the model
    assert wait_until(lambda: status(ready) == 200, RECOVERY_S)
