"""Triton Python-backend model `vision_encoder`: pixel_values [b,3,H,W] FP32 -> image_embeds [b,N,D] FP32 via onnxruntime.

Expects a config with max_batch_size > 0 and dynamic batching; the ONNX file is <model dir>/<version>/model.onnx.
Optional config parameter `ort_intra_op_threads` (0 = onnxruntime's default).
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import onnxruntime as ort
import triton_python_backend_utils as pb_utils

from ..export.vision import INPUT_NAME, OUTPUT_NAME
from .params import model_parameters


class TritonPythonModel:
    def initialize(self, args):
        threads = int(model_parameters(args).get("ort_intra_op_threads") or 0)
        options = ort.SessionOptions()
        options.intra_op_num_threads = threads
        # Idle spinning would steal cores from the llm stub between image batches.
        options.add_session_config_entry("session.intra_op.allow_spinning", "0")
        providers = ["CPUExecutionProvider"]
        if "CUDAExecutionProvider" in ort.get_available_providers():
            # A KIND_GPU instance (build --gpus N) runs on the GPU Triton gave it.
            gpu = int(args["model_instance_device_id"]) if args.get("model_instance_kind") == "GPU" else 0
            providers.insert(0, ("CUDAExecutionProvider", {"device_id": gpu}))
        path = Path(args["model_repository"]) / str(args["model_version"]) / "model.onnx"
        if not path.is_file():
            raise FileNotFoundError(f"{path}: missing; rebuild the repository with `triton-vlm build`")
        try:
            self.session = ort.InferenceSession(str(path), sess_options=options, providers=providers)
        except Exception as e:  # onnxruntime raises its own exception types for unreadable models
            raise RuntimeError(f"{path}: not a loadable ONNX model ({e})") from None
        # [batch, 3, H, W]; H and W are fixed by the export, the batch axis is symbolic.
        self.image_shape = tuple(self.session.get_inputs()[0].shape[1:])

    def _check(self, pixels: np.ndarray) -> str | None:
        # A non-integer dim in the ONNX input (a symbolic axis) accepts any size.
        if pixels.ndim == 4 and pixels.shape[0] >= 1 and all(
                not isinstance(want, int) or got == want for got, want in zip(pixels.shape[1:], self.image_shape)):
            return None
        want = ",".join(str(d) for d in ("..", *self.image_shape))
        return f"{INPUT_NAME}: expected [{want}], got [{','.join(str(d) for d in pixels.shape)}]"

    def execute(self, requests):
        responses = [None] * len(requests)
        valid, arrays = [], []
        for i, request in enumerate(requests):
            pixels = pb_utils.get_input_tensor_by_name(request, INPUT_NAME).as_numpy()
            error = self._check(pixels)
            if error:
                responses[i] = pb_utils.InferenceResponse(output_tensors=[], error=pb_utils.TritonError(error))
            else:
                valid.append(i)
                arrays.append(np.asarray(pixels, dtype=np.float32))
        if arrays:
            # One ORT call for the whole dynamic batch, then hand each request back its own slice.
            (embeds,) = self.session.run([OUTPUT_NAME], {INPUT_NAME: np.concatenate(arrays)})
            bounds = np.cumsum([len(a) for a in arrays])[:-1]
            for i, part in zip(valid, np.split(embeds, bounds)):
                tensor = pb_utils.Tensor(OUTPUT_NAME, np.ascontiguousarray(part, dtype=np.float32))
                responses[i] = pb_utils.InferenceResponse(output_tensors=[tensor])
        return responses

    def finalize(self):
        self.session = None
