"""End to end through a real tritonserver: HF parity, batching, streaming, cancellation, optional outputs."""
from __future__ import annotations

import time
from concurrent.futures import ThreadPoolExecutor

import pytest

from helpers import PROMPTS, ask, images_for, metric, rng_image, wait_for_metric
from triton_vlm import client

MAX_TOKENS = 24
GREEDY = {"max_tokens": MAX_TOKENS, "temperature": 0}


@pytest.mark.parametrize("n_images", [0, 1, 2])
@pytest.mark.parametrize("stream", [True, False], ids=["stream", "nostream"])
@pytest.mark.parametrize("protocol", ["grpc", "http"])
def test_greedy_output_equals_hf(tiny_server, hf_tiny, photos, protocol, stream, n_images):
    prompt, images = PROMPTS[n_images], images_for(n_images, photos)
    expected = hf_tiny.generate(prompt, images, MAX_TOKENS)
    assert ask(tiny_server, protocol, stream, prompt, images, GREEDY) == expected


@pytest.mark.parametrize("n_images", [0, 1, 2])
@pytest.mark.parametrize("protocol", ["grpc", "http"])
def test_second_geometry_equals_hf(second_server, hf_second, photos, protocol, n_images):
    prompt, images = PROMPTS[n_images], images_for(n_images, photos)
    expected = hf_second.generate(prompt, images, MAX_TOKENS)
    assert ask(second_server, protocol, protocol == "grpc", prompt, images, GREEDY) == expected


def test_streaming_sends_deltas(tiny_server, photos):
    pieces = list(client.stream_grpc(tiny_server.grpc_url, PROMPTS[1], images_for(1, photos), GREEDY))
    assert len(pieces) > 1
    assert "".join(pieces) == client.generate_grpc(tiny_server.grpc_url, PROMPTS[1], images_for(1, photos),
                                                   GREEDY, stream=False)


def test_prompt_is_prepended_unless_excluded(tiny_server, photos):
    images = images_for(1, photos)
    answer = client.generate_grpc(tiny_server.grpc_url, PROMPTS[1], images, GREEDY, stream=False)
    full = client.generate_grpc(tiny_server.grpc_url, PROMPTS[1], images, GREEDY, stream=False, exclude_input=False)
    assert full == PROMPTS[1] + answer


def test_base64_and_data_url_images_equal_raw_bytes(tiny_server, photos):
    import base64

    raw = photos["coffee"]
    b64 = base64.b64encode(raw)
    answers = {client.generate_grpc(tiny_server.grpc_url, PROMPTS[1], [img], GREEDY)
               for img in (raw, b64, b"data:image/png;base64," + b64)}
    assert len(answers) == 1


def test_concurrent_requests_each_return_their_solo_output(tiny_server, hf_tiny, photos):
    cases = []
    for i in range(10):
        n = i % 3
        images = [rng_image(100 + i + k) for k in range(n)]
        prompt = PROMPTS[n].replace("ASSISTANT:", " " + "please " * i + "\nASSISTANT:")
        sampling = {"max_tokens": 8 + 3 * i, "temperature": 0}
        cases.append((prompt, images, sampling))
    solo = [hf_tiny.generate(p, imgs, s["max_tokens"]) for p, imgs, s in cases]
    with ThreadPoolExecutor(len(cases)) as pool:
        futures = [pool.submit(client.generate_grpc, tiny_server.grpc_url, p, imgs, s) for p, imgs, s in cases]
        together = [f.result() for f in futures]
    assert together == solo
    deadline = time.monotonic() + 10
    while metric(tiny_server, "triton_vlm_kv_blocks_used") != 0 and time.monotonic() < deadline:
        time.sleep(0.2)
    assert metric(tiny_server, "triton_vlm_kv_blocks_used") == 0
    assert metric(tiny_server, "triton_vlm_kv_blocks_total") == 512


def test_vllm_backend_style_string_parameters(tiny_server, hf_tiny):
    # Triton vLLM-backend examples send numbers as strings.
    out = client.generate_grpc(tiny_server.grpc_url, PROMPTS[0], [], {"max_tokens": "5", "temperature": "0"})
    assert out == hf_tiny.generate(PROMPTS[0], [], 5)


def test_default_max_tokens_is_vllms_16(tiny_server, hf_tiny):
    ids = hf_tiny.generate_ids(PROMPTS[0], [], 16)
    out = client.generate_grpc(tiny_server.grpc_url, PROMPTS[0], [], {"temperature": 0, "ignore_eos": True})
    assert len(hf_tiny.processor.tokenizer(out, add_special_tokens=False)["input_ids"]) > 0
    assert out == hf_tiny.generate(PROMPTS[0], [], 16) or len(ids) < 16


def test_cancelled_stream_is_aborted_and_frees_its_blocks(tiny_server):
    import queue

    import tritonclient.grpc as grpcclient

    long_run = {"max_tokens": 2000, "ignore_eos": True, "temperature": 0}
    results: queue.Queue = queue.Queue()
    grpc = grpcclient.InferenceServerClient(tiny_server.grpc_url)
    grpc.start_stream(callback=lambda result, error: results.put((result, error)))
    grpc.async_stream_infer("vlm", client.grpc_inputs(PROMPTS[0], [], True, long_run))
    for _ in range(3):
        result, error = results.get(timeout=60)
        assert error is None
    assert wait_for_metric(tiny_server, "triton_vlm_requests_running", 1) == 1  # gauges lag up to 100 ms
    grpc.stop_stream(cancel_requests=True)
    grpc.close()
    cancelled_at = time.monotonic()
    while metric(tiny_server, "triton_vlm_requests_running") != 0 and time.monotonic() - cancelled_at < 30:
        time.sleep(0.05)
    aborted_after = time.monotonic() - cancelled_at
    assert metric(tiny_server, "triton_vlm_kv_blocks_used") == 0
    # Running to the end would take far longer than an abort does: time the full run for comparison.
    started = time.monotonic()
    client.generate_grpc(tiny_server.grpc_url, PROMPTS[0], [], long_run, stream=False)
    full_run = time.monotonic() - started
    assert aborted_after < full_run / 3, (aborted_after, full_run)


@pytest.mark.parametrize("stream", [True, False], ids=["stream", "nostream"])
def test_vllm_backend_optional_outputs(tiny_server, hf_tiny, photos, stream):
    images = images_for(1, photos)
    n_prompt = hf_tiny.inputs(PROMPTS[1], images)["input_ids"].shape[1]
    inputs = client.grpc_inputs(PROMPTS[1], images, stream, {"max_tokens": 5, "temperature": 0, "ignore_eos": True},
                                returns=("finish_reason", "num_input_tokens", "num_output_tokens"))
    results = [r for r in client.stream_grpc_results(tiny_server.grpc_url, inputs) if r.as_numpy("text_output") is not None]
    reasons = [r.as_numpy("finish_reason")[0].decode() for r in results]
    assert reasons[-1] == "length" and all(r == "None" for r in reasons[:-1])  # str(None), as the vLLM backend
    assert all(r.as_numpy("num_input_tokens")[0] == n_prompt for r in results)
    assert sum(int(r.as_numpy("num_output_tokens")[0]) for r in results) == 5
    assert len(results) > 1 if stream else len(results) == 1
