"""Prefix and image caching through a real tritonserver: repeated images skip vision_encoder, repeated
prefixes hit the KV cache, image ids stand for images the server holds; every answer equals HF."""
from __future__ import annotations

import json
import time
import urllib.request
import uuid

import pytest

from helpers import PROMPTS, metric, rng_image, settled_metric
from triton_vlm.client import protocol

GREEDY = {"max_tokens": 16, "temperature": 0}


def vision_runs(server) -> int:
    with urllib.request.urlopen(f"http://{server.http_url}/v2/models/vision_encoder/stats") as r:
        return sum(int(s["inference_count"]) for s in json.loads(r.read())["model_stats"])


def send(server, inputs) -> str:
    pieces = []
    for result in protocol.stream_grpc_results(server.grpc_url, inputs):
        out = result.as_numpy("text_output")
        pieces += [] if out is None else [p.decode() for p in out.reshape(-1)]
    return "".join(pieces)


def ask(server, prompt: str, images: list[bytes], uuids: list[str] = ()) -> str:
    return send(server, protocol.grpc_inputs(prompt, images, sampling=GREEDY, image_uuids=uuids))


def metric_reaching(server, name: str, at_least: float, timeout: float = 10) -> float:
    """The metric once it reaches `at_least` (the llm publishes at most every 100 ms), or its last value."""
    deadline = time.monotonic() + timeout
    while (value := metric(server, name)) < at_least and time.monotonic() < deadline:
        time.sleep(0.05)
    return value


def test_a_repeated_image_skips_vision_and_its_prefix_is_not_computed_again(tiny_server, hf_tiny):
    image = rng_image(4201)
    expected = hf_tiny.generate(PROMPTS[1], [image], GREEDY["max_tokens"])
    runs = vision_runs(tiny_server)
    image_hits = metric(tiny_server, "triton_vlm_image_cache_hits_total")
    assert ask(tiny_server, PROMPTS[1], [image]) == expected
    assert vision_runs(tiny_server) == runs + 1
    prefix_hits = settled_metric(tiny_server, "triton_vlm_prefix_cache_hits_total")
    assert ask(tiny_server, PROMPTS[1], [image]) == expected
    assert vision_runs(tiny_server) == runs + 1  # the embeddings came from the image cache
    # Published from vlm's metrics thread within 100 ms.
    assert metric_reaching(tiny_server, "triton_vlm_image_cache_hits_total", image_hits + 1) == image_hits + 1
    # The whole prompt but its last block came from the KV cache: image rows included.
    prompt_len = len(hf_tiny.inputs(PROMPTS[1], [image])["input_ids"][0])
    at_least = prefix_hits + (prompt_len - 1) // 16 * 16
    assert metric_reaching(tiny_server, "triton_vlm_prefix_cache_hits_total", at_least) >= at_least
    assert metric(tiny_server, "triton_vlm_prefix_cache_queries_total") >= 2 * prompt_len


def test_the_same_text_with_another_image_equals_hf(tiny_server, hf_tiny):
    for seed in (4202, 4203, 4202):
        image = rng_image(seed)
        assert ask(tiny_server, PROMPTS[1], [image]) == hf_tiny.generate(PROMPTS[1], [image], GREEDY["max_tokens"])


@pytest.mark.parametrize("with_messages", [False, True], ids=["text_input", "messages"])
def test_an_image_id_stands_for_the_image_sent_with_it(tiny_server, hf_tiny, with_messages):
    image, image_id = rng_image(4300 + with_messages), f"tenant-a/{uuid.uuid4().hex}"
    expected = hf_tiny.generate(PROMPTS[1], [image], GREEDY["max_tokens"])
    assert ask(tiny_server, PROMPTS[1], [image], [image_id]) == expected
    runs = vision_runs(tiny_server)
    if with_messages:
        chat = [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "#0"}},
                                             {"type": "text", "text": "What is in this picture?"}]}]
        inputs = protocol.grpc_inputs(None, [b""], sampling=GREEDY, messages=json.dumps(chat), image_uuids=[image_id])
        answer = send(tiny_server, inputs)
        prompt = hf_tiny.processor.apply_chat_template(chat, add_generation_prompt=True)
        assert answer == hf_tiny.generate(prompt, [image], GREEDY["max_tokens"])
    else:
        assert ask(tiny_server, PROMPTS[1], [b""], [image_id]) == expected
    assert vision_runs(tiny_server) == runs
    with pytest.raises(protocol.VLMError, match=r"image_uuid\[0\]: unknown id 'tenant-b/"):
        ask(tiny_server, PROMPTS[1], [b""], ["tenant-b/" + image_id.split("/")[1]])


def test_a_stateless_four_turn_chat_computes_only_each_turns_new_tokens(tiny_server, hf_tiny):
    """The client resends the whole chat each turn (images in turns 1 and 3) as `messages`; the prefix
    cache's counters say how many prompt tokens each turn computed, and every answer equals HF's."""
    images = [rng_image(4401), rng_image(4402)]
    questions = ["What is in this picture?", "Tell me more.", "And in this one?", "Which do you like?"]
    chat, prev_len = [], 0
    for turn, question in enumerate(questions, start=1):
        content = [{"type": "text", "text": question}]
        if turn in (1, 3):
            content.insert(0, {"type": "image_url", "image_url": {"url": f"#{turn // 2}"}})
        chat.append({"role": "user", "content": content})
        sent = images[:1 if turn < 3 else 2]
        queries = settled_metric(tiny_server, "triton_vlm_prefix_cache_queries_total")
        hits = settled_metric(tiny_server, "triton_vlm_prefix_cache_hits_total")
        inputs = protocol.grpc_inputs(None, sent, sampling=GREEDY, messages=json.dumps(chat),
                                      returns=("num_input_tokens",))
        done = protocol.complete(tiny_server.grpc_url, inputs)
        hf_chat = [{**m, "content": [{"type": "image"} if p["type"] == "image_url" else p for p in m["content"]]}
                   if isinstance(m["content"], list) else m for m in chat]
        prompt = hf_tiny.processor.apply_chat_template(hf_chat, add_generation_prompt=True)
        assert done.text == hf_tiny.generate(prompt, sent, GREEDY["max_tokens"]), f"turn {turn}"
        n = done.num_input_tokens
        assert metric_reaching(tiny_server, "triton_vlm_prefix_cache_queries_total", queries + n) == queries + n
        computed = n - (metric(tiny_server, "triton_vlm_prefix_cache_hits_total") - hits)
        if turn == 1:
            assert computed == n
        else:  # the previous prompt's full 16-token blocks were found; the rest is this turn's news
            assert computed <= n - prev_len // 16 * 16, f"turn {turn}"
        chat.append({"role": "assistant", "content": done.text})
        prev_len = n
