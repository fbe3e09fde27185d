"""The metrics port after a known workload: vLLM-backend counters and histograms, TensorRT-LLM gauges, ours."""
from __future__ import annotations

import time

from helpers import PROMPTS, images_for, rng_image, sample, scrape
from triton_vlm import client

LLM = {"model": "llm", "version": "1"}
VLM = {"model": "vlm", "version": "1"}


def run(server, prompt, images, sampling, stream=True) -> int:
    """One request to its end; its prompt length (image tokens included)."""
    inputs = client.grpc_inputs(prompt, images, stream, sampling, returns=("num_input_tokens",))
    results = list(client.stream_grpc_results(server.grpc_url, inputs))
    return int(results[-1].as_numpy("num_input_tokens")[0])


def settled(server, before=None, want=None, timeout=10.0):
    """Samples once the engine is idle and, given `want` {(name, labels): delta}, every delta is reached;
    without `want`, once ours stop changing too (earlier tests' last requests are published up to 100 ms
    late, from the stubs' metrics threads)."""
    deadline = time.monotonic() + timeout
    last = None
    while True:
        now = scrape(server)
        idle = sample(now, "vllm:num_requests_running", **LLM) == 0 == sample(now, "vllm:num_requests_waiting", **LLM)
        ours = [x for x in now if x[0].startswith(("vllm:", "triton_vlm_"))]
        reached = all(sample(now, n, **ls) - sample(before, n, **ls) == d for (n, ls), d in want) if want \
            else ours == last
        if (idle and reached) or time.monotonic() > deadline:
            return now
        last = ours
        time.sleep(0.3)


def test_a_known_workload_shows_in_counters_histograms_and_gauges(tiny_server, photos):
    before = settled(tiny_server)
    ignore_eos = {"temperature": 0, "ignore_eos": True}
    # Images no other test sends: an image-cache hit would skip vision_encoder.
    fresh = [rng_image(7301 + i) for i in range(3)]
    prompts = [run(tiny_server, PROMPTS[1], fresh[:1], {"max_tokens": 5, **ignore_eos}),
               run(tiny_server, PROMPTS[2], fresh[1:], {"max_tokens": 3, **ignore_eos}, stream=False),
               run(tiny_server, PROMPTS[0], [], {"max_tokens": 4, "n": 2, **ignore_eos})]
    generated = 5 + 3 + 2 * 4
    want = [(("vllm:prompt_tokens_total", LLM), sum(prompts)),
            (("vllm:generation_tokens_total", LLM), generated),
            (("vllm:time_to_first_token_seconds_count", LLM), 3),
            (("vllm:time_per_output_token_seconds_count", LLM), generated - 4),  # all but each completion's first
            (("vllm:e2e_request_latency_seconds_count", LLM), 3),
            (("vllm:request_queue_time_seconds_count", LLM), 3),
            (("vllm:request_prompt_tokens_sum", LLM), sum(prompts)),
            (("vllm:request_generation_tokens_sum", LLM), generated),
            (("vllm:request_generation_tokens_bucket", {**LLM, "le": "5"}), 2),  # 3 and 5 tokens; not 8
            (("vllm:request_generation_tokens_bucket", {**LLM, "le": "10"}), 3),
            (("vllm:request_params_n_sum", LLM), 4),
            (("vllm:request_success_total", {**LLM, "finished_reason": "length"}), 3),
            (("triton_vlm_request_images_count", VLM), 3),
            (("triton_vlm_request_images_sum", VLM), 3),
            (("triton_vlm_request_images_bucket", {**VLM, "le": "0"}), 1),
            (("triton_vlm_vision_encoder_seconds_count", VLM), 2)]
    after = settled(tiny_server, before, want)
    assert {n: sample(after, n, **ls) - sample(before, n, **ls) for (n, ls), _ in want} == {n: d for (n, _), d in want}
    # Latencies are real: every TTFT is at most its request's end-to-end time.
    ttft = sample(after, "vllm:time_to_first_token_seconds_sum", **LLM) - \
        sample(before, "vllm:time_to_first_token_seconds_sum", **LLM)
    e2e = sample(after, "vllm:e2e_request_latency_seconds_sum", **LLM) - \
        sample(before, "vllm:e2e_request_latency_seconds_sum", **LLM)
    assert 0 < ttft <= e2e
    # Idle: the KV pool (512 blocks of 16 tokens, tests/helpers.py LLM_PARAMS) is empty again.
    kv = {t: sample(after, "nv_trt_llm_kv_cache_block_metrics", kv_cache_block_type=t, **LLM)
          for t in ("max", "free", "used", "tokens_per", "fraction")}
    assert kv == {"max": 512, "free": 512, "used": 0, "tokens_per": 16, "fraction": 0}
    requests = {t: sample(after, "nv_trt_llm_request_metrics", request_type=t, **LLM)
                for t in ("waiting", "scheduled", "active", "max")}
    assert requests == {"waiting": 0, "scheduled": 0, "active": 0, "max": 64}
    assert sample(after, "vllm:kv_cache_usage_perc", **LLM) == 0
    assert sample(after, "triton_vlm_kv_blocks_total", model="llm") == 512


def test_gauges_show_a_request_in_flight(tiny_server, photos):
    import threading

    done = threading.Event()

    def long_request():
        run(tiny_server, PROMPTS[1], images_for(1, photos), {"max_tokens": 400, "temperature": 0, "ignore_eos": True})
        done.set()

    threading.Thread(target=long_request, daemon=True).start()
    deadline, seen = time.monotonic() + 20, None
    while time.monotonic() < deadline and not done.is_set():
        now = scrape(tiny_server)
        if sample(now, "nv_trt_llm_request_metrics", request_type="scheduled", **LLM) == 1:
            seen = now
            break
        time.sleep(0.02)
    assert seen is not None, "the running request never showed"
    # (Each gauge is its own round trip: a scrape may fall between two of one flush, so no cross-checks.)
    assert sample(seen, "vllm:num_requests_running", **LLM) == 1
    assert sample(seen, "nv_trt_llm_kv_cache_block_metrics", kv_cache_block_type="used", **LLM) > 0
    assert sample(seen, "vllm:kv_cache_usage_perc", **LLM) > 0
    assert done.wait(60)
