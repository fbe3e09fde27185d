"""Client helpers for the `vlm` model over Triton's own gRPC (streaming) and HTTP (generate) APIs."""
from __future__ import annotations

import base64
import json
import queue
import urllib.error
import urllib.request
import uuid
from typing import Iterator

import numpy as np

MODEL = "vlm"


class VLMError(RuntimeError):
    """The server answered the request with an error."""


def grpc_inputs(prompt: str, images: list[bytes] = (), stream: bool = True, sampling: dict | None = None,
                exclude_input: bool = True, returns: tuple[str, ...] = ()):
    """The vlm request tensors; `returns` names optional outputs, e.g. ("finish_reason",)."""
    import tritonclient.grpc as grpcclient

    def tensor(name, array, dtype):
        t = grpcclient.InferInput(name, list(array.shape), dtype)
        t.set_data_from_numpy(array)
        return t

    inputs = [tensor("text_input", np.array([prompt.encode()], dtype=object), "BYTES"),
              tensor("stream", np.array([stream]), "BOOL"),
              tensor("exclude_input_in_output", np.array([exclude_input]), "BOOL")]
    if images:
        inputs.append(tensor("image", np.array(list(images), dtype=object), "BYTES"))
    if sampling is not None:
        inputs.append(tensor("sampling_parameters", np.array([json.dumps(sampling).encode()], dtype=object), "BYTES"))
    inputs += [tensor(f"return_{name}", np.array([True]), "BOOL") for name in returns]
    return inputs


def stream_grpc_results(url: str, inputs, timeout: float = 600) -> Iterator:
    """Send one request over the gRPC stream; yield each InferResult until the final one."""
    import tritonclient.grpc as grpcclient

    results: queue.Queue = queue.Queue()
    client = grpcclient.InferenceServerClient(url)
    client.start_stream(callback=lambda result, error: results.put((result, error)))
    try:
        client.async_stream_infer(MODEL, inputs, request_id=uuid.uuid4().hex, enable_empty_final_response=True)
        while True:
            result, error = results.get(timeout=timeout)
            if error is not None:
                raise VLMError(str(error))
            yield result
            if result.get_response().parameters["triton_final_response"].bool_param:
                return
    finally:
        client.stop_stream()
        client.close()


def stream_grpc(url: str, prompt: str, images: list[bytes] = (), sampling: dict | None = None,
                stream: bool = True, exclude_input: bool = True, timeout: float = 600) -> Iterator[str]:
    """Yield text as the server sends it (one piece when stream=False)."""
    for result in stream_grpc_results(url, grpc_inputs(prompt, images, stream, sampling, exclude_input), timeout):
        out = result.as_numpy("text_output")
        if out is not None:
            for piece in out.reshape(-1):
                yield piece.decode()


def generate_grpc(url: str, prompt: str, images: list[bytes] = (), sampling: dict | None = None,
                  stream: bool = True, exclude_input: bool = True) -> str:
    return "".join(stream_grpc(url, prompt, images, sampling, stream=stream, exclude_input=exclude_input))


def _http_body(prompt, images, stream, sampling, exclude_input) -> bytes:
    body = {"text_input": prompt, "stream": stream, "exclude_input_in_output": exclude_input}
    if images:
        body["image"] = [base64.b64encode(b).decode() for b in images]
    if sampling is not None:
        body["sampling_parameters"] = json.dumps(sampling)
    return json.dumps(body).encode()


def _post(url: str, body: bytes, timeout: float):
    req = urllib.request.Request(url, data=body, headers={"Content-Type": "application/json"})
    try:
        return urllib.request.urlopen(req, timeout=timeout)
    except urllib.error.HTTPError as e:
        raise VLMError(_error_text(e.read())) from None


def _error_text(raw: bytes) -> str:
    try:
        return json.loads(raw).get("error", raw.decode())
    except (ValueError, AttributeError):
        return raw.decode(errors="replace")


def generate_http(url: str, prompt: str, images: list[bytes] = (), sampling: dict | None = None,
                  exclude_input: bool = True, timeout: float = 600) -> str:
    """One answer through POST /v2/models/vlm/generate (images travel as base64)."""
    with _post(f"http://{url}/v2/models/{MODEL}/generate", _http_body(prompt, images, False, sampling, exclude_input),
               timeout) as r:
        return json.loads(r.read())["text_output"]


def stream_http(url: str, prompt: str, images: list[bytes] = (), sampling: dict | None = None,
                timeout: float = 600) -> Iterator[str]:
    """Text deltas through POST /v2/models/vlm/generate_stream (server-sent events)."""
    with _post(f"http://{url}/v2/models/{MODEL}/generate_stream", _http_body(prompt, images, True, sampling, True),
               timeout) as r:
        for line in r:
            line = line.strip()
            if not line.startswith(b"data:"):
                continue
            event = json.loads(line[5:])
            if "error" in event:
                raise VLMError(event["error"])
            if "text_output" in event:
                yield event["text_output"]
