"""Two llm engines in one server (build --llm-instances 2, KIND_CPU): both take work, answers stay
exact, and an abort reaches the engine that runs the request whichever instance Triton hands it to."""
from __future__ import annotations

import time
from concurrent.futures import ThreadPoolExecutor

import pytest

from helpers import PROMPTS, metric_by_instance, serve, stub_pids
from test_overload import LONG, cancel, start_stream
from triton_vlm import client

INSTANCES = {"llm_0_0", "llm_0_1"}


@pytest.fixture(scope="module")
def two_engines(tiny_checkpoint, tmp_path_factory):
    server = serve(tiny_checkpoint, tmp_path_factory, "two-engines", llm_instances=2)
    yield server
    server.stop()


def wait_for_instances(server, name: str, done, timeout: float = 10) -> dict[str, float]:
    """The gauge per instance once `done(values)` holds, or its last values after `timeout` s."""
    deadline = time.monotonic() + timeout
    while not done(values := metric_by_instance(server, name)) and time.monotonic() < deadline:
        time.sleep(0.05)
    return values


def test_two_engines_both_take_work_and_answer_exactly(two_engines, hf_tiny):
    assert INSTANCES <= set(stub_pids(two_engines))  # two stub processes, each its own engine
    before = metric_by_instance(two_engines, "triton_vlm_requests_admitted")
    assert set(before) == INSTANCES
    prompts = [PROMPTS[0].replace("cat", word) for word in
               ("cat", "dog", "ship", "tree", "river", "city", "moon", "robot", "bird", "train", "storm", "song")]
    solo = [hf_tiny.generate(p, [], 24) for p in prompts]
    with ThreadPoolExecutor(len(prompts)) as pool:
        answers = list(pool.map(lambda p: client.generate_grpc(two_engines.grpc_url, p,
                                                               sampling={"max_tokens": 24, "temperature": 0}),
                                prompts))
    assert answers == solo
    admitted = wait_for_instances(two_engines, "triton_vlm_requests_admitted",
                                  lambda v: sum(v.values()) - sum(before.values()) == len(prompts))
    took = {name: admitted[name] - before[name] for name in INSTANCES}
    assert sum(took.values()) == len(prompts)
    assert all(n > 0 for n in took.values()), f"one engine took every request: {took}"
    used = wait_for_instances(two_engines, "triton_vlm_kv_blocks_used", lambda v: not any(v.values()))
    assert used == {name: 0 for name in INSTANCES}


def test_cancelled_streams_free_their_blocks_on_both_engines(two_engines):
    # vlm aborts each llm request by id, and Triton gives each abort to either instance: half of them
    # reach the other engine, which must pass it on (triton/aborts.py). Without that, these requests
    # would hold their blocks until their 1500 tokens are done.
    streams = [start_stream(two_engines.grpc_url, PROMPTS[0], sampling=LONG) for _ in range(8)]
    running = wait_for_instances(two_engines, "triton_vlm_requests_running", lambda v: sum(v.values()) == 8)
    assert sum(running.values()) == 8 and all(running.values()), running
    for grpc, _ in streams:
        cancel(grpc)
    used = wait_for_instances(two_engines, "triton_vlm_kv_blocks_used", lambda v: not any(v.values()), timeout=3)
    assert used == {name: 0 for name in INSTANCES}
