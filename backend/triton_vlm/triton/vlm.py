"""Triton adapter for the `vlm` entry point: a decoupled BLS model.

execute() copies each request's inputs out of shared memory (the stub may reuse it once execute
returns: reading it later corrupted the heap under concurrency), then a worker thread checks the
request against the serving limits, tokenizes, decodes and preprocesses its images, embeds them
with `vision_encoder`, and relays the text deltas `llm` streams (one completion each) as responses
holding all n completions. Inputs and outputs mirror Triton's vLLM backend so its clients work
unchanged. llm's outputs arrive over vlm's own socket, not as BLS responses (triton/channel.py):
every BLS call to llm has exactly one response.

No wait is unbounded: vision calls carry a timeout; llm sends every waiting request an empty
output each 250 ms, and a request checks its client's cancellation at least as often, queued or
prefilling too; a watchdog pings llm when a request has heard nothing for 2 s and, if llm is gone,
answers that client itself. Whatever ends a request early, its llm request is aborted so its KV
blocks are freed at once.
"""
from __future__ import annotations

import hashlib
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
from ..image_cache import MAX_ID_CHARS, ImageCache, ImageRef, content_hash
from ..limits import ServingLimits
from ..messages import Media, parse_messages
from ..preprocess import Preprocessor, as_image
from .channel import LOST, Listener
from .metrics import VLMMetrics
from .params import (SCALAR_INPUTS, error_response, flag, model_parameters, optional_input, request_sampling_params,
                     scalar, text)

FINAL = pb_utils.TRITONSERVER_RESPONSE_COMPLETE_FINAL
# Optional outputs a request asks for with `return_<name>`, as in Triton's vLLM backend.
EXTRA_OUTPUTS = ("finish_reason", "num_input_tokens", "num_output_tokens", "cumulative_logprob", "logprobs",
                 "prompt_logprobs")
INPUTS = ("text_input", "messages", "image", "image_uuid", "sampling_parameters", "stream", "exclude_input_in_output",
          *(f"return_{name}" for name in EXTRA_OUTPUTS))
INPUTS += tuple(SCALAR_INPUTS)  # TensorRT-LLM's per-setting tensors
# How llm's input refusals begin.
LLM_INPUT_NAMES = ("input_ids", "image_embeds", "image_rows", "image_hashes", "position_ids", "sampling_parameters")
POLL_S = 0.05  # the most often a request asks whether its client cancelled (a round trip each)
HEARTBEAT_S = 0.25  # the longest a request waits for llm before it checks on its client
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
    images: list[Media]  # in placeholder order; undecoded unless video frames; `image` elements as ImageRef
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
    finished: bool = False  # the whole request is over (all completions)


def llm_output(message: dict) -> LLMOutput:
    """One channel message from llm (triton/llm.py output_message) as an LLMOutput."""
    if message.get("error"):
        return LLMOutput([], None, _llm_error(message["error"]))
    return LLMOutput(message["ids"], message["finish_reason"], None, message["index"], message["text"],
                     message.get("logprobs"), message["cumulative_logprob"], message.get("prompt_logprobs"),
                     message["finished"])


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


def llm_outputs(listener: Listener, build, request_id: str):
    """Run the llm request `build()` makes and yield its outputs as LLMOutput, in the caller's thread;
    None when HEARTBEAT_S passed without one."""
    inbox = listener.open(request_id)  # before the request: its first output may come at once
    try:
        errors = call_llm(build)
        if errors:  # refused
            yield LLMOutput([], None, _llm_error(errors[0]))
            return
        while True:
            try:
                message = inbox.get(timeout=HEARTBEAT_S)
            except queue.Empty:
                yield None
                continue
            yield llm_output(message)
    finally:
        listener.close(request_id)


def call_llm(build) -> list[str]:
    """Make an llm request with `build()` (under PB_LOCK), run it and return its error messages.

    Every llm call has exactly one response, which `exec` returns with: `next` never waits, so
    the stub's deadlock (triton/channel.py) cannot happen. Waits happen outside PB_LOCK.
    """
    with PB_LOCK:
        request = build()
    responses = request.exec(decoupled=True)
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
    def build():
        return pb_utils.InferenceRequest(model_name="llm", request_id=request_id, requested_output_names=[],
                                         inputs=[pb_utils.Tensor(flag_name, np.array([True]))])
    return bounded(lambda: call_llm(build), PING_TIMEOUT_S, f"llm {flag_name}")


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
        self.images = ImageCache(int(float(params.get("image_cache_mb") or 0) * 2 ** 20))
        self._in_flight: dict[str, InFlight] = {}
        self._admitted = 0
        self._admit_lock = threading.Lock()
        self._stopping = False
        self.listener = Listener()
        self.metrics = VLMMetrics(PB_LOCK, {"model": args["model_name"], "version": args["model_version"]})
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
        self._stopping = True  # requests in flight notice within HEARTBEAT_S
        self.listener.stop()
        self.metrics.stop()

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
        if not req.images:
            images, positions = None, None
            input_ids = self._tokenize(req, [])
            self.metrics.record_request(0, None)
        elif self.pre.family.FIXED_IMAGE_TOKENS:
            # Refuse an over-long prompt before any vision work; repeated images come from the image cache.
            input_ids = self._tokenize(req, [self.pre.geometry.image_seq_len] * len(req.images))
            images, positions = self._image_embeds(req.images, reply), None
        else:
            images, input_ids, positions = self._sized_images(req, reply)
        self._check(reply)
        request_id = uuid.uuid4().hex
        outputs = llm_outputs(self.listener,
                              lambda: self._llm_request(request_id, input_ids, req.params, images, positions), request_id)
        flight = InFlight(reply)
        self._in_flight[request_id] = flight
        try:
            self._relay(outputs, flight, req, len(input_ids))
        except BaseException:
            self._abort_llm(request_id)  # free its KV blocks now
            raise
        finally:
            outputs.close()
            self._in_flight.pop(request_id, None)

    def _relay(self, outputs, flight: InFlight, req: VLMRequest, n_in: int) -> None:
        """Turn llm responses (one completion each) into vlm responses (all n completions each)."""
        reply = flight.reply
        completions = [Completion() for _ in range(req.params.n)]
        for response in outputs:  # None: nothing from llm for HEARTBEAT_S
            if response is not None:
                flight.heard_at = time.monotonic()
                if self._take(response, completions, req, reply, n_in):
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

    def _take(self, response: LLMOutput, completions: list[Completion], req: VLMRequest, reply: Reply,
              n_in: int) -> bool:
        """Add one llm output, streaming what it brought; whether the request has ended."""
        if response.error:
            raise response.error
        if not 0 <= response.index < len(completions):
            raise RequestError(f"llm: completion index {response.index} out of range", pb_utils.TritonError.INTERNAL)
        news = completions[response.index].take(response)
        done = all(c.finish_reason for c in completions)
        if req.stream and news:
            reply.send(self._response(req, completions, n_in, done), final=done)
        return done or response.finished

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
        blobs = self._image_refs(blobs, inputs["image_uuid"])
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

    def _tokenize(self, req: VLMRequest, tokens: list[int]) -> np.ndarray:
        """tokens: each image's (or video's) rows, in placeholder order."""
        ids = np.asarray(self.pre.input_ids(req.prompt, tokens), dtype=np.int64)
        if len(ids) > self.limits.max_prompt_tokens:
            raise RequestError(f"{req.prompt_field}: prompt has {len(ids)} tokens (image tokens included); at most "
                               f"{self.limits.max_prompt_tokens} fit (max_prompt_tokens)")
        return ids

    def _image_refs(self, blobs: list[bytes], uuids: np.ndarray | None) -> list[ImageRef]:
        """Key each `image` element by its content hash; an element sent empty with an `image_uuid` is the
        image the server holds under that id."""
        ids = [] if uuids is None else [_as_bytes(u).decode("utf-8", "replace") for u in uuids.reshape(-1)]
        if ids and len(ids) != len(blobs):
            raise ValueError(f"image_uuid: {len(ids)} element(s) for {len(blobs)} image element(s); send one per "
                             "image (empty for none)")
        refs = []
        for i, blob in enumerate(blobs):
            image_id = ids[i] if ids else ""
            if len(image_id) > MAX_ID_CHARS:
                raise ValueError(f"image_uuid[{i}]: longer than {MAX_ID_CHARS} characters")
            if blob or not image_id:
                refs.append(ImageRef(content_hash(blob), blob, image_id))
                continue
            key = self.images.resolve(image_id)
            if key is None:
                raise ValueError(f"image_uuid[{i}]: unknown id {image_id!r}: no image is held under it (send the "
                                 "image with the id once; ids last while the image cache keeps the image)")
            refs.append(ImageRef(key, None, image_id))
        return refs

    def _image_embeds(self, media: list[Media], reply: Reply) -> list[tuple[str, np.ndarray]]:
        """(content hash, embeddings [rows, D]) per image: from the image cache, or decoded, preprocessed and
        embedded with one vision_encoder call for all the misses, which are then cached."""
        refs = [m.data if isinstance(m.data, ImageRef) else ImageRef(content_hash(m.data), m.data) for m in media]
        found = [self.images.get(r.key) for r in refs]
        missing = [i for i, e in enumerate(found) if e is None]
        for i in missing:
            if refs[i].data is None:  # evicted since its id was resolved
                raise ValueError(f"{media[i].field}: the image named by image_uuid {refs[i].image_id!r} is no "
                                 "longer held; send it again")
        if missing:
            pil = [as_image(refs[i].data, media[i].field, self.limits.max_image_pixels) for i in missing]
            vision = self.pre.vision_request(pil, self.limits.max_image_pixels, [media[i].field for i in missing])
            self._check(reply)
            started = time.monotonic()
            embeds = _split(self._embed_images(vision), vision.tokens)
            vision_s = time.monotonic() - started
            for i, e in zip(missing, embeds):
                found[i] = e
                self.images.put(refs[i].key, e)
        for r in refs:
            if r.image_id:
                self.images.name(r.image_id, r.key)
        self.metrics.record_request(len(refs), vision_s if missing else None, hits=len(refs) - len(missing),
                                    misses=len(missing))
        return [(r.key, e) for r, e in zip(refs, found)]

    def _sized_images(self, req: VLMRequest, reply: Reply) -> tuple[list[tuple[str, np.ndarray]], np.ndarray, np.ndarray]:
        """Families whose image tokens follow the image's size (Qwen2-VL): every image is decoded, since its
        size sets the prompt's tokens and positions; no image cache. Returns (content hash, rows) per image or
        video, the input ids and the positions."""
        data = [m.data.data if isinstance(m.data, ImageRef) else m.data for m in req.images]
        if any(d is None for d in data):
            raise ValueError("image_uuid: this model's images must be sent (its image tokens follow each image's size)")
        images = [[as_image(f, m.field, self.limits.max_image_pixels) for f in d] if isinstance(d, list)
                  else as_image(d, m.field, self.limits.max_image_pixels) for d, m in zip(data, req.images)]
        vision = self.pre.vision_request(images, self.limits.max_image_pixels, [m.field for m in req.images])
        input_ids = self._tokenize(req, vision.tokens)  # refuse over-long prompts before vision_encoder work
        positions = self.pre.positions(input_ids.tolist(), vision)
        self._check(reply)
        started = time.monotonic()
        rows = _split(self._embed_images(vision), vision.tokens)
        self.metrics.record_request(len(images), time.monotonic() - started, misses=len(images))
        keys = [_video_hash(d) if isinstance(d, list) else content_hash(d) for d in data]
        return list(zip(keys, rows)), input_ids, positions

    def _llm_request(self, request_id: str, input_ids, params: SamplingParams,
                     images: list[tuple[str, np.ndarray]] | None, positions: np.ndarray | None):
        inputs = [pb_utils.Tensor("input_ids", input_ids),
                  pb_utils.Tensor("sampling_parameters", np.array([params.to_json().encode()], dtype=object)),
                  pb_utils.Tensor("reply_to", np.array([self.listener.path.encode()], dtype=object))]
        if images:
            inputs += [pb_utils.Tensor("image_embeds", np.concatenate([e for _, e in images])),
                       pb_utils.Tensor("image_rows", np.array([len(e) for _, e in images], dtype=np.int64)),
                       pb_utils.Tensor("image_hashes", np.array([k.encode() for k, _ in images], dtype=object))]
        if positions is not None:  # the family's (M-RoPE), where they are not the token indexes
            inputs.append(pb_utils.Tensor("position_ids", np.ascontiguousarray(positions, dtype=np.int64)))
        return pb_utils.InferenceRequest(model_name="llm", inputs=inputs, request_id=request_id,
                                         requested_output_names=[])

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


def _split(rows: np.ndarray, counts: list[int]) -> list[np.ndarray]:
    """One image's rows each: `counts` in order."""
    return np.split(rows, np.cumsum(counts)[:-1])


def _video_hash(frames: list) -> str:
    h = hashlib.sha256(b"video\n")
    for frame in frames:
        h.update(content_hash(frame).encode())
    return h.hexdigest()


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


def _llm_error(message: str) -> RequestError:
    """Triton 2.51 drops the status code of an error that crosses BLS (all arrive as INTERNAL), and the
    channel carries text, so the code is recovered from llm's wording: capacity refusals and a lost
    llm are UNAVAILABLE (HTTP 503, which clients retry), refusals naming one of llm's inputs are
    INVALID_ARG, anything else INTERNAL."""
    if message.startswith(("server busy", "llm engine stopped", LOST)):
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
