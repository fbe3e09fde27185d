"""Triton adapter for the `vlm` entry point: a decoupled BLS model.

execute() copies each request's inputs out of shared memory (the stub may reuse it once execute
returns: reading it later corrupted the heap under concurrency), then a worker thread checks the
request against the serving limits, tokenizes, decodes and preprocesses its images, embeds them
with `vision_encoder`, and relays the text deltas `llm` streams (one completion each) as responses
holding all n completions. Inputs and outputs
mirror Triton's vLLM backend so its clients work unchanged.

No wait is unbounded: vision calls carry a timeout; llm sends every waiting request an empty
response each 250 ms, so a request notices its client's cancellation while queued or prefilling;
a watchdog pings llm when a request has heard nothing for 2 s and, if llm is gone (a dead stub
never answers a stream again), answers that client itself. Whatever ends a request early, its
llm request is aborted so its KV blocks are freed at once.
"""
from __future__ import annotations

import json
import queue
import threading
import time
import uuid
from collections import deque
from dataclasses import dataclass, field
from typing import NamedTuple

import numpy as np
import triton_python_backend_utils as pb_utils

from ..engine.sampling_params import SamplingParams
from ..limits import ServingLimits
from ..messages import Media, parse_messages
from ..preprocess import Preprocessor, as_image
from .params import (SCALAR_INPUTS, error_response, flag, model_parameters, optional_input, request_sampling_params,
                     scalar, text)

FINAL = pb_utils.TRITONSERVER_RESPONSE_COMPLETE_FINAL
# Optional outputs a request asks for with `return_<name>`, as in Triton's vLLM backend.
EXTRA_OUTPUTS = ("finish_reason", "num_input_tokens", "num_output_tokens", "cumulative_logprob", "logprobs",
                 "prompt_logprobs")
INPUTS = ("text_input", "messages", "image", "sampling_parameters", "stream", "exclude_input_in_output",
          *(f"return_{name}" for name in EXTRA_OUTPUTS))
INPUTS += tuple(SCALAR_INPUTS)  # TensorRT-LLM's per-setting tensors
LLM_OUTPUTS = ["output_ids", "finish_reason", "index", "text_output", "logprobs", "cumulative_logprob",
               "prompt_logprobs"]
LLM_INPUT_NAMES = ("input_ids", "image_embeds", "position_ids", "sampling_parameters")  # how llm's input refusals begin
POLL_S = 0.05  # the most often a request asks whether its client cancelled (a round trip each)
PING_AFTER_S = 2.0  # llm silence after which we ask whether llm is alive
PING_TIMEOUT_S = 5.0
# Triton 2.51's stub is not safe for pb_utils used from several threads at once: with concurrent
# requests the vlm stub corrupted its heap within seconds (glibc "unaligned fastbin chunk", or a
# segfault). So every pb_utils object is created, used and dropped under this lock, and only plain
# data crosses threads. Waits for llm or vision_encoder happen outside it, `exec` included (it
# returns only with the first response): a stalled llm must not wedge every vlm thread.
PB_LOCK = threading.RLock()
# How long a finished BLS stream is kept before we drop it (see Streams): the stub's erase takes
# milliseconds; each kept stream holds its responses' shared memory, so not much longer.
STREAM_GRACE_S = 2.0


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


class Streams:
    """Finished BLS response streams, kept a while and then dropped under PB_LOCK.

    Triton 2.51's stub also holds each stream in a map that its utils thread erases, without the
    GIL, once the stream ends. If that erase drops the last reference, the responses' numpy arrays
    are freed without the GIL and, with other threads running, the heap is corrupted ("Tried to
    deallocate unregistered instance", "unaligned fastbin chunk"; fixed upstream after 24.12 by
    "Hold GIL when deleting numpy array"). Holding our reference well past that erase makes ours
    the last one, released with the GIL and under PB_LOCK.
    """

    def __init__(self, grace_s: float = STREAM_GRACE_S):
        self.grace_s = grace_s
        self._kept: deque = deque()  # (release time, stream), oldest first

    def keep(self, stream) -> None:
        self._kept.append((time.monotonic() + self.grace_s, stream))

    def release_expired(self) -> None:
        now = time.monotonic()
        with PB_LOCK:
            while self._kept and self._kept[0][0] <= now:
                self._kept.popleft()


STREAMS = Streams()


class LLMOutput(NamedTuple):
    """One llm response as plain data: one completion's news."""
    ids: list[int]
    finish_reason: str | None  # set when this completion ended
    error: RequestError | None
    index: int = 0
    text: str = ""
    logprobs: list | None = None  # vLLM-backend layout, one dict per new token; None unless asked for
    cumulative_logprob: float = 0.0
    prompt_logprobs: str | None = None  # JSON, once


def llm_output(response) -> LLMOutput:
    """Call under PB_LOCK."""
    if response.has_error():
        return LLMOutput([], None, _llm_error(response.error()))
    get = lambda name: _output(response, name)  # noqa: E731
    ids, reason, index, text_out, logprobs, cumulative, prompt_logprobs = (get(n) for n in LLM_OUTPUTS)
    first = lambda a, default: default if a is None else a.reshape(-1)[0]  # noqa: E731
    return LLMOutput([] if ids is None else ids.tolist(), None if reason is None else first(reason, b"").decode(),
                     None, int(first(index, 0)), first(text_out, b"").decode(),
                     None if logprobs is None else json.loads(first(logprobs, b"null")),
                     float(first(cumulative, 0.0)),
                     None if prompt_logprobs is None else first(prompt_logprobs, b"null").decode())


@dataclass
class Completion:
    """What vlm has of one of the request's n completions, and what it has not sent yet."""
    text: list[str] = field(default_factory=list)
    num_tokens: int = 0
    logprobs: list = field(default_factory=list)
    cumulative_logprob: float = 0.0
    finish_reason: str | None = None
    prompt_logprobs: str | None = None  # JSON, until sent

    def take(self, response: LLMOutput) -> bool:
        """Add one llm response; whether it brought anything to send."""
        self.text.append(response.text)
        self.num_tokens += len(response.ids)
        self.logprobs.extend(response.logprobs or [])
        self.cumulative_logprob = response.cumulative_logprob
        self.finish_reason = response.finish_reason or self.finish_reason
        self.prompt_logprobs = response.prompt_logprobs or self.prompt_logprobs
        return bool(response.text or response.finish_reason)

    def flush(self) -> tuple[str, int, list]:
        out = "".join(self.text), self.num_tokens, self.logprobs
        self.text, self.num_tokens, self.logprobs = [], 0, []
        return out


def llm_outputs(request):
    """Run an llm request and yield its responses as LLMOutput, in the caller's thread.

    Waiting for a response happens outside PB_LOCK; each response is read and dropped under it.
    """
    responses = request.exec(decoupled=True)  # returns with llm's first response: wait outside the lock
    with PB_LOCK:
        del request
    try:
        while (response := next(responses, None)) is not None:
            with PB_LOCK:
                out = llm_output(response)
                del response
            yield out
    finally:
        with PB_LOCK:
            STREAMS.keep(responses)
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
        responses = request.exec(decoupled=True)  # waits for llm's answer: outside the lock
        with PB_LOCK:
            del request
        errors = []
        while (response := next(responses, None)) is not None:
            with PB_LOCK:
                if response.has_error():
                    errors.append(response.error().message())
                del response
        with PB_LOCK:
            STREAMS.keep(responses)
            del responses
        return errors
    return bounded(run, PING_TIMEOUT_S, f"llm {flag_name}")


class TritonPythonModel:
    def initialize(self, args):
        params = model_parameters(args)
        self.pre = Preprocessor(params["checkpoint"])
        self.vision_max_batch = int(params.get("vision_max_batch_size") or 8)
        self.vision_backend = params.get("vision_backend") or "onnxruntime"
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
                if flag(pb_utils, request, "ping"):  # the supervisor asks whether this stub still answers
                    request.get_response_sender().send(flags=FINAL)
                    continue
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
        _check_stream_echo(inputs)
        images = [[as_image(f, m.field, self.limits.max_image_pixels) for f in m.data] if isinstance(m.data, list)
                  else as_image(m.data, m.field, self.limits.max_image_pixels) for m in req.images]
        vision = self.pre.vision_request(images, self.limits.max_image_pixels, [m.field for m in req.images]) \
            if images else None
        input_ids = self._tokenize(req, vision)  # refuse over-long prompts before any vision_encoder work
        positions = self.pre.positions(input_ids.tolist(), vision)
        self._check(reply)
        embeds = self._embed_images(vision) if vision else None
        self._check(reply)
        request_id = uuid.uuid4().hex
        with PB_LOCK:
            outputs = llm_outputs(self._llm_request(request_id, input_ids, req.params, embeds, positions))
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
        """Turn llm responses (one completion each) into vlm responses (all n completions each)."""
        reply = flight.reply
        completions = [Completion() for _ in range(req.params.n)]
        for response in outputs:  # llm sends an empty one every 250 ms while a request waits
            flight.heard_at = time.monotonic()
            if response.error:
                raise response.error
            if not 0 <= response.index < len(completions):
                raise RequestError(f"llm: completion index {response.index} out of range", pb_utils.TritonError.INTERNAL)
            news = completions[response.index].take(response)
            done = all(c.finish_reason for c in completions)
            if req.stream and news:
                reply.send(self._response(req, completions, n_in, done), final=done)
            if done:
                break
            if flight.abandoned:
                raise RequestError("abandoned by the watchdog", pb_utils.TritonError.UNAVAILABLE)
            self._check(reply)
        ended = [c.finish_reason for c in completions if c.finish_reason]
        if not ended:
            raise RequestError("llm: stream ended without a final response", pb_utils.TritonError.INTERNAL)
        for c in completions:  # ended before it forked (aborted early): its siblings never started
            c.finish_reason = c.finish_reason or ended[0]
        if not reply.closed:  # not streamed, or the stream ended early
            reply.send(self._response(req, completions, n_in, True), final=True)

    def _watch(self) -> None:
        """Answer the clients of requests whose llm went silent: a dead llm stub never answers again."""
        while not self._stopping:
            time.sleep(PING_AFTER_S / 4)
            STREAMS.release_expired()
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
    def _response(req: VLMRequest, completions: list[Completion], n_in: int, final: bool) -> dict:
        """text_output plus whichever of the vLLM backend's optional outputs the request asked for, one
        element per completion (index order), each holding what is new since the last response."""
        prompt_logprobs, completions[0].prompt_logprobs = completions[0].prompt_logprobs or "null", None
        texts, counts, logprobs = zip(*(c.flush() for c in completions))
        if not req.stream and not req.exclude_input:  # as the vLLM backend: repeat the prompt first
            texts = [req.prompt + t for t in texts]
        arrays = {
            "text_output": np.array([t.encode() for t in texts], dtype=object),
            # The vLLM backend sends str(None) until a completion ends.
            "finish_reason": np.array([str(c.finish_reason).encode() for c in completions], dtype=object),
            "num_input_tokens": np.array([n_in], dtype=np.uint32),
            "num_output_tokens": np.array(counts, dtype=np.uint32),
            "cumulative_logprob": np.array([c.cumulative_logprob for c in completions], dtype=np.float32),
            "logprobs": np.array([(json.dumps(lp) if req.params.logprobs is not None else "null").encode()
                                  for lp in logprobs], dtype=object),
            "prompt_logprobs": np.array([prompt_logprobs.encode()], dtype=object),  # once, then null
        }
        return {name: arrays[name] for name in ("text_output", *req.extra_outputs)}

    def _parse(self, inputs: dict) -> VLMRequest:
        limits = self.limits
        size = sum(_nbytes(a) for a in inputs.values() if a is not None)
        if size > limits.max_request_bytes:
            raise ValueError(f"request: {size} bytes of input exceed the limit of {limits.max_request_bytes} "
                             "(max_request_bytes)")
        params = request_sampling_params(inputs, limits.max_tokens)
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
        """OpenAI messages through the checkpoint's chat template; video frames count as images (a family with
        native video gets each video as one placeholder and one Media of frames)."""
        chat = parse_messages(raw, blobs, image_token=self.pre.image_token,
                              max_images=self.limits.max_images_per_request, max_pixels=self.limits.max_image_pixels,
                              native_video=self.pre.family.NATIVE_VIDEO)
        prompt = self.pre.chat_prompt(chat.messages)
        n_slots = self.pre.count_placeholders(prompt)
        if n_slots != len(chat.media):
            raise ValueError(f"messages: the chat template rendered {n_slots} {'/'.join(self.pre.placeholders)} "
                             f"placeholder(s) for {len(chat.media)} image(s) or video(s)")
        return prompt, chat.media

    def _tokenize(self, req: VLMRequest, vision) -> np.ndarray:
        ids = np.asarray(self.pre.input_ids(req.prompt, vision.tokens if vision else []), dtype=np.int64)
        if len(ids) > self.limits.max_prompt_tokens:
            raise RequestError(f"{req.prompt_field}: prompt has {len(ids)} tokens (image tokens included); at most "
                               f"{self.limits.max_prompt_tokens} fit (max_prompt_tokens)")
        return ids

    def _llm_request(self, request_id: str, input_ids, params: SamplingParams, embeds, positions):
        inputs = [pb_utils.Tensor("input_ids", input_ids),
                  pb_utils.Tensor("sampling_parameters", np.array([params.to_json().encode()], dtype=object))]
        if embeds is not None:
            inputs.append(pb_utils.Tensor("image_embeds", embeds.reshape(-1, embeds.shape[-1])))
        if positions is not None:  # the family's (M-RoPE), where they are not the token indexes
            inputs.append(pb_utils.Tensor("position_ids", np.ascontiguousarray(positions, dtype=np.int64)))
        return pb_utils.InferenceRequest(model_name="llm", inputs=inputs, request_id=request_id,
                                         requested_output_names=LLM_OUTPUTS)

    def _abort_llm(self, request_id: str) -> None:
        """Stop the llm request of one that ended early, freeing its KV blocks now."""
        try:
            llm_control("abort", request_id)
        except Exception as e:  # noqa: BLE001  (a dead llm has nothing left to free)
            log_error(f"vlm: could not abort llm request {request_id}: {e}")

    def _embed_images(self, vision) -> np.ndarray:
        """Image rows in placeholder order, from as few vision_encoder calls as the family allows."""
        chunks = [_encode(inputs, self.limits.vision_timeout_s)
                  for inputs in self.pre.family.vision_batches(self.pre.geometry, vision.inputs,
                                                                     self.vision_max_batch, self.vision_backend)]
        embeds = np.concatenate(chunks).astype(np.float32, copy=False)
        return embeds.reshape(-1, embeds.shape[-1])


def log_error(message: str) -> None:
    with PB_LOCK:
        pb_utils.Logger.log_error(message)


def _encode(inputs: dict[str, np.ndarray], timeout_s: float) -> np.ndarray:
    with PB_LOCK:
        request = pb_utils.InferenceRequest(model_name="vision_encoder", requested_output_names=["image_embeds"],
                                            inputs=[pb_utils.Tensor(name, a) for name, a in inputs.items()],
                                            timeout=int(timeout_s * 1e6))
    # Not under PB_LOCK: concurrent calls are what lets vision_encoder batch across requests.
    response = request.exec()
    with PB_LOCK:
        del request
        if response.has_error():
            raise RequestError(f"vision_encoder: {response.error().message()}", pb_utils.TritonError.INTERNAL)
        return _output(response, "image_embeds")


def read_inputs(request) -> dict:
    """Copies of the request's input tensors, safe to read after execute() returns, and its
    `parameters` (JSON text), where vLLM-backend clients may put sampling parameters instead."""
    arrays = {name: optional_input(pb_utils, request, name) for name in INPUTS}
    if arrays["return_log_probs"] is not None and bool(scalar(arrays["return_log_probs"], "return_log_probs")):
        for name in ("return_logprobs", "return_cumulative_logprob"):  # TensorRT-LLM's one switch for both
            arrays[name] = np.array([True])
    return {**{name: None if a is None else a.copy() for name, a in arrays.items()},
            "parameters": request.parameters()}


def _check_stream_echo(inputs: dict) -> None:
    """As the vLLM backend: a stream cannot repeat the prompt, so asking for it is an error."""
    exclude = inputs["exclude_input_in_output"]
    if bool(scalar(inputs["stream"], "stream", False)) and exclude is not None and \
            not bool(scalar(exclude, "exclude_input_in_output")):
        raise ValueError("exclude_input_in_output: false is not allowed when streaming "
                         "(a stream cannot repeat the prompt)")


def _llm_error(error) -> RequestError:
    """Triton 2.51 drops the status code of an error that crosses BLS (all arrive as INTERNAL), so it
    is recovered from llm's wording: capacity refusals are UNAVAILABLE (HTTP 503, which clients
    retry), refusals naming one of llm's inputs are INVALID_ARG, anything else INTERNAL."""
    message = error.message()
    if message.startswith(("server busy", "llm engine stopped")):
        code = pb_utils.TritonError.UNAVAILABLE
    elif message.startswith(LLM_INPUT_NAMES):
        code = pb_utils.TritonError.INVALID_ARG
    else:
        code = pb_utils.TritonError.INTERNAL
    return RequestError(f"llm: {message}", code)


def _nbytes(array: np.ndarray | str) -> int:
    if isinstance(array, str):
        return len(array)
    if array.dtype == object:
        return sum(len(v) if isinstance(v, (bytes, str)) else 0 for v in array.reshape(-1))
    return array.nbytes


def _as_bytes(value) -> bytes:
    return value if isinstance(value, bytes) else str(value).encode()


def _output(response, name: str) -> np.ndarray | None:
    """A copy of one output; call under PB_LOCK."""
    tensor = pb_utils.get_output_tensor_by_name(response, name)
    return None if tensor is None else tensor.as_numpy().copy()
