"""An OpenAI-compatible HTTP server (FastAPI + uvicorn) in front of `vlm`, over Triton's gRPC streaming API.

/v1/chat/completions, /v1/completions, /v1/models and /health. Chat messages go to vlm's `messages`
input, where the checkpoint's own chat template renders them; OpenAI's sampling fields become vLLM's
sampling_parameters, which vlm validates and names in its errors. The server keeps no state between
requests. A client that disconnects cancels its Triton stream, which frees its KV blocks.
(Not named `openai`: that would shadow the SDK.)
"""
from __future__ import annotations

import asyncio
import base64
import json
import re
import threading
import time
import uuid
from dataclasses import dataclass, field
from typing import AsyncIterator, NamedTuple

import numpy as np
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, StreamingResponse

from .openai_protocol import (APIError, chat_chunk, chat_completion, completion, completion_chunk, error_body,
                              sampling_parameters, top_logprobs, usage)
from .remote_media import MediaPolicy, fetch

MODEL = "vlm"
_REMOTE = re.compile(r"\s*https?://", re.IGNORECASE)
_NOT_FINISHED = ("", "None", "null")  # finish_reason before the last response (vLLM backend: "None")


@dataclass
class OpenAIConfig:
    grpc_url: str = "127.0.0.1:8001"
    served_model_name: str = ""  # "": the checkpoint directory's name, from vlm's config
    media: MediaPolicy = field(default_factory=MediaPolicy)


class Output(NamedTuple):
    """One vlm response as plain data; the lists hold one entry per completion (`n`)."""
    texts: list[str]
    finish: list[str | None]
    logprobs: list[list[dict] | None]
    n_in: int
    n_out: int
    final: bool


class Served(NamedTuple):
    """What vlm's config says about the model behind it and its serving limits."""
    name: str
    max_tokens: int
    max_images: int  # max_images_per_request: bounds the remote fetches of one request too
    max_request_bytes: int


class VLM:
    """The Triton side: one shared gRPC channel, one stream per request."""

    def __init__(self, config: OpenAIConfig):
        self.config = config
        self._client = None
        self._served: Served | None = None

    @property
    def client(self):
        import tritonclient.grpc.aio as grpcclient

        if self._client is None:  # made inside the event loop, which a grpc.aio channel binds to
            self._client = grpcclient.InferenceServerClient(self.config.grpc_url)
        return self._client

    async def served(self) -> Served:
        if self._served is None:
            try:
                config = (await self.client.get_model_config(MODEL, as_json=True))["config"]
            except Exception as e:  # noqa: BLE001  Triton not up (yet), or vlm not loaded
                raise APIError(503, f"the model server is not ready ({_message(e)})") from None
            params = {k: v.get("string_value", "") for k, v in config.get("parameters", {}).items()}
            name = self.config.served_model_name or params.get("checkpoint", MODEL).rstrip("/").rsplit("/", 1)[-1]
            limit = lambda key: int(params.get(key) or 0)  # noqa: E731
            self._served = Served(name, limit("max_tokens"), limit("max_images_per_request") or 8,
                                  limit("max_request_bytes") or 64 * 1024 * 1024)
        return self._served

    async def ready(self) -> bool:
        try:
            return await self.client.is_model_ready(MODEL)
        except Exception:  # noqa: BLE001  unreachable counts as not ready
            return False

    async def outputs(self, inputs: dict) -> AsyncIterator[Output]:
        """Send one request to vlm and yield its responses until the final one. Leaving early (an error,
        the caller cancelled, the HTTP client went away) cancels the Triton stream."""
        tensors = _tensors(inputs)
        done = asyncio.Event()

        async def requests():
            yield {"model_name": MODEL, "inputs": tensors, "request_id": uuid.uuid4().hex,
                   "parameters": {"triton_enable_empty_final_response": True}}
            await done.wait()  # the stream stays open until the final response

        call = self.client.stream_infer(requests())
        final = False
        try:
            async for result, error in call:
                if error is not None:
                    raise vlm_error(_message(error))
                out = _output(result)
                final = out.final
                yield out
                if final:
                    return
            raise APIError(502, "the model server closed the stream before the final response")
        except APIError:
            raise
        except Exception as e:  # noqa: BLE001  the channel itself failed (Triton down, restarting)
            raise APIError(503, f"the model server is not reachable ({_message(e)})") from None
        finally:
            done.set()
            if not final:
                call.cancel()


def vlm_error(message: str) -> APIError:
    """vlm's errors carry no status code (see triton/params.py): classify them by what they say."""
    message = message.replace("sampling_parameters.", "")  # OpenAI clients know the fields by their own names
    unavailable = ("server busy", "not serving", "shutting down", "no answer within", "abandoned", "no output for",
                   "unknown model", "is not ready")  # the last two: Triton's own, while vlm (re)loads
    if any(s in message for s in unavailable):
        return APIError(503, message)
    if message.startswith("internal error") or "stream ended without" in message:
        return APIError(500, message)
    return APIError(400, message)


def _message(error) -> str:
    text = error.message() if hasattr(error, "message") and callable(error.message) else str(error)
    return text or type(error).__name__


def _tensors(inputs: dict) -> list:
    """tritonclient inputs from plain values: str -> BYTES [1], list[bytes] -> BYTES [n], bool -> BOOL [1]."""
    import tritonclient.grpc as grpcclient

    tensors = []
    for name, value in inputs.items():
        if isinstance(value, bool):
            array, dtype = np.array([value]), "BOOL"
        elif isinstance(value, str):
            array, dtype = np.array([value.encode()], dtype=object), "BYTES"
        else:
            if not value:
                continue
            array, dtype = np.array(list(value), dtype=object), "BYTES"
        tensor = grpcclient.InferInput(name, list(array.shape), dtype)
        tensor.set_data_from_numpy(array)
        tensors.append(tensor)
    return tensors


def _output(result) -> Output:
    def strings(name: str) -> list[str]:
        array = result.as_numpy(name)
        return [] if array is None else [v.decode() if isinstance(v, bytes) else str(v) for v in array.reshape(-1)]

    def total(name: str) -> int:
        array = result.as_numpy(name)
        return 0 if array is None else int(array.astype(np.int64).sum())

    texts = strings("text_output")
    finish = [None if f in _NOT_FINISHED else f for f in strings("finish_reason")]
    logprobs = [None if s in ("", "null") else json.loads(s) for s in strings("logprobs")]
    n = max(len(texts), len(finish), 1)
    final = result.get_response().parameters["triton_final_response"].bool_param
    return Output(_pad(texts, n, ""), _pad(finish, n, None), _pad(logprobs, n, None), total("num_input_tokens"),
                  total("num_output_tokens"), final)


def _pad(values: list, n: int, fill) -> list:
    return values + [fill] * (n - len(values))


# ---- requests ---------------------------------------------------------------------------------------

async def chat_inputs(body: dict, vlm: VLM, served: Served, stream: bool) -> dict:
    messages, images = await _fetch_media(body.get("messages"), vlm.config.media, served)
    return _vlm_inputs(body, served, stream, chat=True) | {"messages": json.dumps(messages), "image": images}


def _vlm_inputs(body: dict, served: Served, stream: bool, chat: bool) -> dict:
    return {"sampling_parameters": json.dumps(sampling_parameters(body, chat, served.max_tokens)), "stream": stream,
            "exclude_input_in_output": True, "return_finish_reason": True, "return_num_input_tokens": True,
            "return_num_output_tokens": True, **({"return_logprobs": True} if _wants_logprobs(body, chat) else {})}


def _wants_logprobs(body: dict, chat: bool) -> bool:
    return bool(body.get("logprobs")) if chat else body.get("logprobs") is not None


async def _fetch_media(messages, policy: MediaPolicy, served: Served) -> tuple[list, list[bytes]]:
    """http(s) image and video URLs, fetched where the operator allows it: images go to vlm's `image` input
    (the part then says "#N"), videos inline as data: URLs. Everything else vlm checks itself."""
    if not isinstance(messages, list) or not messages:
        raise APIError(400, "messages: expected a non-empty array of messages", "messages")
    parts = [p for m in messages if isinstance(m, dict) and isinstance(m.get("content"), list) for p in m["content"]]
    n_media = sum(1 for p in parts if _media_kind(p))
    if n_media > served.max_images:  # before fetching anything
        raise APIError(400, f"messages: {n_media} image and video parts exceed the limit of {served.max_images} "
                            "per request (max_images_per_request)", "messages")
    images: list[bytes] = []
    out = []
    for i, message in enumerate(messages):
        content = message.get("content") if isinstance(message, dict) else None
        if isinstance(content, list):
            message = {**message, "content": [await _fetch_part(p, f"messages[{i}].content[{j}]", images, policy)
                                              for j, p in enumerate(content)]}
        out.append(message)
    return out, images


def _media_kind(part) -> str | None:
    kind = part.get("type") if isinstance(part, dict) else None
    return kind if kind in ("image_url", "video_url") else None


async def _fetch_part(part, where: str, images: list[bytes], policy: MediaPolicy):
    kind = _media_kind(part)
    if kind is None:
        return part
    value = part.get(kind)
    url = value.get("url") if isinstance(value, dict) else value
    if not isinstance(url, str):
        return part  # vlm names the problem
    where = f"{where}.{kind}"
    if url.lstrip().startswith("#"):  # vlm's reference to its image input: not for HTTP clients
        raise APIError(400, f"{where}: expected a data: or http(s) URL", where)
    if not _REMOTE.match(url):
        return part
    try:
        data, content_type = await asyncio.to_thread(fetch, url, policy, where)
    except ValueError as e:
        raise APIError(400, str(e), where) from None
    if kind == "image_url":
        images.append(data)
        url = f"#{len(images) - 1}"
    else:
        media_type = content_type if content_type.startswith("video/") else "video/mp4"
        url = f"data:{media_type};base64,{base64.b64encode(data).decode()}"
    return {**part, kind: {**value, "url": url} if isinstance(value, dict) else url}


def completion_prompts(body: dict) -> list[str]:
    prompt = body.get("prompt")
    prompts = [prompt] if isinstance(prompt, str) else prompt
    if not isinstance(prompts, list) or not prompts or not all(isinstance(p, str) for p in prompts):
        raise APIError(400, "prompt: expected a string or a non-empty array of strings (token ids are not "
                            "supported)", "prompt")
    return prompts


# ---- the app ----------------------------------------------------------------------------------------

def create_app(config: OpenAIConfig) -> FastAPI:
    app = FastAPI(title="triton-vlm OpenAI-compatible API")
    vlm = VLM(config)

    @app.exception_handler(APIError)
    async def api_error(_request, e: APIError):
        return JSONResponse(error_body(e), status_code=e.status)

    async def request_body(request: Request) -> tuple[dict, Served]:
        try:
            body = json.loads(await request.body())
        except ValueError as e:
            raise APIError(400, f"the request body is not valid JSON ({e})") from None
        if not isinstance(body, dict):
            raise APIError(400, "the request body must be a JSON object")
        served = await vlm.served()
        model = body.get("model")
        if model is not None and model != served.name:
            raise APIError(404, f"The model `{model}` does not exist. This server serves `{served.name}`.", "model",
                           "model_not_found")
        return body, served

    def stream_flag(body: dict) -> bool:
        value = body.get("stream", False)
        if not isinstance(value, bool) and value is not None:
            raise APIError(400, "stream: must be true or false", "stream")
        return bool(value)

    @app.get("/health")
    async def health():
        if await vlm.ready():
            return {"status": "ok"}
        return JSONResponse(error_body(APIError(503, "the vlm model is not ready")), status_code=503)

    @app.get("/v1/models")
    async def models():
        served = await vlm.served()
        return {"object": "list", "data": [{"id": served.name, "object": "model", "created": 0,
                                            "owned_by": "triton-vlm"}]}

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request):
        body, served = await request_body(request)
        stream = stream_flag(body)
        inputs = await chat_inputs(body, vlm, served, stream)
        head = Head(f"chatcmpl-{uuid.uuid4().hex}", int(time.time()), served.name)
        outputs = vlm.outputs(inputs)
        if stream:
            return await streamed(request, chat_events(head, outputs, body))
        return chat_completion(head, await until_disconnected(request, collect(outputs)), body)

    @app.post("/v1/completions")
    async def completions(request: Request):
        body, served = await request_body(request)
        stream = stream_flag(body)
        prompts = completion_prompts(body)
        base = _vlm_inputs(body, served, stream, chat=False)
        head = Head(f"cmpl-{uuid.uuid4().hex}", int(time.time()), served.name)
        runs = [vlm.outputs(base | {"text_input": p}) for p in prompts]
        if stream:
            return await streamed(request, completion_events(head, runs, prompts, body))
        results = await until_disconnected(request, asyncio.gather(*(collect(r) for r in runs)))
        return completion(head, results, prompts, body)

    return app


class Head(NamedTuple):
    id: str
    created: int
    model: str


async def collect(outputs: AsyncIterator[Output]) -> Output:
    """All responses of one request as one Output."""
    texts, finish, logprobs, n_in, n_out = None, None, None, 0, 0
    async for out in outputs:
        if texts is None:
            texts, finish, logprobs = [""] * len(out.texts), [None] * len(out.texts), [None] * len(out.texts)
        for i in range(min(len(texts), len(out.texts))):
            texts[i] += out.texts[i]
            finish[i] = out.finish[i] or finish[i]
            if out.logprobs[i] is not None:
                logprobs[i] = (logprobs[i] or []) + out.logprobs[i]
        n_in, n_out = out.n_in or n_in, n_out + out.n_out
    return Output(texts or [""], finish or [None], logprobs or [None], n_in, n_out, True)


async def until_disconnected(request, awaitable):
    """Await `awaitable` unless the HTTP client goes away first; then cancel it (and its Triton stream)."""
    work = asyncio.ensure_future(awaitable)
    gone = asyncio.ensure_future(_disconnect(request))
    try:
        await asyncio.wait({work, gone}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        gone.cancel()
    if not work.done():
        work.cancel()
        raise APIError(499, "the client disconnected")
    return work.result()


async def _disconnect(request) -> None:
    while (await request.receive())["type"] != "http.disconnect":
        pass


async def streamed(request, events: AsyncIterator[str]) -> StreamingResponse:
    """A server-sent-event response; errors before the first event keep their HTTP status (400, 503...)."""
    first = await until_disconnected(request, anext(events))

    async def body():
        yield first
        async for event in events:
            yield event

    return StreamingResponse(body(), media_type="text/event-stream", headers={"Cache-Control": "no-cache"})


def sse(payload) -> str:
    return f"data: {json.dumps(payload) if not isinstance(payload, str) else payload}\n\n"


async def sse_events(head: Head, kind: str, body: dict, chunks: AsyncIterator[dict], tokens: list[int]):
    """Server-sent events of `chunks`, then the usage chunk if asked for, then [DONE]. An error before the
    first chunk propagates (the response keeps its HTTP status); after it, it becomes an error event.
    `tokens` is [prompt, completion], filled in by `chunks` as it goes."""
    sent = False
    try:
        async for chunk in chunks:
            sent = True
            yield sse(chunk)
    except APIError as e:
        if not sent:
            raise
        yield sse(error_body(e))
    else:
        if (body.get("stream_options") or {}).get("include_usage"):
            yield sse({"id": head.id, "object": kind, "created": head.created, "model": head.model, "choices": [],
                       "usage": usage(*tokens)})
    yield sse("[DONE]")


def chat_events(head: Head, outputs: AsyncIterator[Output], body: dict) -> AsyncIterator[str]:
    tokens = [0, 0]
    return sse_events(head, "chat.completion.chunk", body, _chat_chunks(head, outputs, body, tokens), tokens)


async def _chat_chunks(head: Head, outputs: AsyncIterator[Output], body: dict, tokens: list[int]):
    with_usage = bool((body.get("stream_options") or {}).get("include_usage"))
    top = top_logprobs(body)
    started: set[int] = set()
    async for out in outputs:
        for i, (text, reason, logprobs) in enumerate(zip(out.texts, out.finish, out.logprobs)):
            if i not in started:  # OpenAI opens each choice with the role
                started.add(i)
                yield chat_chunk(head, i, {"role": "assistant", "content": ""}, None, None, top, with_usage)
            if text or logprobs:
                yield chat_chunk(head, i, {"content": text}, None, logprobs, top, with_usage)
            if reason:
                yield chat_chunk(head, i, {}, reason, None, top, with_usage)
        tokens[0], tokens[1] = out.n_in or tokens[0], tokens[1] + out.n_out


def completion_events(head: Head, runs: list, prompts: list[str], body: dict) -> AsyncIterator[str]:
    tokens = [0, 0]
    return sse_events(head, "text_completion", body, _completion_chunks(head, runs, prompts, body, tokens), tokens)


async def _completion_chunks(head: Head, runs: list, prompts: list[str], body: dict, tokens: list[int]):
    with_usage = bool((body.get("stream_options") or {}).get("include_usage"))
    n = body.get("n") or 1  # vlm checked it
    prompt_tokens: dict[int, int] = {}
    echoed: set[int] = set()
    async for k, out in merge(runs):
        for i, (text, reason, logprobs) in enumerate(zip(out.texts, out.finish, out.logprobs)):
            index = k * n + i
            if body.get("echo") and index not in echoed:
                echoed.add(index)
                text = prompts[k] + text
            if text or reason or logprobs:
                yield completion_chunk(head, index, text, reason, logprobs, with_usage)
        prompt_tokens[k] = out.n_in or prompt_tokens.get(k, 0)
        tokens[0], tokens[1] = sum(prompt_tokens.values()), tokens[1] + out.n_out


async def merge(runs: list) -> AsyncIterator[tuple[int, Output]]:
    """Outputs of several vlm streams as they come, each tagged with its run's index."""
    queue: asyncio.Queue = asyncio.Queue()

    async def pump(k: int, run) -> None:
        try:
            async for out in run:
                await queue.put((k, out, None))
        except Exception as e:  # noqa: BLE001  handed to the consumer
            await queue.put((k, None, e))
        await queue.put((k, None, None))

    tasks = [asyncio.ensure_future(pump(k, run)) for k, run in enumerate(runs)]
    try:
        for _ in range(len(runs)):
            while True:
                k, out, error = await queue.get()
                if error is not None:
                    raise error
                if out is None:
                    break
                yield k, out
    finally:
        for task in tasks:
            task.cancel()


# ---- running it -------------------------------------------------------------------------------------

class Running(NamedTuple):
    server: object  # uvicorn.Server
    thread: threading.Thread

    def stop(self, timeout: float = 10) -> None:
        self.server.should_exit = True
        self.thread.join(timeout)


def run(config: OpenAIConfig, host: str = "127.0.0.1", port: int = 8080) -> None:
    """Serve in this thread until interrupted."""
    import uvicorn

    uvicorn.run(create_app(config), host=host, port=port, log_level="warning")


def start(config: OpenAIConfig, host: str = "127.0.0.1", port: int = 8080, timeout: float = 30) -> Running:
    """Serve on a background thread (beside `triton-vlm serve`, or in tests); returns once it listens."""
    import uvicorn

    server = uvicorn.Server(uvicorn.Config(create_app(config), host=host, port=port, log_level="warning"))
    thread = threading.Thread(target=server.run, name="openai-api", daemon=True)
    thread.start()
    deadline = time.monotonic() + timeout
    while not server.started:
        if not thread.is_alive() or time.monotonic() > deadline:
            raise RuntimeError(f"the OpenAI server did not start on {host}:{port}")
        time.sleep(0.05)
    return Running(server, thread)
