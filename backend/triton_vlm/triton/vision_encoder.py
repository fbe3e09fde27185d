"""Triton Python-backend model `vision_encoder`, running the family's ONNX export with onnxruntime.

- LLaVA: pixel_values [b,3,H,W] FP32 -> image_embeds [b,N,D] FP32; max_batch_size > 0 and dynamic batching.
- Qwen2-VL (config parameter `checkpoint` set): pixel_values [patches, patch_dim] FP32 and image_grid_thw
  [images, 3] INT64 -> image_embeds [tokens, D]; one request per run (its rows are ragged). The graph's other
  inputs (rotary positions, segments, windows) are computed here from image_grid_thw.

The ONNX file is <model dir>/<version>/model.onnx. Optional config parameter `ort_intra_op_threads`
(0 = onnxruntime's default).
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
        self.qwen = None
        if model_parameters(args).get("checkpoint"):
            from ..geometry import ModelGeometry

            self.qwen = ModelGeometry.from_checkpoint(model_parameters(args)["checkpoint"]).vision

    def _check(self, pixels: np.ndarray) -> str | None:
        # A non-integer dim in the ONNX input (a symbolic axis) accepts any size.
        if pixels.ndim == 4 and pixels.shape[0] >= 1 and all(
                not isinstance(want, int) or got == want for got, want in zip(pixels.shape[1:], self.image_shape)):
            return None
        want = ",".join(str(d) for d in ("..", *self.image_shape))
        return f"{INPUT_NAME}: expected [{want}], got [{','.join(str(d) for d in pixels.shape)}]"

    def execute(self, requests):
        if self.qwen is not None:
            return [self._execute_grid(request) for request in requests]
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

    def _execute_grid(self, request):
        from ..families.qwen2_vl import vision_aux

        pixels = pb_utils.get_input_tensor_by_name(request, INPUT_NAME).as_numpy()
        grids = pb_utils.get_input_tensor_by_name(request, "image_grid_thw").as_numpy()
        error = _check_grid(pixels, grids, self.qwen)
        if error:
            return pb_utils.InferenceResponse(output_tensors=[], error=pb_utils.TritonError(error))
        feed = {INPUT_NAME: np.asarray(pixels, dtype=np.float32), **vision_aux(grids, self.qwen)}
        (embeds,) = self.session.run([OUTPUT_NAME], {i.name: feed[i.name] for i in self.session.get_inputs()})
        return pb_utils.InferenceResponse(output_tensors=[pb_utils.Tensor(OUTPUT_NAME, embeds.astype(np.float32))])

    def finalize(self):
        self.session = None


def _check_grid(pixels: np.ndarray, grids: np.ndarray, vision) -> str | None:
    """The patches must be exactly what the grids say, each grid a whole number of merge blocks."""
    if grids.ndim != 2 or grids.shape[1] != 3 or len(grids) == 0 or (grids < 1).any():
        return f"image_grid_thw: expected [images, 3] of positive (t, h, w), got {grids.tolist()}"
    m = vision.merge_size
    if ((grids[:, 1:] % m) != 0).any():
        return f"image_grid_thw: h and w must be multiples of the merge size {m}, got {grids.tolist()}"
    want = int(np.prod(grids, axis=1).sum())
    if pixels.ndim != 2 or pixels.shape != (want, vision.patch_dim):
        return f"{INPUT_NAME}: expected [{want}, {vision.patch_dim}] for image_grid_thw, got {list(pixels.shape)}"
    return None
