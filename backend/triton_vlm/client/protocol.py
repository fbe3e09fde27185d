"""The `vlm` model's request tensors, and requests over Triton's own gRPC (streaming) and HTTP (generate) APIs."""
from __future__ import annotations

import base64
import json
import queue
import urllib.error
import urllib.request
import uuid
from concurrent.futures import ThreadPoolExecutor, as_completed
from typing import Callable, Iterator, NamedTuple

import numpy as np

MODEL = "vlm"
EXTRA_OUTPUTS = ("finish_reason", "num_input_tokens", "num_output_tokens")


class VLMError(RuntimeError):
    """The server answered the request with an error."""


def grpc_inputs(prompt: str | None, images: list[bytes] = (), stream: bool = True, sampling: dict | None = None,
                exclude_input: bool = True, returns: tuple[str, ...] = (), messages: str | None = None,
                image_uuids: list[str] = ()):
    """The vlm request tensors; `returns` names optional outputs, e.g. ("finish_reason",).

    `messages` (OpenAI chat JSON, rendered by the server with the checkpoint's template) replaces `prompt`.
    `image_uuids` names each image (b"" as its image: the one the server holds under that id)."""
    import tritonclient.grpc as grpcclient

    def tensor(name, array, dtype):
        t = grpcclient.InferInput(name, list(array.shape), dtype)
        t.set_data_from_numpy(array)
        return t

    text = ("messages", messages) if messages is not None else ("text_input", prompt)
    inputs = [tensor(text[0], np.array([text[1].encode()], dtype=object), "BYTES"),
              tensor("stream", np.array([stream]), "BOOL"),
              tensor("exclude_input_in_output", np.array([exclude_input]), "BOOL")]
    if images:
        inputs.append(tensor("image", np.array(list(images), dtype=object), "BYTES"))
    if image_uuids:
        inputs.append(tensor("image_uuid", np.array([u.encode() for u in image_uuids], dtype=object), "BYTES"))
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
            try:
                result, error = results.get(timeout=timeout)
            except queue.Empty:
                raise VLMError(f"no response from {url} in {timeout:g} s") from None
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


class Completion(NamedTuple):
    """One finished request: its whole text and the vLLM backend's optional outputs."""
    text: str
    finish_reason: str | None  # "stop" or "length"
    num_input_tokens: int
    num_output_tokens: int


def complete(url: str, inputs, timeout: float = 600) -> Completion:
    """Stream one request (built with returns=EXTRA_OUTPUTS) to its end."""
    pieces, reason, n_in, n_out = [], None, 0, 0
    for result in stream_grpc_results(url, inputs, timeout):
        out = result.as_numpy("text_output")
        if out is None:  # the empty final response
            continue
        pieces += [p.decode() for p in out.reshape(-1)]
        r = _scalar(result, "finish_reason")
        reason = r.decode() if r not in (None, b"", b"None") else reason  # non-final: "" or "None"
        n_in = int(_scalar(result, "num_input_tokens") or n_in)
        n_out += int(_scalar(result, "num_output_tokens") or 0)  # per response: the tokens it carries
    return Completion("".join(pieces), reason, n_in, n_out)


def _scalar(result, name: str):
    out = result.as_numpy(name)
    return None if out is None else out.reshape(-1)[0]


def complete_all(url: str, requests: list[Callable[[], list]], timeout: float = 600, max_in_flight: int = 64,
                 progress: bool = False) -> list[Completion]:
    """Run every request concurrently, each on its own gRPC stream, at most `max_in_flight` at a time;
    results in request order. `requests[i]()` builds request i's inputs (in the thread that sends it).

    The first failure raises VLMError naming its index; requests not yet sent are dropped."""
    results: list[Completion | None] = [None] * len(requests)
    bar = _progress_bar(len(requests)) if progress else None
    with ThreadPoolExecutor(max_workers=max(1, min(max_in_flight, len(requests)))) as pool:
        futures = {pool.submit(lambda build=build: complete(url, build(), timeout)): i
                   for i, build in enumerate(requests)}
        try:
            for future in as_completed(futures):
                i = futures[future]
                try:
                    results[i] = future.result()
                except (VLMError, ValueError) as e:
                    raise type(e)(f"request {i}: {e}") from None
                if bar is not None:
                    bar.update()
        finally:
            for future in futures:
                future.cancel()
            if bar is not None:
                bar.close()
    return results


def _progress_bar(total: int):
    from tqdm import tqdm

    return tqdm(total=total, desc="requests", unit="req")


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
