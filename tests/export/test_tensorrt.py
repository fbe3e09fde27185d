"""TensorRT engine for the vision encoder: built and checked on GPU hosts; a clear error everywhere else."""
import sys

import numpy as np
import pytest

from triton_vlm.export.tensorrt import build_tensorrt_engine


def test_missing_tensorrt_is_a_clear_error(tmp_path, monkeypatch):
    # None in sys.modules makes `import tensorrt` fail, so this runs whether or not TensorRT is installed.
    monkeypatch.setitem(sys.modules, "tensorrt", None)
    with pytest.raises(RuntimeError, match="tensorrt") as info:
        build_tensorrt_engine(tmp_path / "model.onnx", tmp_path / "model.plan", image_size=32, max_batch_size=4)
    assert "--vision-backend onnxruntime" in str(info.value)
    assert not (tmp_path / "model.plan").exists()


def test_engine_matches_onnxruntime(tmp_path):
    trt = pytest.importorskip("tensorrt", reason="TensorRT is not installed (needs an NVIDIA GPU host)")
    torch = pytest.importorskip("torch")
    if not torch.cuda.is_available():
        pytest.skip("TensorRT is installed but torch sees no CUDA device")
    import onnxruntime as ort

    from triton_vlm.checkpoint import make_tiny
    from triton_vlm.export.vision import export_vision_onnx

    ckpt = make_tiny(tmp_path / "ckpt", init_range=0.2)
    onnx_path = export_vision_onnx(ckpt, tmp_path / "model.onnx")
    plan = build_tensorrt_engine(onnx_path, tmp_path / "model.plan", image_size=32, max_batch_size=4)

    engine = trt.Runtime(trt.Logger(trt.Logger.WARNING)).deserialize_cuda_engine(plan.read_bytes())
    context = engine.create_execution_context()
    session = ort.InferenceSession(str(onnx_path), providers=["CPUExecutionProvider"])
    rng = np.random.default_rng(0)
    for batch in (1, 3, 4):
        pixels = rng.standard_normal((batch, 3, 32, 32), dtype=np.float32)
        (expected,) = session.run(["image_embeds"], {"pixel_values": pixels})
        inp = torch.from_numpy(pixels).cuda()
        context.set_input_shape("pixel_values", tuple(inp.shape))
        out = torch.empty(tuple(context.get_tensor_shape("image_embeds")), dtype=torch.float32, device="cuda")
        context.set_tensor_address("pixel_values", inp.data_ptr())
        context.set_tensor_address("image_embeds", out.data_ptr())
        stream = torch.cuda.current_stream()
        assert context.execute_async_v3(stream.cuda_stream)
        stream.synchronize()
        np.testing.assert_allclose(out.cpu().numpy(), expected, atol=2e-2, rtol=0)
