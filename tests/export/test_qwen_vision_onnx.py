"""The Qwen2-VL / Qwen2.5-VL tower + merger: our exportable module equals transformers' tower, and its ONNX
export (dynamic patch count) equals torch within 1e-4 for images of two sizes in one batch."""
from __future__ import annotations

import numpy as np
import onnxruntime as ort
import pytest
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


def test_tensorrt_variant_is_configured_for_the_graphs_inputs(qwen_checkpoint, hf_qwen, tmp_path, monkeypatch):
    """Not executable here (no TensorRT, no GPU): the plan's Triton config names exactly the exported graph's
    inputs, what vlm sends a plan feeds that graph to HF's output, and the profile spans the patch count."""
    import sys

    from google.protobuf import text_format
    from tritonclient.grpc import model_config_pb2

    from triton_vlm.export.tensorrt import patch_profile
    from triton_vlm.families import qwen2_vl
    from triton_vlm.repository import BuildOptions, build_repository, vision_config

    pre = Preprocessor(qwen_checkpoint)
    g = pre.geometry
    config = text_format.Parse(vision_config(g, BuildOptions(vision_backend="tensorrt")), model_config_pb2.ModelConfig())
    assert config.platform == "tensorrt_plan" and config.max_batch_size == 0
    onnx_path = export_qwen_vision_onnx(qwen_checkpoint, tmp_path / "model.onnx")
    session = ort.InferenceSession(str(onnx_path), providers=["CPUExecutionProvider"])
    assert [(i.name, list(i.dims)) for i in config.input] == \
        [(i.name, [-1, *i.shape[1:]]) for i in session.get_inputs()]

    request = pre.vision_request([rng_pil(0, 90, 40), rng_pil(1, 50, 120)])
    (feed,) = qwen2_vl.vision_batches(g, request.inputs, 8, "tensorrt")
    assert set(feed) == {i.name for i in config.input}
    (got,) = session.run([OUTPUT_NAME], feed)
    np.testing.assert_allclose(got, hf_qwen.image_embeds(hf_qwen.inputs("", [rng_pil(0, 90, 40), rng_pil(1, 50, 120)]))
                               .numpy(), atol=1e-4, rtol=0)

    profile = patch_profile({"pixel_values": (96,), "window_index": ()}, 4, 8 * 1024, 1024)
    assert profile == {"pixel_values": ((4, 96), (1024, 96), (8192, 96)), "window_index": ((1,), (256,), (2048,))}
    monkeypatch.setitem(sys.modules, "tensorrt", None)
    with pytest.raises(RuntimeError, match="--vision-backend onnxruntime"):
        build_repository(qwen_checkpoint, tmp_path / "repo", BuildOptions(vision_backend="tensorrt"))
