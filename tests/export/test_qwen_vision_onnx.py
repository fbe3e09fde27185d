"""The Qwen2-VL / Qwen2.5-VL tower + merger: our exportable module equals transformers' tower, and its ONNX
export (dynamic patch count) equals torch within 1e-4 for images of two sizes in one batch."""
from __future__ import annotations

import numpy as np
import onnxruntime as ort
import torch
from helpers import rng_pil

from triton_vlm.export.qwen2_vl_vision import OUTPUT_NAME, QwenVisionEncoder, export_qwen_vision_onnx
from triton_vlm.families.qwen2_vl import vision_aux
from triton_vlm.preprocess import Preprocessor


def test_module_and_onnx_equal_transformers(qwen_checkpoint, hf_qwen, tmp_path):
    pre = Preprocessor(qwen_checkpoint)
    # portrait, landscape and a square large enough for several Qwen2.5-VL windows
    request = pre.vision_request([rng_pil(0, 90, 40), rng_pil(1, 50, 120), rng_pil(2, 200, 200)])
    pixels, grids = request.inputs["pixel_values"], request.inputs["image_grid_thw"]
    assert len({tuple(g) for g in grids.tolist()}) == 3
    aux = vision_aux(grids, pre.geometry.vision)
    encoder = QwenVisionEncoder.from_checkpoint(qwen_checkpoint)
    with torch.no_grad():
        expected = torch.cat(hf_qwen.model.model.get_image_features(
            pixel_values=torch.from_numpy(pixels), image_grid_thw=torch.from_numpy(grids)).pooler_output).numpy()
        ours = encoder(torch.from_numpy(pixels), *(torch.from_numpy(aux[n]) for n in encoder.input_names[1:])).numpy()
    assert ours.shape == expected.shape == (sum(request.tokens), pre.geometry.text.hidden_size)
    np.testing.assert_allclose(ours, expected, atol=1e-4, rtol=0)

    onnx_path = export_qwen_vision_onnx(qwen_checkpoint, tmp_path / "model.onnx")
    session = ort.InferenceSession(str(onnx_path), providers=["CPUExecutionProvider"])
    feed = {"pixel_values": pixels, **aux}
    (got,) = session.run([OUTPUT_NAME], {i.name: feed[i.name] for i in session.get_inputs()})
    np.testing.assert_allclose(got, ours, atol=1e-4, rtol=0)
    # each image's rows alone equal its rows in the batch: no mixing across images
    first = request.tokens[0]
    alone = {"pixel_values": pixels[:int(np.prod(grids[0]))], **vision_aux(grids[:1], pre.geometry.vision)}
    (single,) = session.run([OUTPUT_NAME], {i.name: alone[i.name] for i in session.get_inputs()})
    np.testing.assert_allclose(single, got[:first], atol=1e-5, rtol=0)
