"""The bad-input catalogue: every case gets an error naming the field, over HTTP and over gRPC.

After each case a good request still gets its HF output, the KV pool is empty again (read from the
metrics port) and no stub process has changed: the server kept serving and lost nothing.
"""
from __future__ import annotations

import base64
import io
import json
import queue
import struct
import urllib.error
import urllib.request
import uuid
import zlib
from typing import NamedTuple

import numpy as np
import pytest
from PIL import Image

from helpers import PROMPTS, images_for, serve, stub_pids, wait_for_metric
from triton_vlm import client
from triton_vlm.limits import ServingLimits

LIMITS = ServingLimits(max_images_per_request=3, max_request_bytes=2 * 1024 * 1024, max_image_pixels=1_000_000)
GREEDY = {"max_tokens": 8, "temperature": 0}


class Raw(NamedTuple):
    """Image bytes: raw over gRPC, base64 over HTTP (JSON carries text only)."""
    data: bytes


class Tensor(NamedTuple):
    """An input sent with an explicit type: a numpy array for gRPC, a JSON value for HTTP."""
    array: np.ndarray
    datatype: str
    json_value: object


class Case(NamedTuple):
    id: str
    inputs: dict
    error: str  # a regex the error message must match
    http_error: str | None = None  # where Triton's HTTP frontend answers before our model does


# Triton 2.51's HTTP generate endpoint converts JSON to typed tensors itself and, on a type
# mismatch, answers 500 with its own message, which names no field: a limit of that frontend.
TRITON_HTTP_TYPE_ERROR = r"HTTP 500: Unable to parse .*attempt to access JSON non-\w+ as \w+"


def png(img: Image.Image) -> bytes:
    buf = io.BytesIO()
    img.save(buf, "PNG")
    return buf.getvalue()


def jpeg(img: Image.Image) -> bytes:
    buf = io.BytesIO()
    img.save(buf, "JPEG")
    return buf.getvalue()


def png_bomb(width: int, height: int) -> bytes:
    """A valid grayscale PNG of width x height zeros: a few KB on the wire, gigabytes decoded."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    row = b"\0" * (width + 1)  # filter byte + pixels
    compressor = zlib.compressobj(9)
    body = b"".join(compressor.compress(row) for _ in range(height)) + compressor.flush()
    header = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", body) + chunk(b"IEND", b"")


PHOTO = png(Image.new("RGB", (32, 32), (10, 200, 30)))
B64 = base64.b64encode(PHOTO).decode()
P0, P1, P2 = PROMPTS[0], PROMPTS[1], PROMPTS[2]


def sampling(text: str) -> dict:
    return {"text_input": P0, "sampling_parameters": text}


def chat(*parts, role: str = "user") -> str:
    return json.dumps([{"role": role, "content": list(parts)}])


def image_part(url: str) -> dict:
    return {"type": "image_url", "image_url": {"url": url}}


def video_part(url: str, frames: int = 2) -> dict:
    return {"type": "video_url", "video_url": {"url": url, "num_frames": frames}}


def mp4(frames: int) -> str:
    from test_video import make_video

    return "data:video/mp4;base64," + base64.b64encode(make_video(frames)).decode()


ASK = {"type": "text", "text": "What is in this picture?"}
DATA_URL = "data:image/png;base64," + B64

CASES = [
    # images
    Case("image-undecodable", {"text_input": P1, "image": [Raw(b"definitely not an image")]},
         r"image\[0\]: .*not a decodable image"),
    Case("image-truncated-png", {"text_input": P1, "image": [Raw(PHOTO[:len(PHOTO) // 2])]}, r"image\[0\]: "),
    Case("image-truncated-jpeg", {"text_input": P1, "image": [Raw(jpeg(Image.new("RGB", (64, 64)))[:200])]},
         r"image\[0\]: "),
    Case("image-empty-element", {"text_input": P1, "image": [""]}, r"image\[0\]: empty"),
    Case("image-bad-base64", {"text_input": P1, "image": ["@@not base64@@"]}, r"image\[0\]: "),
    Case("image-data-url-not-image", {"text_input": P1, "image": ["data:text/plain;base64," + B64]},
         r"image\[0\]: .*data URL"),
    Case("image-data-url-no-base64", {"text_input": P1, "image": ["data:image/png," + B64]},
         r"image\[0\]: .*data URL"),
    Case("image-http-url", {"text_input": P1, "image": ["http://127.0.0.1:9/cat.png"]},
         r"image\[0\]: URLs are not fetched"),
    Case("image-file-url", {"text_input": P1, "image": ["file:///etc/passwd"]}, r"image\[0\]: URLs are not fetched"),
    Case("image-decompression-bomb", {"text_input": P1, "image": [Raw(png_bomb(20000, 20000))]},
         r"image\[0\]: 20000x20000 .*max_image_pixels"),
    Case("image-second-of-two-bad", {"text_input": P2, "image": [Raw(PHOTO), Raw(b"junk")]},
         r"image\[1\]: .*not a decodable image"),
    Case("images-more-than-placeholders", {"text_input": P1, "image": [Raw(PHOTO), Raw(PHOTO)]},
         r"image: 2 image\(s\) sent but text_input has 1 <image> placeholder"),
    Case("image-uuid-unknown", {"text_input": P1, "image": [""], "image_uuid": ["never-sent"]},
         r"image_uuid\[0\]: unknown id 'never-sent'"),
    Case("image-uuid-count", {"text_input": P1, "image": [Raw(PHOTO)], "image_uuid": ["a", "b"]},
         r"image_uuid: 2 element\(s\) for 1 image element"),
    Case("image-uuid-too-long", {"text_input": P1, "image": [Raw(PHOTO)], "image_uuid": ["x" * 300]},
         r"image_uuid\[0\]: longer than 256 characters"),
    Case("images-fewer-than-placeholders", {"text_input": P2, "image": [Raw(PHOTO)]},
         r"image: 1 image\(s\) sent but text_input has 2 <image> placeholder"),
    Case("image-without-placeholder", {"text_input": P0, "image": [Raw(PHOTO)]},
         r"image: 1 image\(s\) sent but text_input has 0"),
    Case("images-over-the-limit", {"text_input": P1.replace("<image>", "<image>" * 4), "image": [Raw(PHOTO)] * 4},
         r"image: 4 images exceed the limit of 3 per request \(max_images_per_request\)"),
    # text
    Case("text-missing", {"sampling_parameters": json.dumps(GREEDY)}, r"text_input: required \(or messages\)"),
    Case("text-empty", {"text_input": ""}, r"text_input: empty prompt"),
    Case("text-blank", {"text_input": "  \n "}, r"text_input: empty prompt"),
    Case("text-too-long", {"text_input": "USER: " + "word " * 3000 + "\nASSISTANT:"},
         r"text_input: prompt has \d+ tokens .* \(max_prompt_tokens\)"),
    Case("text-too-long-with-image-tokens",
         {"text_input": "USER: " + "<image>" * 3 + "word " * 1000, "image": [Raw(PHOTO)] * 3},
         r"text_input: prompt has \d+ tokens \(image tokens included\)"),
    Case("request-over-byte-limit", {"text_input": P1, "image": [Raw(b"\0" * (3 * 1024 * 1024))]},
         r"request: \d+ bytes of input exceed the limit of 2097152 \(max_request_bytes\)"),
    # messages (OpenAI chat format)
    Case("messages-invalid-json", {"messages": "[{"}, r"messages: not valid JSON"),
    Case("messages-not-a-list", {"messages": '{"role": "user"}'}, r"messages: expected a non-empty JSON array"),
    Case("messages-and-text-input", {"text_input": P0, "messages": chat(ASK)},
         r"messages: send either text_input or messages, not both"),
    Case("messages-bad-role", {"messages": chat(ASK, role="tool")}, r"messages\[0\]\.role: must be one of"),
    Case("messages-unknown-part", {"messages": chat(ASK, {"type": "input_audio"})},
         r"messages\[0\]\.content\[1\]: unsupported content part \"input_audio\""),
    Case("messages-placeholder-in-text", {"messages": chat({"type": "text", "text": "<image> hi"})},
         r"messages\[0\]\.content\[0\]\.text: contains the image placeholder <image>"),
    Case("messages-image-http-url", {"messages": chat(ASK, image_part("http://127.0.0.1:9/cat.png"))},
         r"messages\[0\]\.content\[1\]\.image_url: URLs are not fetched"),
    Case("messages-image-ref-out-of-range", {"messages": chat(image_part("#1"), ASK), "image": [Raw(PHOTO)]},
         r"messages\[0\]\.content\[0\]\.image_url: \"#1\" but the image input has 1 element"),
    Case("messages-image-unreferenced", {"messages": chat(ASK), "image": [Raw(PHOTO)]},
         r"image\[0\]: not referenced by any image_url \"#0\""),
    Case("messages-image-undecodable", {"messages": chat(ASK, image_part(DATA_URL), image_part("#0")),
                                        "image": [Raw(b"junk")]},
         r"messages\[0\]\.content\[2\]\.image_url: .*not a decodable image"),
    Case("messages-image-data-url-not-image", {"messages": chat(ASK, image_part("data:text/plain;base64," + B64))},
         r"messages\[0\]\.content\[1\]\.image_url: .*data URL"),
    Case("messages-image-in-assistant", {"messages": json.dumps([{"role": "user", "content": "hi"},
                                                                 {"role": "assistant", "content": [image_part("#0")]}]),
                                         "image": [Raw(PHOTO)]},
         r"messages\[1\]\.content\[0\]\.image_url: images and videos go in user messages"),
    Case("messages-images-over-the-limit", {"messages": chat(ASK, *[image_part(DATA_URL)] * 4)},
         r"messages: 4 images \(video frames included\) exceed the limit of 3 per request"),
    Case("messages-video-frames-over-the-limit", {"messages": chat(ASK, image_part(DATA_URL), video_part(mp4(4), 3))},
         r"messages: 4 images \(video frames included\) exceed the limit of 3 per request"),
    Case("messages-video-undecodable", {"messages": chat(ASK, video_part("data:video/mp4;base64," + base64.b64encode(b"no video " * 50).decode()))},
         r"messages\[0\]\.content\[1\]\.video_url: not a decodable video"),
    Case("messages-video-bad-num-frames", {"messages": chat(ASK, video_part(mp4(2), 0))},
         r"messages\[0\]\.content\[1\]\.video_url\.num_frames: must be an integer"),
    Case("messages-too-long", {"messages": chat({"type": "text", "text": "word " * 3000})},
         r"messages: prompt has \d+ tokens .* \(max_prompt_tokens\)"),
    Case("messages-wrong-dtype", {"messages": Tensor(np.array([7], np.int32), "INT32", 7)}, r"messages",
         TRITON_HTTP_TYPE_ERROR),
    # tensors
    Case("text-wrong-dtype", {"text_input": Tensor(np.array([7], np.int32), "INT32", 7)}, r"text_input",
         TRITON_HTTP_TYPE_ERROR),
    Case("text-two-elements", {"text_input": Tensor(np.array([P0.encode()] * 2, object), "BYTES", [P0, P0])},
         r"text_input"),
    Case("stream-wrong-dtype", {"text_input": P0, "stream": Tensor(np.array(["yes".encode()], object), "BYTES", "yes")},
         r"stream", TRITON_HTTP_TYPE_ERROR),
    Case("stream-two-elements", {"text_input": P0, "stream": Tensor(np.array([True, False]), "BOOL", [True, False])},
         r"stream"),
    Case("image-wrong-dtype", {"text_input": P1, "image": Tensor(np.array([1.5], np.float32), "FP32", [1.5])},
         r"image", TRITON_HTTP_TYPE_ERROR),
    Case("sampling-two-elements",
         {"text_input": P0, "sampling_parameters": Tensor(np.array([b"{}", b"{}"], object), "BYTES", ["{}", "{}"])},
         r"sampling_parameters"),
    Case("unknown-input", {"text_input": P0, "warmth": Tensor(np.array([0.5], np.float32), "FP32", [0.5])},
         r"warmth"),
    Case("scalar-input-wrong-dtype",
         {"text_input": P0, "temperature": Tensor(np.array([b"hot"], object), "BYTES", ["hot"])},
         r"temperature", TRITON_HTTP_TYPE_ERROR),
    Case("exclude-input-wrong-dtype",
         {"text_input": P0, "exclude_input_in_output": Tensor(np.array([3], np.int32), "INT32", [3])},
         r"exclude_input_in_output", TRITON_HTTP_TYPE_ERROR),
    # sampling_parameters
    Case("sampling-invalid-json", sampling('{"max_tokens": 3'), r"sampling_parameters: not valid JSON"),
    Case("sampling-json-array", sampling("[1, 2]"), r"sampling_parameters: expected a JSON object, got \[1, 2\]"),
    Case("sampling-json-string", sampling('"greedy"'), r"sampling_parameters: expected a JSON object, got \"greedy\""),
    Case("sampling-unknown-key", sampling('{"temprature": 0.5}'),
         r"sampling_parameters.temprature: unknown sampling parameter"),
    Case("sampling-not-yet-supported", sampling('{"best_of": 2}'), r"sampling_parameters.best_of: not supported"),
    Case("temperature-negative", sampling('{"temperature": -1}'), r"sampling_parameters.temperature: "),
    Case("temperature-nan", sampling('{"temperature": NaN}'), r"sampling_parameters.temperature: .*finite"),
    Case("temperature-infinite", sampling('{"temperature": Infinity}'), r"sampling_parameters.temperature: .*finite"),
    Case("temperature-tiny", sampling('{"temperature": 1e-40}'), r"sampling_parameters.temperature: "),
    Case("temperature-nan-string", sampling('{"temperature": "nan"}'), r"sampling_parameters.temperature: "),
    Case("temperature-bool", sampling('{"temperature": true}'), r"sampling_parameters.temperature: "),
    Case("top-p-zero", sampling('{"top_p": 0}'), r"sampling_parameters.top_p: must be in \(0, 1\]"),
    Case("top-p-above-one", sampling('{"top_p": 1.5}'), r"sampling_parameters.top_p: must be in \(0, 1\]"),
    Case("top-k-negative", sampling('{"top_k": -5}'), r"sampling_parameters.top_k: "),
    Case("top-k-fraction", sampling('{"top_k": 2.5}'), r"sampling_parameters.top_k: "),
    Case("seed-too-big", sampling('{"seed": 18446744073709551616}'), r"sampling_parameters.seed: "),
    Case("seed-string", sampling('{"seed": "abc"}'), r"sampling_parameters.seed: "),
    Case("max-tokens-string", sampling('{"max_tokens": "many"}'), r"sampling_parameters.max_tokens: "),
    Case("max-tokens-negative", sampling('{"max_tokens": -1}'), r"sampling_parameters.max_tokens: "),
    Case("max-tokens-zero", sampling('{"max_tokens": 0}'), r"sampling_parameters.max_tokens: "),
    Case("max-tokens-huge", sampling('{"max_tokens": 1000000000000}'),
         r"sampling_parameters.max_tokens: .*limit"),
    Case("stop-token-ids-not-a-list", sampling('{"stop_token_ids": "2"}'), r"sampling_parameters.stop_token_ids"),
    Case("stop-token-ids-negative", sampling('{"stop_token_ids": [-1]}'), r"sampling_parameters.stop_token_ids"),
    Case("ignore-eos-not-bool", sampling('{"ignore_eos": "maybe"}'), r"sampling_parameters.ignore_eos: "),
    # sampling parameters added for vLLM-backend and TensorRT-LLM clients
    Case("n-zero", sampling('{"n": 0}'), r"sampling_parameters.n: must be in \[1, 16\]"),
    Case("logprobs-too-many", sampling('{"logprobs": 21}'), r"sampling_parameters.logprobs: must be in \[0, 20\]"),
    Case("min-p-nan", sampling('{"min_p": NaN}'), r"sampling_parameters.min_p: must be a finite number"),
    Case("min-tokens-over-max", sampling('{"min_tokens": 9, "max_tokens": 8}'), r"sampling_parameters.min_tokens: "),
    Case("presence-penalty-range", sampling('{"presence_penalty": 3}'), r"sampling_parameters.presence_penalty: "),
    Case("repetition-penalty-zero", sampling('{"repetition_penalty": 0}'), r"sampling_parameters.repetition_penalty: "),
    Case("logit-bias-not-object", sampling('{"logit_bias": [1, 2]}'), r"sampling_parameters.logit_bias: "),
    Case("logit-bias-outside-vocab", sampling('{"logit_bias": {"99999": 5}}'),
         r"sampling_parameters.logit_bias: token id 99999 is outside the vocabulary"),
    Case("allowed-token-ids-outside-vocab", sampling('{"allowed_token_ids": [99999]}'),
         r"sampling_parameters.allowed_token_ids: token id 99999 is outside the vocabulary"),
    Case("stop-not-strings", sampling('{"stop": [1]}'), r"sampling_parameters.stop\[0\]: must be a non-empty string"),
    Case("bad-words-not-list", sampling('{"bad_words": 3}'), r"sampling_parameters.bad_words: "),
    Case("structured-two-kinds", sampling('{"structured_outputs": {"regex": "a+", "choice": ["a"]}}'),
         r"sampling_parameters.structured_outputs: must set exactly one of"),
    Case("structured-bad-regex", sampling('{"structured_outputs": {"regex": "(unclosed"}}'),
         r"sampling_parameters.structured_outputs.regex: "),
    Case("structured-bad-grammar", sampling('{"structured_outputs": {"grammar": "start: undefined_rule"}}'),
         r"sampling_parameters.structured_outputs.grammar: "),
    Case("structured-bad-json-string", sampling('{"structured_outputs": "{not json"}'),
         r"sampling_parameters.structured_outputs: not valid JSON"),
    Case("stream-repeating-the-prompt", {"text_input": P0, "exclude_input_in_output": False, "stream": True},
         r"exclude_input_in_output: false is not allowed when streaming",
         http_error=r"HTTP 400: .*exclude_input_in_output: false is not allowed when streaming"),
    Case("beam-width-two", {"text_input": P0, "beam_width": Tensor(np.array([2], np.int32), "INT32", [2])},
         r"beam_width: only 1 is supported"),
    Case("max-tokens-scalar-disagrees", {**sampling('{"max_tokens": 4}'),
                                         "max_tokens": Tensor(np.array([5], np.int32), "INT32", [5])},
         r"max_tokens: 5 disagrees with sampling_parameters.max_tokens = 4"),
    Case("temperature-scalar-negative", {"text_input": P0, "temperature": Tensor(np.array([-1], np.float32), "FP32",
                                                                                  [-1.0])},
         r"(?<![.\w])temperature: must be 0 \(greedy\) or >= 1e-05, got -1.0"),
]


def grpc_tensor(name: str, value):
    import tritonclient.grpc as grpcclient

    if isinstance(value, Tensor):
        array, datatype = value.array, value.datatype
    elif isinstance(value, bool):
        array, datatype = np.array([value]), "BOOL"
    elif isinstance(value, list):
        array, datatype = np.array([v.data if isinstance(v, Raw) else v.encode() for v in value], object), "BYTES"
    else:
        array, datatype = np.array([value.encode("utf-8", "surrogateescape")], object), "BYTES"
    tensor = grpcclient.InferInput(name, list(array.shape), datatype)
    tensor.set_data_from_numpy(array)
    return tensor


def http_value(value):
    if isinstance(value, Tensor):
        return value.json_value
    if isinstance(value, list):
        return [base64.b64encode(v.data).decode() if isinstance(v, Raw) else v for v in value]
    return value


def send_grpc(url: str, inputs: dict, timeout: float = 60) -> str:
    """Stream one request; return its text, or raise client.VLMError with the server's message."""
    import tritonclient.grpc as grpcclient

    results: queue.Queue = queue.Queue()
    grpc = grpcclient.InferenceServerClient(url)
    grpc.start_stream(callback=lambda result, error: results.put((result, error)))
    try:
        tensors = [grpc_tensor(k, v) for k, v in {"stream": True, **inputs}.items()]
        grpc.async_stream_infer("vlm", tensors, request_id=uuid.uuid4().hex, enable_empty_final_response=True)
        text = []
        while True:
            result, error = results.get(timeout=timeout)
            if error is not None:
                raise client.VLMError(str(error))
            out = result.as_numpy("text_output")
            text += [] if out is None else [t.decode() for t in out.reshape(-1)]
            if result.get_response().parameters["triton_final_response"].bool_param:
                return "".join(text)
    finally:
        grpc.stop_stream()
        grpc.close()


def send_http(url: str, inputs: dict, timeout: float = 60) -> tuple[int, str]:
    """POST /generate; return the text, or raise client.VLMError carrying the HTTP status."""
    body = json.dumps({"exclude_input_in_output": True, **{k: http_value(v) for k, v in inputs.items()}})
    req = urllib.request.Request(f"http://{url}/v2/models/vlm/generate", data=body.encode(),
                                 headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(req, timeout=timeout) as r:
            return json.loads(r.read())["text_output"]
    except urllib.error.HTTPError as e:
        raise client.VLMError(f"HTTP {e.code}: {json.loads(e.read()).get('error', '')}") from None


@pytest.fixture(scope="module")
def server(tiny_checkpoint, tmp_path_factory):
    server = serve(tiny_checkpoint, tmp_path_factory, "bad-input", limits=LIMITS)
    yield server
    server.stop()


@pytest.fixture(scope="module")
def good(hf_tiny, photos):
    images = images_for(1, photos)
    return images, hf_tiny.generate(P1, images, GREEDY["max_tokens"])


def assert_still_serving(server, good, stubs_before: dict) -> None:
    images, expected = good
    assert client.generate_grpc(server.grpc_url, P1, images, GREEDY) == expected
    assert wait_for_metric(server, "triton_vlm_kv_blocks_used", 0) == 0
    assert stub_pids(server) == stubs_before


@pytest.mark.parametrize("protocol", ["grpc", "http"])
@pytest.mark.parametrize("case", CASES, ids=[c.id for c in CASES])
def test_bad_input_is_refused_by_name_and_the_server_keeps_serving(server, good, protocol, case):
    stubs = stub_pids(server)
    vision_runs = vision_inference_count(server)
    if protocol == "grpc":
        with pytest.raises(client.VLMError, match=case.error):
            send_grpc(server.grpc_url, case.inputs)
    elif case.http_error:
        with pytest.raises(client.VLMError, match=case.http_error):
            send_http(server.http_url, case.inputs)
    else:  # bad input is the client's fault: 400, never 500
        with pytest.raises(client.VLMError, match=f"^HTTP 400: .*{case.error}"):
            send_http(server.http_url, case.inputs)
    # Nothing is refused after vision work it could have avoided.
    assert vision_inference_count(server) == vision_runs
    assert_still_serving(server, good, stubs)


def test_catalogue_is_large_enough():
    assert len(CASES) >= 40


def vision_inference_count(server) -> int:
    with urllib.request.urlopen(f"http://{server.http_url}/v2/models/vision_encoder/stats") as r:
        stats = json.loads(r.read())["model_stats"]
    return sum(int(s["inference_count"]) for s in stats)


def odd_image(mode: str) -> bytes:
    rng = np.random.default_rng(7)
    if mode == "1x1":
        return png(Image.new("RGB", (1, 1), (255, 0, 0)))
    if mode == "L":
        return png(Image.fromarray((rng.random((40, 50)) * 255).astype("uint8"), "L"))
    if mode == "RGBA":
        return png(Image.fromarray((rng.random((40, 50, 4)) * 255).astype("uint8"), "RGBA"))
    if mode == "P":
        return png(Image.fromarray((rng.random((40, 50, 3)) * 255).astype("uint8")).convert("P"))
    if mode == "I;16":
        return png(Image.fromarray((rng.random((40, 50)) * 65535).astype("uint16")))
    raise ValueError(mode)


@pytest.mark.parametrize("protocol", ["grpc", "http"])
@pytest.mark.parametrize("mode", ["1x1", "L", "RGBA", "P", "I;16"])
def test_unusual_images_are_served_as_hf_reads_them(server, hf_tiny, protocol, mode):
    data = odd_image(mode)
    image = Image.open(io.BytesIO(data))
    if mode == "I;16":  # HF clips 16-bit grey to white; we keep the high byte (see preprocess.py)
        image = Image.fromarray((np.asarray(image) >> 8).astype("uint8"))
    with torch_no_grad():
        inputs = hf_tiny.processor(text=P1, images=[image], return_tensors="pt")
        ids = hf_tiny.model.generate(**inputs, max_new_tokens=GREEDY["max_tokens"], do_sample=False)
    expected = hf_tiny.processor.decode(ids[0, inputs["input_ids"].shape[1]:], skip_special_tokens=True)
    inputs = {"text_input": P1, "image": [Raw(data)], "sampling_parameters": json.dumps(GREEDY)}
    got = send_grpc(server.grpc_url, inputs) if protocol == "grpc" else send_http(server.http_url, inputs)
    assert got == expected


def torch_no_grad():
    import torch

    return torch.no_grad()
