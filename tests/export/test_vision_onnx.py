"""VisionEncoder matches HF LLaVA's image features; its ONNX export and the Triton model serve the same numbers."""
import json
import shutil
import sys
import types

import numpy as np
import pytest
import torch

from triton_vlm.checkpoint import make_tiny
from triton_vlm.export.vision import VisionEncoder, export_vision_onnx

GEOMETRIES = {
    # int layer, CLS dropped
    "default": dict(),
    # list of layers concatenated, CLS kept, a different patch grid
    "full-multilayer": dict(vision_feature_layer=[-2, -1], strategy="full", image_size=48, patch_size=16),
}


@pytest.fixture(scope="module", params=list(GEOMETRIES))
def exported(request, tmp_path_factory):
    root = tmp_path_factory.mktemp(request.param)
    ckpt = make_tiny(root / "ckpt", init_range=0.2, **GEOMETRIES[request.param])
    onnx_path = export_vision_onnx(ckpt, root / "onnx" / "model.onnx")
    return ckpt, onnx_path, VisionEncoder.from_checkpoint(ckpt)


def _pixels(batch, size, seed=1):
    return torch.randn(batch, 3, size, size, generator=torch.Generator().manual_seed(seed))


def test_matches_hf_image_features(exported):
    from transformers import AutoModelForImageTextToText

    ckpt, _, encoder = exported
    model = AutoModelForImageTextToText.from_pretrained(str(ckpt), dtype=torch.float32).eval()
    pixels = _pixels(3, encoder.image_size)
    with torch.no_grad():
        reference = model.model.get_image_features(pixel_values=pixels).pooler_output
        got = encoder(pixels)
    cfg = model.config
    cls = 1 if cfg.vision_feature_select_strategy == "full" else 0
    assert got.shape == (3, cfg.image_seq_length, cfg.text_config.hidden_size)
    assert got.shape[1] == (cfg.vision_config.image_size // cfg.vision_config.patch_size) ** 2 + cls
    assert len(reference) == 3
    torch.testing.assert_close(got, torch.stack(list(reference)), atol=1e-5, rtol=0)
    assert got.std() > 1e-2  # the random weights give features that are not all alike


@pytest.mark.parametrize("batch", [1, 3])
def test_onnx_matches_torch(exported, batch):
    import onnx
    import onnxruntime as ort

    _, onnx_path, encoder = exported
    assert [p.name for p in onnx_path.parent.iterdir()] == ["model.onnx"]  # self-contained, no external data
    graph = onnx.load(str(onnx_path), load_external_data=False).graph
    assert [i.name for i in graph.input] == ["pixel_values"] and [o.name for o in graph.output] == ["image_embeds"]

    session = ort.InferenceSession(str(onnx_path), providers=["CPUExecutionProvider"])
    pixels = _pixels(batch, encoder.image_size, seed=batch)
    with torch.no_grad():
        expected = encoder(pixels).numpy()
    (got,) = session.run(["image_embeds"], {"pixel_values": pixels.numpy()})
    assert got.dtype == np.float32 and got.shape == expected.shape
    np.testing.assert_allclose(got, expected, atol=1e-4, rtol=0)


class _FakePbUtils(types.ModuleType):
    """Just enough of triton_python_backend_utils to drive TritonPythonModel outside Triton."""

    class Tensor:
        def __init__(self, name, array):
            self._name, self._array = name, array

        def name(self):
            return self._name

        def as_numpy(self):
            return self._array

    class TritonError(Exception):
        def message(self):
            return str(self)

    class InferenceResponse:
        def __init__(self, output_tensors=(), error=None):
            self.output_tensors, self.error = list(output_tensors), error

    class InferenceRequest:
        def __init__(self, inputs):
            self.inputs = inputs

    @staticmethod
    def get_input_tensor_by_name(request, name):
        return next((t for t in request.inputs if t.name() == name), None)


def test_triton_model_batches_and_rejects_bad_shapes(exported, tmp_path, monkeypatch):
    _, onnx_path, encoder = exported
    pb = _FakePbUtils("triton_python_backend_utils")
    monkeypatch.setitem(sys.modules, "triton_python_backend_utils", pb)
    monkeypatch.delitem(sys.modules, "triton_vlm.triton.vision_encoder", raising=False)
    from triton_vlm.triton.vision_encoder import TritonPythonModel

    (tmp_path / "1").mkdir()
    shutil.copy(onnx_path, tmp_path / "1" / "model.onnx")
    config = {"name": "vision_encoder", "max_batch_size": 8,
              "parameters": {"ort_intra_op_threads": {"string_value": "1"}}}
    model = TritonPythonModel()
    model.initialize({"model_config": json.dumps(config), "model_repository": str(tmp_path), "model_version": "1"})

    size = encoder.image_size
    good = [_pixels(2, size, seed=5).numpy(), _pixels(1, size, seed=6).numpy()]
    bad = np.zeros((1, 3, size + 1, size), np.float32)
    inputs = [good[0], bad, good[1]]
    responses = model.execute([pb.InferenceRequest([pb.Tensor("pixel_values", x)]) for x in inputs])

    assert len(responses) == 3
    assert responses[1].error is not None and not responses[1].output_tensors
    assert f"got [1,3,{size + 1},{size}]" in responses[1].error.message()
    for response, pixels in zip([responses[0], responses[2]], good):
        assert response.error is None
        (out,) = response.output_tensors
        assert out.name() == "image_embeds" and out.as_numpy().dtype == np.float32
        with torch.no_grad():
            expected = encoder(torch.from_numpy(pixels)).numpy()
        np.testing.assert_allclose(out.as_numpy(), expected, atol=1e-4, rtol=0)


def test_export_check_catches_a_mismatch(exported):
    import copy

    from triton_vlm.export.vision import _verify

    _, onnx_path, encoder = exported
    drifted = copy.deepcopy(encoder)
    with torch.no_grad():
        next(drifted.projector.parameters()).add_(0.1)
    with pytest.raises(RuntimeError, match="does not match torch at batch 1"):
        _verify(drifted, onnx_path, encoder.image_size)
