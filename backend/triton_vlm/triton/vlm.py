"""Triton adapter for the `vlm` entry point: a decoupled BLS model.

execute() copies each request's inputs out of shared memory (the stub may reuse it once execute
returns: reading it later corrupted the heap under concurrency), then a worker thread checks the
request against the serving limits, tokenizes, decodes and preprocesses its images, embeds them
with `vision_encoder`, streams token ids from `llm` and turns them into text deltas. Inputs
mirror Triton's vLLM backend so its clients work unchanged.

No wait is unbounded: vision calls carry a timeout; llm sends every waiting request an empty
response each 250 ms, so a request notices its client's cancellation while queued or prefilling;
a watchdog pings llm when a request has heard nothing for 2 s and, if llm is gone (a dead stub
never answers a stream again), answers that client itself. Whatever ends a request early, its
llm request is aborted so its KV blocks are freed at once.
"""
from __future__ import annotations

import queue
import threading
import time
import uuid
from dataclasses import dataclass, field
from typing import NamedTuple

import numpy as np
import triton_python_backend_utils as pb_utils

from ..detokenizer import Detokenizer
from ..engine.sampling_params import SamplingParams
from ..limits import ServingLimits
from ..messages import Media, parse_messages
from ..preprocess import Preprocessor, as_image
from .params import error_response, model_parameters, optional_input, scalar, text

FINAL = pb_utils.TRITONSERVER_RESPONSE_COMPLETE_FINAL
# Optional outputs a request asks for with `return_<name>`, as in Triton's vLLM backend.
EXTRA_OUTPUTS = ("finish_reason", "num_input_tokens", "num_output_tokens")
INPUTS = ("text_input", "messages", "image", "sampling_parameters", "stream", "exclude_input_in_output",
          *(f"return_{name}" for name in EXTRA_OUTPUTS))
POLL_S = 0.05  # the most often a request asks whether its client cancelled (a round trip each)
PING_AFTER_S = 2.0  # llm silence after which we ask whether llm is alive
PING_TIMEOUT_S = 5.0
# Triton 2.51's stub is not safe for pb_utils used from several threads at once: with concurrent
# requests the vlm stub corrupted its heap within seconds (glibc "unaligned fastbin chunk", or a
# segfault). So every pb_utils object is created, used and dropped under this lock, only plain
# data crosses threads, and waits for a BLS response happen outside it.
PB_LOCK = threading.RLock()


class VLMRequest(NamedTuple):
    prompt: str
    prompt_field: str  # "text_input" or "messages", for errors
    images: list[Media]  # in placeholder order; undecoded unless video frames
    stream: bool
    params: SamplingParams
    exclude_input: bool
    extra_outputs: tuple[str, ...]


class RequestError(Exception):
    """Ends one request with an error response; `code` is a pb_utils.TritonError code."""

    def __init__(self, message: str, code=None):
        super().__init__(message)
        self.code = pb_utils.TritonError.INVALID_ARG if code is None else code


class Cancelled(Exception):
    pass


class Reply:
    """The client's response sender; never sends after the final response.

    Responses are built, sent and dropped under PB_LOCK: pb_utils objects never outlive it.
    """

    def __init__(self, sender):
        self.sender = sender
        self.closed = False
        self._ask_after = 0.0
        self._on_done: list = []

    def send(self, outputs: dict[str, np.ndarray], final: bool = False) -> None:
        with PB_LOCK:
            self._send(lambda: pb_utils.InferenceResponse(
                output_tensors=[pb_utils.Tensor(name, array) for name, array in outputs.items()]), final)

    def fail(self, message: str, code) -> None:
        with PB_LOCK:
            self._send(lambda: error_response(pb_utils, message, code), True)

    def _send(self, build, final: bool) -> None:
        if self.closed:
            return
        self.closed = final
        self.sender.send(build(), flags=FINAL if final else 0)

    def on_done(self, fn) -> None:
        self._on_done.append(fn)

    def done(self) -> None:
        """The request is over for us: drop the sender, give back what it held (once)."""
        with PB_LOCK:
            self.closed = True
            self.sender = None
            hooks, self._on_done = self._on_done, []
        for fn in hooks:
            fn()

    def cancelled(self) -> bool:
        # Each question is a round trip to the server process: ask at most every POLL_S.
        now = time.monotonic()
        if self.closed or now < self._ask_after:
            return False
        self._ask_after = now + POLL_S
        with PB_LOCK:
            return self.sender.is_cancelled()


class LLMOutput(NamedTuple):
    """One llm response as plain data."""
    ids: list[int]
    finish_reason: str | None
    error: RequestError | None


def llm_output(response) -> LLMOutput:
    """Call under PB_LOCK."""
    if response.has_error():
        return LLMOutput([], None, _llm_error(response.error()))
    ids = _output(response, "output_ids")
    reason = _output(response, "finish_reason")
    return LLMOutput([] if ids is None else ids.tolist(), None if reason is None else reason.reshape(-1)[0].decode(),
                     None)


def llm_outputs(request):
    """Run an llm request and yield its responses as LLMOutput, in the caller's thread.

    Waiting for a response happens outside PB_LOCK; each response is read and dropped under it.
    """
    with PB_LOCK:
        responses = iter(request.exec(decoupled=True))
        del request
    try:
        while (response := next(responses, None)) is not None:
            with PB_LOCK:
                out = llm_output(response)
                del response
            yield out
    finally:
        with PB_LOCK:
            del responses


@dataclass
class InFlight:
    """What the watchdog knows of a request waiting on llm."""
    reply: Reply
    heard_at: float = field(default_factory=time.monotonic)
    abandoned: bool = False


def bounded(fn, timeout: float, what: str):
    """Run a blocking BLS call on its own thread and wait at most `timeout` seconds for it."""
    box: queue.Queue = queue.Queue(maxsize=1)

    def run():
        try:
            box.put((fn(), None))
        except Exception as e:  # noqa: BLE001
            box.put((None, e))

    threading.Thread(target=run, name="vlm-call", daemon=True).start()
    try:
        result, error = box.get(timeout=timeout)
    except queue.Empty:
        raise RequestError(f"{what}: no answer within {timeout:g} s", pb_utils.TritonError.UNAVAILABLE) from None
    if error is not None:
        raise error
    return result


class LLMHealth:
    """Whether `llm` still answers: one ping at a time, its answer reused for a second."""

    def __init__(self):
        self._lock = threading.Lock()
        self._checked_at = 0.0
        self._error: str | None = None

    def error(self) -> str | None:
        with self._lock:
            if time.monotonic() - self._checked_at >= 1.0:
                self._error = self._ping()
                self._checked_at = time.monotonic()
            return self._error

    @staticmethod
    def _ping() -> str | None:
        try:
            errors = llm_control("ping")
        except RequestError as e:
            return str(e)
        return errors[0] if errors else None


def llm_control(flag_name: str, request_id: str = "") -> list[str]:
    """Send llm a request with one BOOL flag set (ping, abort); return its error messages. Waits at most
    PING_TIMEOUT_S, outside PB_LOCK, so a stuck llm cannot stall the other requests."""
    def run():
        with PB_LOCK:
            request = pb_utils.InferenceRequest(model_name="llm", request_id=request_id, requested_output_names=[],
                                                inputs=[pb_utils.Tensor(flag_name, np.array([True]))])
            responses = iter(request.exec(decoupled=True))
            del request
        errors = []
        while (response := next(responses, None)) is not None:
            with PB_LOCK:
                if response.has_error():
                    errors.append(response.error().message())
                del response
        with PB_LOCK:
            del responses
        return errors
    return bounded(run, PING_TIMEOUT_S, f"llm {flag_name}")


class TritonPythonModel:
    def initialize(self, args):
        params = model_parameters(args)
        self.pre = Preprocessor(params["checkpoint"])
        self.vision_max_batch = int(params.get("vision_max_batch_size") or 8)
        # `build` resolved the limits against the engine's context length; this only fills gaps.
        self.limits = ServingLimits.from_params(params).resolved(self.pre.geometry.max_model_len)
        # A thread per admitted request (not a pool: a thread stuck on a dead llm stub must not keep a
        # pool slot forever); at most max_concurrent_requests of them work at once.
        self._slots = threading.BoundedSemaphore(self.limits.max_concurrent_requests)
        self.llm_health = LLMHealth()
        self._in_flight: dict[str, InFlight] = {}
        self._admitted = 0
        self._admit_lock = threading.Lock()
        self._stopping = False
        threading.Thread(target=self._watch, name="vlm-watchdog", daemon=True).start()

    def execute(self, requests):
        for request in requests:
            with PB_LOCK:
                reply, inputs = Reply(request.get_response_sender()), read_inputs(request)
            if self._admit():
                reply.on_done(self._unadmit)
                threading.Thread(target=self._serve, args=(inputs, reply), name="vlm-request", daemon=True).start()
                continue
            # Like Triton's own max_queue_size: refuse at once rather than queue without bound.
            limit = self.limits.max_concurrent_requests + self.limits.max_queued_requests
            reply.fail(
                f"server busy: {limit} requests in flight or queued "
                "(max_concurrent_requests + max_queued_requests); retry later", pb_utils.TritonError.UNAVAILABLE)
            reply.done()
        return None

    def finalize(self):
        self._stopping = True  # requests in flight notice at their next llm response (250 ms at most)

    def _admit(self) -> bool:
        with self._admit_lock:
            if self._admitted >= self.limits.max_concurrent_requests + self.limits.max_queued_requests:
                return False
            self._admitted += 1
            return True

    def _unadmit(self) -> None:
        with self._admit_lock:
            self._admitted -= 1

    def _take_slot(self, reply: Reply) -> None:
        while not self._slots.acquire(timeout=POLL_S):
            self._check(reply)  # queued: it may be cancelled, or the server may stop
        reply.on_done(self._slots.release)

    def _serve(self, inputs: dict, reply: Reply):
        try:
            self._take_slot(reply)
            self._generate(inputs, reply)
        except RequestError as e:
            reply.fail(str(e), e.code)
        except ValueError as e:  # bad input, named by whoever found it
            reply.fail(str(e), pb_utils.TritonError.INVALID_ARG)
        except Cancelled:
            reply.fail("request was cancelled", pb_utils.TritonError.CANCELLED)
        except Exception as e:  # noqa: BLE001  (anything unexpected still answers the client)
            log_error(f"vlm: request failed: {e!r}")
            reply.fail(f"internal error: {e}", pb_utils.TritonError.INTERNAL)
        finally:
            reply.done()

    def _check(self, reply: Reply) -> None:
        if self._stopping:
            raise RequestError("server is shutting down", pb_utils.TritonError.UNAVAILABLE)
        if reply.cancelled():
            raise Cancelled()

    def _generate(self, inputs: dict, reply: Reply):
        self._check(reply)  # it may have been cancelled while queued
        req = self._parse(inputs)
        input_ids = self._tokenize(req)  # refuse over-long prompts before any vision work
        images = [as_image(m.data, m.field, self.limits.max_image_pixels) for m in req.images]
        self._check(reply)
        embeds = self._embed_images(images, [m.field for m in req.images]) if images else None
        self._check(reply)
        request_id = uuid.uuid4().hex
        with PB_LOCK:
            outputs = llm_outputs(self._llm_request(request_id, input_ids, req.params, embeds))
        flight = InFlight(reply)
        self._in_flight[request_id] = flight
        try:
            self._relay(outputs, flight, req, len(input_ids))
        except BaseException:
            # Free its KV blocks now, then read llm's final answer: an unread BLS stream keeps
            # its request alive and blocks unloading. (A dead llm never answers: the watchdog
            # has answered our client by then, and this thread is lost with the llm stub.)
            self._abort_llm(request_id)
            for _ in outputs:
                pass
            raise
        finally:
            self._in_flight.pop(request_id, None)

    def _relay(self, outputs, flight: InFlight, req: VLMRequest, n_in: int) -> None:
        """Turn llm responses into vlm responses until llm's final answer."""
        reply = flight.reply
        detok = Detokenizer(self.pre.tokenizer)
        pieces, unsent_tokens, total_tokens, reason = [], 0, 0, None
        for response in outputs:  # llm sends an empty one every 250 ms while a request waits
            flight.heard_at = time.monotonic()
            if response.error:
                raise response.error
            unsent_tokens += len(response.ids)
            total_tokens += len(response.ids)
            delta = detok.add(response.ids)
            reason = response.finish_reason
            if reason is not None:
                delta += detok.flush()
            if not req.stream:
                pieces.append(delta)
            elif delta or reason:
                reply.send(self._response(req, delta, reason, n_in, unsent_tokens), final=reason is not None)
                unsent_tokens = 0
            if reason is not None:
                break
            if flight.abandoned:
                raise RequestError("abandoned by the watchdog", pb_utils.TritonError.UNAVAILABLE)
            self._check(reply)
        if reason is None:
            raise RequestError("llm: stream ended without a final response", pb_utils.TritonError.INTERNAL)
        if not req.stream:
            body = "".join(pieces)
            # Like the vLLM backend: a non-streamed answer repeats the prompt unless told not to.
            text_out = body if req.exclude_input else req.prompt + body
            reply.send(self._response(req, text_out, reason, n_in, total_tokens), final=True)

    def _watch(self) -> None:
        """Answer the clients of requests whose llm went silent: a dead llm stub never answers again."""
        while not self._stopping:
            time.sleep(PING_AFTER_S / 4)
            now = time.monotonic()
            silent = [f for f in list(self._in_flight.values()) if now - f.heard_at > PING_AFTER_S]
            if not silent:
                continue
            error = self.llm_health.error()
            for flight in silent:
                idle = now - flight.heard_at
                if error:
                    message = f"llm is not serving: {error}"
                elif idle > self.limits.llm_idle_timeout_s:
                    message = f"llm: no output for {idle:.0f} s (llm_idle_timeout_s)"
                else:
                    continue
                flight.abandoned = True
                flight.reply.fail(message, pb_utils.TritonError.UNAVAILABLE)
                flight.reply.done()  # its thread may never return: give back its slot now

    @staticmethod
    def _response(req: VLMRequest, text_out: str, reason: str | None, n_in: int, n_out: int) -> dict:
        """text_output plus whichever of the vLLM backend's optional outputs the request asked for."""
        values = {"text_output": text_out.encode(), "finish_reason": (reason or "").encode(),
                  "num_input_tokens": n_in, "num_output_tokens": n_out}
        return {name: np.array([values[name]], dtype=object if isinstance(values[name], bytes) else np.uint32)
                for name in ("text_output", *req.extra_outputs)}

    def _parse(self, inputs: dict) -> VLMRequest:
        limits = self.limits
        size = sum(_nbytes(a) for a in inputs.values() if a is not None)
        if size > limits.max_request_bytes:
            raise ValueError(f"request: {size} bytes of input exceed the limit of {limits.max_request_bytes} "
                             "(max_request_bytes)")
        raw_params = scalar(inputs["sampling_parameters"], "sampling_parameters")
        params = SamplingParams.from_json(raw_params, max_tokens_limit=limits.max_tokens)
        blobs = [] if inputs["image"] is None else [_as_bytes(b) for b in inputs["image"].reshape(-1)]
        if len(blobs) > limits.max_images_per_request:
            raise ValueError(f"image: {len(blobs)} images exceed the limit of {limits.max_images_per_request} "
                             "per request (max_images_per_request)")
        if inputs["messages"] is not None:
            if inputs["text_input"] is not None:
                raise ValueError("messages: send either text_input or messages, not both")
            prompt, images = self._chat(text(scalar(inputs["messages"], "messages"), "messages"), blobs)
        else:
            prompt, images = self._prompt(inputs["text_input"], blobs)
        asked = lambda name: bool(scalar(inputs[name], name, False))  # noqa: E731
        extras = tuple(out for out in EXTRA_OUTPUTS if asked(f"return_{out}"))
        source = "messages" if inputs["messages"] is not None else "text_input"
        return VLMRequest(prompt, source, images, asked("stream"), params, asked("exclude_input_in_output"), extras)

    def _prompt(self, text_input: np.ndarray | None, blobs: list[bytes]) -> tuple[str, list[Media]]:
        raw_prompt = scalar(text_input, "text_input")
        if raw_prompt is None:
            raise ValueError("text_input: required (or messages)")
        prompt = text(raw_prompt, "text_input")
        if not prompt.strip():
            raise ValueError("text_input: empty prompt")
        n_slots = self.pre.count_placeholders(prompt)
        if len(blobs) != n_slots:
            raise ValueError(f"image: {len(blobs)} image(s) sent but text_input has {n_slots} "
                             f"{self.pre.image_token} placeholder(s); send one image per placeholder")
        return prompt, [Media(f"image[{i}]", b) for i, b in enumerate(blobs)]

    def _chat(self, raw: str, blobs: list[bytes]) -> tuple[str, list[Media]]:
        """OpenAI messages through the checkpoint's chat template; video frames count as images."""
        chat = parse_messages(raw, blobs, image_token=self.pre.image_token,
                              max_images=self.limits.max_images_per_request, max_pixels=self.limits.max_image_pixels)
        prompt = self.pre.chat_prompt(chat.messages)
        n_slots = self.pre.count_placeholders(prompt)
        if n_slots != len(chat.media):
            raise ValueError(f"messages: the chat template rendered {n_slots} {self.pre.image_token} placeholder(s) "
                             f"for {len(chat.media)} image(s) (video frames included)")
        return prompt, chat.media

    def _tokenize(self, req: VLMRequest) -> np.ndarray:
        ids = np.asarray(self.pre.input_ids(req.prompt), dtype=np.int64)
        if len(ids) > self.limits.max_prompt_tokens:
            raise RequestError(f"{req.prompt_field}: prompt has {len(ids)} tokens (image tokens included); at most "
                               f"{self.limits.max_prompt_tokens} fit (max_prompt_tokens)")
        return ids

    def _llm_request(self, request_id: str, input_ids, params: SamplingParams, embeds):
        inputs = [pb_utils.Tensor("input_ids", input_ids),
                  pb_utils.Tensor("sampling_parameters", np.array([params.to_json().encode()], dtype=object))]
        if embeds is not None:
            inputs.append(pb_utils.Tensor("image_embeds", embeds.reshape(-1, embeds.shape[-1])))
        return pb_utils.InferenceRequest(model_name="llm", inputs=inputs, request_id=request_id,
                                         requested_output_names=["output_ids", "finish_reason"])

    def _abort_llm(self, request_id: str) -> None:
        """Stop the llm request of one that ended early, freeing its KV blocks now."""
        try:
            llm_control("abort", request_id)
        except Exception as e:  # noqa: BLE001  (a dead llm has nothing left to free)
            log_error(f"vlm: could not abort llm request {request_id}: {e}")

    def _embed_images(self, images, fields: list[str]) -> np.ndarray:
        pixels = self.pre.pixel_values(images, max_pixels=self.limits.max_image_pixels, fields=fields)
        chunks = []
        for start in range(0, len(pixels), self.vision_max_batch):
            batch = pixels[start:start + self.vision_max_batch]
            chunks.append(_encode(batch, self.limits.vision_timeout_s))
        return np.concatenate(chunks).astype(np.float32, copy=False)


def log_error(message: str) -> None:
    with PB_LOCK:
        pb_utils.Logger.log_error(message)


def _encode(pixels: np.ndarray, timeout_s: float) -> np.ndarray:
    with PB_LOCK:
        request = pb_utils.InferenceRequest(model_name="vision_encoder", requested_output_names=["image_embeds"],
                                            inputs=[pb_utils.Tensor("pixel_values", pixels)],
                                            timeout=int(timeout_s * 1e6))
    # Not under PB_LOCK: concurrent calls are what lets vision_encoder batch across requests.
    response = request.exec()
    with PB_LOCK:
        del request
        if response.has_error():
            raise RequestError(f"vision_encoder: {response.error().message()}", pb_utils.TritonError.INTERNAL)
        return _output(response, "image_embeds")


def read_inputs(request) -> dict[str, np.ndarray | None]:
    """Copies of the request's input tensors, safe to read after execute() returns."""
    arrays = {name: optional_input(pb_utils, request, name) for name in INPUTS}
    return {name: None if a is None else a.copy() for name, a in arrays.items()}


def _llm_error(error) -> RequestError:
    """Keep llm's own error code (bad input stays INVALID_ARG, busy stays UNAVAILABLE)."""
    code = error.code() if hasattr(error, "code") else pb_utils.TritonError.INTERNAL
    return RequestError(f"llm: {error.message()}", code)


def _nbytes(array: np.ndarray) -> int:
    if array.dtype == object:
        return sum(len(v) if isinstance(v, (bytes, str)) else 0 for v in array.reshape(-1))
    return array.nbytes


def _as_bytes(value) -> bytes:
    return value if isinstance(value, bytes) else str(value).encode()


def _output(response, name: str) -> np.ndarray | None:
    """A copy of one output; call under PB_LOCK."""
    tensor = pb_utils.get_output_tensor_by_name(response, name)
    return None if tensor is None else tensor.as_numpy().copy()
