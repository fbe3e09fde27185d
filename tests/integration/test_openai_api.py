"""The OpenAI-compatible server against a real tritonserver, with the official `openai` package as the client."""
from __future__ import annotations

import base64
import http.server
import json
import random
import socket
import threading
import time

import openai
import pytest
from helpers import TOY_CHECKPOINT, metric, start_openai, wait_for_metric
from test_video import make_video

from triton_vlm import client
from triton_vlm.server import free_port
from triton_vlm.toy import evaluate as ev
from triton_vlm.toy.scenes import sample_example

GREEDY = {"temperature": 0, "max_tokens": 12}


@pytest.fixture(scope="module")
def image_size() -> int:
    from transformers import AutoProcessor

    return ev.image_size(AutoProcessor.from_pretrained(TOY_CHECKPOINT))


def fresh_scene(seed: str, size: int):
    """A freshly drawn scene and a colour question about it, with the right answer."""
    return sample_example(random.Random(seed), size, "colour")


def data_url(png: bytes, media_type: str = "image/png") -> str:
    return f"data:{media_type};base64," + base64.b64encode(png).decode()


def ask(example, url: str | None = None) -> list[dict]:
    url = url or data_url(ev.png_bytes(example.image))
    return [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": url}},
                                         {"type": "text", "text": example.question}]}]


def test_models_and_health(sdk, toy_api):
    import urllib.request

    assert [m.id for m in sdk.models.list().data] == ["toy-vlm"]
    with urllib.request.urlopen(toy_api + "/health") as r:
        assert r.status == 200


@pytest.mark.parametrize("seed", range(3))
def test_chat_answers_the_colour_of_a_fresh_scene(sdk, image_size, seed):
    example = fresh_scene(f"openai-{seed}-{time.time_ns()}", image_size)
    reply = sdk.chat.completions.create(model="toy-vlm", messages=ask(example), **GREEDY)
    assert reply.choices[0].message.content.strip() == example.answer
    assert reply.choices[0].finish_reason == "stop"
    assert reply.choices[0].message.role == "assistant"
    # 9 image tokens and the question; the answer and its end token.
    assert reply.usage.prompt_tokens > 9 and reply.usage.completion_tokens >= 2
    assert reply.usage.total_tokens == reply.usage.prompt_tokens + reply.usage.completion_tokens


def test_streamed_chat_with_usage(sdk, image_size):
    example = fresh_scene(f"openai-stream-{time.time_ns()}", image_size)
    chunks = list(sdk.chat.completions.create(model="toy-vlm", messages=ask(example), stream=True,
                                              stream_options={"include_usage": True}, **GREEDY))
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text.strip() == example.answer
    assert chunks[0].choices[0].delta.role == "assistant"
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "stop"
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens >= 2
    assert all(c.usage is None for c in chunks[:-1])
    # The same request unstreamed counts the same tokens.
    unstreamed = sdk.chat.completions.create(model="toy-vlm", messages=ask(example), **GREEDY)
    assert unstreamed.usage == chunks[-1].usage


def test_multi_turn_follow_up_keeps_the_image(sdk, image_size):
    example = fresh_scene(f"openai-turns-{time.time_ns()}", image_size)
    first = sdk.chat.completions.create(model="toy-vlm", messages=ask(example), **GREEDY)
    messages = ask(example) + [{"role": "assistant", "content": first.choices[0].message.content},
                               {"role": "user", "content": "How many shapes are there?"}]
    reply = sdk.chat.completions.create(model="toy-vlm", messages=messages, **GREEDY)
    # The prompt grew by the first answer and the follow-up; the image is still in it.
    assert reply.usage.prompt_tokens > first.usage.prompt_tokens + first.usage.completion_tokens
    assert reply.choices[0].message.content.strip()


def test_video_url_frames_count_as_images(sdk):
    video = data_url(make_video(10, size=48), "video/mp4")
    one_image = [{"type": "image_url", "image_url": {"url": data_url(client_png())}}]
    frames = sdk.chat.completions.create(model="toy-vlm", max_tokens=1, messages=[{"role": "user", "content": [
        {"type": "video_url", "video_url": {"url": video, "num_frames": 3}}, {"type": "text", "text": "Describe."}]}])
    image = sdk.chat.completions.create(model="toy-vlm", max_tokens=1, messages=[{"role": "user", "content": [
        *one_image, {"type": "text", "text": "Describe."}]}])
    assert frames.usage.prompt_tokens - image.usage.prompt_tokens == 2 * (9 + 1)  # 9 tokens and a newline a frame


def client_png() -> bytes:
    from PIL import Image

    return ev.png_bytes(Image.new("RGB", (48, 48), (30, 60, 225)))


def test_completions_match_vlm(sdk, toy_server):
    prompt = "USER: How many shapes are there?\nASSISTANT:"
    expected = client.generate_grpc(toy_server.grpc_url, prompt, [], {"max_tokens": 8, "temperature": 0})
    reply = sdk.completions.create(model="toy-vlm", prompt=prompt, max_tokens=8, temperature=0)
    assert reply.choices[0].text == expected and reply.usage.completion_tokens >= 1
    streamed = list(sdk.completions.create(model="toy-vlm", prompt=[prompt, prompt], max_tokens=8, temperature=0,
                                           stream=True, stream_options={"include_usage": True}, echo=True))
    texts = ["", ""]
    for chunk in streamed:
        for choice in chunk.choices:
            texts[choice.index] += choice.text
    assert texts == [prompt + expected] * 2
    assert streamed[-1].usage.prompt_tokens == 2 * reply.usage.prompt_tokens
    assert streamed[-1].usage.completion_tokens == 2 * reply.usage.completion_tokens
    assert sdk.completions.create(model="toy-vlm", prompt=prompt, max_tokens=8, temperature=0,
                                  echo=True).choices[0].text == prompt + expected


# ---- errors -----------------------------------------------------------------------------------------

def test_unknown_model_is_404(sdk):
    with pytest.raises(openai.NotFoundError, match="gpt-4o"):
        sdk.chat.completions.create(model="gpt-4o", messages=[{"role": "user", "content": "hi"}])


@pytest.mark.parametrize("kwargs, error", [
    ({"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "data:image/png;base64,AAAA"}}]}]},
     r"messages\[0\]\.content\[0\]\.image_url: "),
    ({"messages": [{"role": "user", "content": [{"type": "image_url",
                                                 "image_url": {"url": "https://example.com/cat.png"}}]}]},
     r"messages\[0\]\.content\[0\]\.image_url: fetching media from example.com is not allowed"),
    ({"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "https://a.b/c.png"}}] * 9}]},
     r"messages: 9 image and video parts exceed the limit of 8 per request \(max_images_per_request\)"),
    ({"messages": [{"role": "user", "content": "hi"}], "temperature": -1}, r"temperature: "),
    ({"messages": [{"role": "user", "content": "hi"}], "max_tokens": 10**9}, r"max_tokens: .*limit"),
    ({"messages": [{"role": "wizard", "content": "hi"}]}, r"messages\[0\]\.role: must be one of"),
    ({"messages": []}, r"messages: expected a non-empty array"),
    ({"messages": [{"role": "user", "content": "hi"}],
      "tools": [{"type": "function", "function": {"name": "f"}}]}, r"tools: not supported"),
    ({"messages": [{"role": "user", "content": "hi"}], "response_format": {"type": "xml"}},
     r"response_format.type: must be text, json_object or json_schema"),
])
def test_bad_requests_are_400_with_the_field_named(sdk, kwargs, error):
    with pytest.raises(openai.BadRequestError, match=error) as info:
        sdk.chat.completions.create(model="toy-vlm", **kwargs)
    assert info.value.body["type"] == "invalid_request_error"
    # Streamed, a request refused before its first token still gets its status.
    with pytest.raises(openai.BadRequestError, match=error):
        list(sdk.chat.completions.create(model="toy-vlm", stream=True, **kwargs))


def test_no_triton_is_503():
    running, url = start_openai(f"127.0.0.1:{free_port()}")
    try:
        sdk = openai.OpenAI(base_url=url + "/v1", api_key="unused", max_retries=0, timeout=30)
        with pytest.raises(openai.InternalServerError) as info:
            sdk.chat.completions.create(model="toy-vlm", messages=[{"role": "user", "content": "hi"}])
        assert info.value.status_code == 503
        import urllib.error
        import urllib.request

        with pytest.raises(urllib.error.HTTPError) as health:
            urllib.request.urlopen(url + "/health", timeout=30)
        assert health.value.code == 503
    finally:
        running.stop()


# ---- remote media -----------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def media_site(image_size):
    """A local web site: /scene.png (a fresh scene), /big.png (over the cap), /away (redirects to another host)."""
    example = fresh_scene(f"openai-remote-{time.time_ns()}", image_size)
    png = ev.png_bytes(example.image)
    port = free_port()

    class Handler(http.server.BaseHTTPRequestHandler):
        def do_GET(self):  # noqa: N802
            if self.path == "/away":
                self.send_response(302)
                self.send_header("Location", f"http://localhost:{port}/scene.png")
                self.end_headers()
                return
            body = png if self.path == "/scene.png" else b"\0" * 200_000
            self.send_response(200)
            self.send_header("Content-Type", "image/png")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args):
            pass

    site = http.server.ThreadingHTTPServer(("127.0.0.1", port), Handler)
    threading.Thread(target=site.serve_forever, daemon=True).start()
    yield f"http://127.0.0.1:{port}", example
    site.shutdown()


def test_remote_images_only_from_allowed_domains(toy_server, media_site):
    base, example = media_site
    running, url = start_openai(toy_server.grpc_url, allowed_domains=("127.0.0.1",), max_bytes=100_000, timeout_s=5)
    try:
        sdk = openai.OpenAI(base_url=url + "/v1", api_key="unused", max_retries=0, timeout=120)
        reply = sdk.chat.completions.create(model="toy-vlm", messages=ask(example, base + "/scene.png"), **GREEDY)
        assert reply.choices[0].message.content.strip() == example.answer
        with pytest.raises(openai.BadRequestError, match=r"image_url: .*larger than 100000 bytes"):
            sdk.chat.completions.create(model="toy-vlm", messages=ask(example, base + "/big.png"), **GREEDY)
        with pytest.raises(openai.BadRequestError, match=r"image_url: the server redirected to http://localhost"):
            sdk.chat.completions.create(model="toy-vlm", messages=ask(example, base + "/away"), **GREEDY)
    finally:
        running.stop()


# ---- a client that goes away ------------------------------------------------------------------------

@pytest.fixture(scope="module")
def long_server(tmp_path_factory):
    """A tiny model with a 16k context: a 16k-token answer takes far longer than the test waits."""
    from helpers import serve
    from triton_vlm.checkpoint import make_tiny

    checkpoint = make_tiny(tmp_path_factory.mktemp("ckpt") / "long", max_positions=LONG_CONTEXT)
    server = serve(checkpoint, tmp_path_factory, "long", llm={"num_kv_blocks": str(LONG_CONTEXT // 16 + 8)})
    yield server
    server.stop()


@pytest.fixture(scope="module")
def long_api(long_server):
    running, url = start_openai(long_server.grpc_url)
    yield url
    running.stop()


LONG_CONTEXT = 16384


def post_and_leave(url: str, body: dict, server, read_first: bool) -> float:
    """POST, wait until the request holds KV blocks, close the connection; return the blocks it held."""
    host, port = url.removeprefix("http://").split(":")
    payload = json.dumps(body).encode()
    sock = socket.create_connection((host, int(port)))
    sock.sendall(b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                 + f"Content-Length: {len(payload)}\r\n\r\n".encode() + payload)
    try:
        if read_first:
            assert b"200 OK" in sock.recv(65536)
        deadline = time.monotonic() + 60
        while (held := metric(server, "triton_vlm_kv_blocks_used")) == 0 and time.monotonic() < deadline:
            time.sleep(0.05)
        return held
    finally:
        sock.close()


@pytest.mark.parametrize("stream", [True, False])
def test_client_disconnect_frees_the_kv_blocks(long_server, long_api, stream):
    body = {"messages": [{"role": "user", "content": "Tell me a story about a cat."}], "stream": stream,
            "max_tokens": LONG_CONTEXT - 64, "ignore_eos": True, "temperature": 0}
    assert wait_for_metric(long_server, "triton_vlm_kv_blocks_used", 0) == 0
    assert post_and_leave(long_api, body, long_server, read_first=stream) > 0
    # Left alone, the answer would hold its blocks for minutes.
    assert wait_for_metric(long_server, "triton_vlm_kv_blocks_used", 0, timeout=5) == 0
    # Still serving.
    sdk = openai.OpenAI(base_url=long_api + "/v1", api_key="unused", max_retries=0, timeout=120)
    assert sdk.chat.completions.create(model="long", messages=[{"role": "user", "content": "hi"}],
                                       max_tokens=3).usage.completion_tokens >= 1
