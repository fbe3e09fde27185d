"""Triton adapter for the `vlm` entry point: a decoupled BLS model.

Each request runs on a worker thread: decode and preprocess its images, embed them with one
`vision_encoder` call, expand the placeholders, then stream token ids from `llm` and turn them
into text deltas. Inputs mirror Triton's vLLM backend so its clients work unchanged.
"""
from __future__ import annotations

import uuid
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import triton_python_backend_utils as pb_utils

from ..detokenizer import Detokenizer
from ..engine.sampling_params import SamplingParams
from ..preprocess import Preprocessor, decode_image
from .params import error_response, model_parameters, optional_input, scalar, text

FINAL = pb_utils.TRITONSERVER_RESPONSE_COMPLETE_FINAL


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
        prompt, images, stream, params, exclude_input = self._parse(request)
        embeds = self._embed_images(images) if images else None
        input_ids = np.asarray(self.pre.input_ids(prompt), dtype=np.int64)
        inputs = [pb_utils.Tensor("input_ids", input_ids),
                  pb_utils.Tensor("sampling_parameters", np.array([params.to_json().encode()], dtype=object))]
        if embeds is not None:
            inputs.append(pb_utils.Tensor("image_embeds", embeds.reshape(-1, embeds.shape[-1])))
        request_id = uuid.uuid4().hex
        llm_request = pb_utils.InferenceRequest(model_name="llm", inputs=inputs, request_id=request_id,
                                                requested_output_names=["output_ids", "finish_reason"])
        detok = Detokenizer(self.pre.tokenizer)
        pieces = []
        responses = llm_request.exec(decoupled=True)
        for response in responses:
            if response.has_error():
                raise RequestError(f"llm: {response.error().message()}")
            ids = pb_utils.get_output_tensor_by_name(response, "output_ids")
            delta = detok.add(ids.as_numpy().tolist()) if ids is not None else ""
            if not stream:
                pieces.append(delta)
            elif delta:
                sender.send(_text_response(delta))
            if sender.is_cancelled():
                self._abort_llm(request_id)
                return
        tail = detok.flush()
        if stream:
            sender.send(_text_response(tail) if tail else None, flags=FINAL)
            return
        body = "".join(pieces) + tail
        # Like the vLLM backend: a non-streamed answer repeats the prompt unless told not to.
        sender.send(_text_response(body if exclude_input else prompt + body), flags=FINAL)

    def _parse(self, request):
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
            stream = bool(scalar(optional_input(pb_utils, request, "stream"), "stream", False))
            exclude = bool(scalar(optional_input(pb_utils, request, "exclude_input_in_output"),
                                  "exclude_input_in_output", False))
            raw_params = scalar(optional_input(pb_utils, request, "sampling_parameters"), "sampling_parameters")
            params = SamplingParams.from_json(raw_params)
        except ValueError as e:
            raise RequestError(str(e)) from None
        return prompt, images, stream, params, exclude

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


def _text_response(text: str):
    return pb_utils.InferenceResponse(output_tensors=[pb_utils.Tensor("text_output", np.array([text.encode()], dtype=object))])
