"""Triton adapter for the `vlm` entry point: a decoupled BLS model.

Each request runs on a worker thread: decode and preprocess its images, embed them with one
`vision_encoder` call, expand the placeholders, then stream token ids from `llm` and turn them
into text deltas. Inputs mirror Triton's vLLM backend so its clients work unchanged.
"""
from __future__ import annotations

import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from typing import NamedTuple

import numpy as np
import triton_python_backend_utils as pb_utils

from ..detokenizer import Detokenizer
from ..engine.llm_engine import CANCEL_CHECK_INTERVAL_S
from ..engine.sampling_params import SamplingParams
from ..preprocess import Preprocessor, decode_image
from .params import error_response, model_parameters, optional_input, scalar, text

FINAL = pb_utils.TRITONSERVER_RESPONSE_COMPLETE_FINAL
# Optional outputs a request asks for with `return_<name>`, as in Triton's vLLM backend.
EXTRA_OUTPUTS = ("finish_reason", "num_input_tokens", "num_output_tokens")


class VLMRequest(NamedTuple):
    prompt: str
    images: list
    stream: bool
    params: SamplingParams
    exclude_input: bool
    extra_outputs: tuple[str, ...]


class RequestError(ValueError):
    """Bad input or a failed downstream model: becomes an error response, never a crash."""


class TritonPythonModel:
    def initialize(self, args):
        params = model_parameters(args)
        self.pre = Preprocessor(params["checkpoint"])
        self.vision_max_batch = int(params.get("vision_max_batch_size") or 8)
        self.pool = ThreadPoolExecutor(max_workers=int(params.get("max_concurrent_requests") or 64),
                                       thread_name_prefix="vlm")

    def execute(self, requests):
        for request in requests:
            self.pool.submit(self._serve, request)
        return None

    def finalize(self):
        self.pool.shutdown(wait=True, cancel_futures=True)

    def _serve(self, request):
        sender = request.get_response_sender()
        try:
            self._generate(request, sender)
        except RequestError as e:
            sender.send(error_response(pb_utils, str(e)), flags=FINAL)
        except Exception as e:  # anything unexpected still answers the client
            pb_utils.Logger.log_error(f"vlm: request failed: {e!r}")
            sender.send(error_response(pb_utils, f"internal error: {e}"), flags=FINAL)

    def _generate(self, request, sender):
        req = self._parse(request)
        embeds = self._embed_images(req.images) if req.images else None
        input_ids = np.asarray(self.pre.input_ids(req.prompt), dtype=np.int64)
        inputs = [pb_utils.Tensor("input_ids", input_ids),
                  pb_utils.Tensor("sampling_parameters", np.array([req.params.to_json().encode()], dtype=object))]
        if embeds is not None:
            inputs.append(pb_utils.Tensor("image_embeds", embeds.reshape(-1, embeds.shape[-1])))
        request_id = uuid.uuid4().hex
        llm_request = pb_utils.InferenceRequest(model_name="llm", inputs=inputs, request_id=request_id,
                                                requested_output_names=["output_ids", "finish_reason"])
        detok = Detokenizer(self.pre.tokenizer)
        pieces, unsent_tokens, total_tokens, reason = [], 0, 0, None
        next_cancel_check = 0.0
        for response in llm_request.exec(decoupled=True):
            if response.has_error():
                raise RequestError(f"llm: {response.error().message()}")
            ids = _output(response, "output_ids")
            reason_out = _output(response, "finish_reason")
            new_ids = [] if ids is None else ids.tolist()
            unsent_tokens += len(new_ids)
            total_tokens += len(new_ids)
            delta = detok.add(new_ids)
            if reason_out is not None:
                reason = reason_out.reshape(-1)[0].decode()
                delta += detok.flush()
            if not req.stream:
                pieces.append(delta)
            elif delta or reason:
                sender.send(self._response(req, delta, reason, len(input_ids), unsent_tokens),
                            flags=FINAL if reason else 0)
                unsent_tokens = 0
            # Never ask after the final response (Triton has released the request by then), and
            # only now and then: each question is a round trip to the server process.
            if reason is None and time.monotonic() >= next_cancel_check:
                next_cancel_check = time.monotonic() + CANCEL_CHECK_INTERVAL_S
                if sender.is_cancelled():
                    self._abort_llm(request_id)
                    sender.send(pb_utils.InferenceResponse(error=pb_utils.TritonError(
                        "request was cancelled", pb_utils.TritonError.CANCELLED)), flags=FINAL)
                    return
        if req.stream:
            if reason is None:  # the llm stream ended without its final answer: still close ours
                sender.send(flags=FINAL)
            return
        body = "".join(pieces)
        # Like the vLLM backend: a non-streamed answer repeats the prompt unless told not to.
        text_out = body if req.exclude_input else req.prompt + body
        sender.send(self._response(req, text_out, reason, len(input_ids), total_tokens), flags=FINAL)

    @staticmethod
    def _response(req: VLMRequest, text_out: str, reason: str | None, n_in: int, n_out: int):
        """text_output plus whichever of the vLLM backend's optional outputs the request asked for."""
        values = {"text_output": text_out.encode(), "finish_reason": (reason or "").encode(),
                  "num_input_tokens": n_in, "num_output_tokens": n_out}
        tensors = [pb_utils.Tensor("text_output", np.array([values["text_output"]], dtype=object))]
        for name in req.extra_outputs:
            value = values[name]
            array = np.array([value], dtype=object) if isinstance(value, bytes) else np.array([value], dtype=np.uint32)
            tensors.append(pb_utils.Tensor(name, array))
        return pb_utils.InferenceResponse(output_tensors=tensors)

    def _parse(self, request) -> VLMRequest:
        try:
            raw_prompt = scalar(optional_input(pb_utils, request, "text_input"), "text_input")
            if raw_prompt is None:
                raise ValueError("text_input: required")
            prompt = text(raw_prompt, "text_input")
            image_arr = optional_input(pb_utils, request, "image")
            blobs = [] if image_arr is None else list(image_arr.reshape(-1))
            n_slots = self.pre.count_placeholders(prompt)
            if len(blobs) != n_slots:
                raise ValueError(f"image: {len(blobs)} image(s) sent but text_input has {n_slots} "
                                 f"{self.pre.image_token} placeholder(s); send one image per placeholder")
            images = [decode_image(_as_bytes(b), f"image[{i}]") for i, b in enumerate(blobs)]
            raw_params = scalar(optional_input(pb_utils, request, "sampling_parameters"), "sampling_parameters")
            params = SamplingParams.from_json(raw_params)
            flag = lambda name: bool(scalar(optional_input(pb_utils, request, name), name, False))  # noqa: E731
            extras = tuple(out for out in EXTRA_OUTPUTS if flag(f"return_{out}"))
            return VLMRequest(prompt, images, flag("stream"), params, flag("exclude_input_in_output"), extras)
        except ValueError as e:
            raise RequestError(str(e)) from None

    def _abort_llm(self, request_id: str) -> None:
        """Stop the llm stream of a request whose client went away, freeing its KV blocks now."""
        abort = pb_utils.InferenceRequest(model_name="llm", request_id=request_id, requested_output_names=[],
                                          inputs=[pb_utils.Tensor("abort", np.array([True]))])
        for _ in abort.exec(decoupled=True):
            pass

    def _embed_images(self, images) -> np.ndarray:
        pixels = self.pre.pixel_values(images)
        chunks = []
        for start in range(0, len(pixels), self.vision_max_batch):
            req = pb_utils.InferenceRequest(
                model_name="vision_encoder", requested_output_names=["image_embeds"],
                inputs=[pb_utils.Tensor("pixel_values", pixels[start:start + self.vision_max_batch])])
            resp = req.exec()
            if resp.has_error():
                raise RequestError(f"vision_encoder: {resp.error().message()}")
            chunks.append(pb_utils.get_output_tensor_by_name(resp, "image_embeds").as_numpy())
        return np.concatenate(chunks).astype(np.float32, copy=False)


def _as_bytes(value) -> bytes:
    return value if isinstance(value, bytes) else str(value).encode()


def _output(response, name: str) -> np.ndarray | None:
    tensor = pb_utils.get_output_tensor_by_name(response, name)
    return None if tensor is None else tensor.as_numpy()
