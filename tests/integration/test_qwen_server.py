"""Qwen2-VL and Qwen2.5-VL through a real tritonserver: variable tokens per image, M-RoPE positions, the ONNX
tower on onnxruntime; greedy text equals transformers' generate over HTTP and gRPC, streamed and not."""
from __future__ import annotations

import io
import time
from concurrent.futures import ThreadPoolExecutor

import pytest
from helpers import ask, QWEN_PROMPTS, metric, rng_pil, serve

from triton_vlm import client

MAX_TOKENS = 24
GREEDY = {"max_tokens": MAX_TOKENS, "temperature": 0}


def png(img) -> bytes:
    buf = io.BytesIO()
    img.save(buf, "PNG")
    return buf.getvalue()


PORTRAIT, LANDSCAPE = png(rng_pil(0, 90, 40)), png(rng_pil(1, 50, 120))


@pytest.fixture(scope="module")
def qwen_server(qwen_checkpoint, tmp_path_factory):
    # Small chunks and a small pool: prompts of 2 images prefill in several chunks.
    server = serve(qwen_checkpoint, tmp_path_factory, "qwen", llm={"max_num_batched_tokens": "48"})
    yield server
    server.stop()


@pytest.mark.parametrize("images", [[], [PORTRAIT], [LANDSCAPE], [PORTRAIT, LANDSCAPE]],
                         ids=["0", "portrait", "landscape", "2-sizes"])
@pytest.mark.parametrize("stream", [True, False], ids=["stream", "nostream"])
@pytest.mark.parametrize("protocol", ["grpc", "http"])
def test_greedy_output_equals_hf(qwen_server, hf_qwen, protocol, stream, images):
    prompt = QWEN_PROMPTS[len(images)]
    assert ask(qwen_server, protocol, stream, prompt, images, GREEDY) == hf_qwen.generate(prompt, images, MAX_TOKENS)


def test_photos_equal_hf(qwen_server, hf_qwen, photos):
    """Real photos: downscaled within max_pixels, different grids, one request."""
    images = [photos["astronaut"], photos["coffee"]]
    assert ask(qwen_server, "grpc", True, QWEN_PROMPTS[2], images, GREEDY) == hf_qwen.generate(QWEN_PROMPTS[2], images,
                                                                                        MAX_TOKENS)


def test_messages_use_the_checkpoints_chat_template(qwen_server, hf_qwen):
    import base64
    import json

    url = "data:image/png;base64," + base64.b64encode(LANDSCAPE).decode()
    messages = [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": url}},
                                             {"type": "text", "text": "What is in this picture?"}]}]
    inputs = client.grpc_inputs(None, [], True, GREEDY, messages=json.dumps(messages))
    out = client.complete(qwen_server.grpc_url, inputs).text
    prompt = ("<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n" + QWEN_PROMPTS[1])
    assert out == hf_qwen.generate(prompt, [LANDSCAPE], MAX_TOKENS)


def test_concurrent_requests_of_different_sizes_equal_their_solo_outputs(qwen_server, hf_qwen):
    cases = []
    for i in range(8):
        n = 1 + i % 2
        images = [png(rng_pil(200 + 2 * i + k, 24 + 12 * i, 80 - 6 * i + 10 * k)) for k in range(n)]
        cases.append((QWEN_PROMPTS[n], images, {"max_tokens": 8 + 2 * i, "temperature": 0}))
    solo = [hf_qwen.generate(p, imgs, s["max_tokens"]) for p, imgs, s in cases]
    with ThreadPoolExecutor(len(cases)) as pool:
        together = list(pool.map(lambda c: client.generate_grpc(qwen_server.grpc_url, *c), cases))
    assert together == solo
    deadline = time.monotonic() + 10
    while metric(qwen_server, "triton_vlm_kv_blocks_used") != 0 and time.monotonic() < deadline:
        time.sleep(0.2)
    assert metric(qwen_server, "triton_vlm_kv_blocks_used") == 0


def test_native_video_equals_hf(qwen_server, hf_qwen):
    """A short video as Qwen2-VL takes it: frames grouped by temporal_patch_size (5 frames: the last repeated),
    one <|video_pad|> run with video_grid_thw, 3-D positions along time."""
    import base64
    import json

    from test_video import make_video

    from triton_vlm.video import sample_frames

    video = make_video(20, size=40)
    url = "data:video/mp4;base64," + base64.b64encode(video).decode()
    messages = [{"role": "user", "content": [{"type": "video_url", "video_url": {"url": url, "num_frames": 5}},
                                             {"type": "text", "text": "What happens?"}]}]
    out = client.complete(qwen_server.grpc_url, client.grpc_inputs(None, [], True, GREEDY,
                                                                    messages=json.dumps(messages))).text
    prompt = ("<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n<|im_start|>user\n"
              "<|vision_start|><|video_pad|><|vision_end|>What happens?<|im_end|>\n<|im_start|>assistant\n")
    assert out == hf_qwen.generate_video(prompt, sample_frames(video, 5), MAX_TOKENS)
