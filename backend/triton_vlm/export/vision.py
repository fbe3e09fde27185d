"""The LLaVA vision path (vision tower + multi-modal projector) as a standalone module, and its ONNX export."""
from __future__ import annotations

from pathlib import Path

import torch

INPUT_NAME = "pixel_values"
OUTPUT_NAME = "image_embeds"


class VisionEncoder(torch.nn.Module):
    """pixel_values [B,3,H,W] float32 -> image_embeds [B,N,D]: exactly what HF LLaVA splices into the LM input."""

    def __init__(self, vision_tower: torch.nn.Module, projector: torch.nn.Module,
                 feature_layer: int | list[int], select_strategy: str):
        super().__init__()
        if select_strategy not in ("default", "full"):
            raise ValueError(f"vision_feature_select_strategy must be 'default' or 'full', got {select_strategy!r}")
        self.vision_tower = vision_tower
        self.projector = projector
        self.feature_layers = [feature_layer] if isinstance(feature_layer, int) else list(feature_layer)
        self.drop_cls = select_strategy == "default"

    @classmethod
    def from_checkpoint(cls, checkpoint_dir: str | Path) -> "VisionEncoder":
        from transformers import AutoModelForImageTextToText

        model = AutoModelForImageTextToText.from_pretrained(str(checkpoint_dir), dtype=torch.float32,
                                                            use_safetensors=True)  # never unpickle weights
        cfg = model.config
        encoder = cls(model.model.vision_tower, model.model.multi_modal_projector,
                      cfg.vision_feature_layer, cfg.vision_feature_select_strategy)
        return encoder.eval()

    @property
    def image_size(self) -> int:
        return self.vision_tower.config.image_size

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        hidden = self.vision_tower(pixel_values, output_hidden_states=True, return_dict=True).hidden_states
        selected = [hidden[i][:, 1:] if self.drop_cls else hidden[i] for i in self.feature_layers]
        features = selected[0] if len(selected) == 1 else torch.cat(selected, dim=-1)
        return self.projector(features)


def export_vision_onnx(checkpoint_dir: str | Path, onnx_path: str | Path, opset: int = 18) -> Path:
    """Export VisionEncoder to ONNX with a dynamic batch axis, then check it against torch with onnxruntime."""
    onnx_path = Path(onnx_path)
    onnx_path.parent.mkdir(parents=True, exist_ok=True)
    encoder = VisionEncoder.from_checkpoint(checkpoint_dir)
    size = encoder.image_size
    # Batch 2 for tracing: a batch of 1 can get specialised away even when the axis is marked dynamic.
    example = torch.randn(2, 3, size, size)
    batch = torch.export.Dim("batch", min=1, max=1024)
    with torch.no_grad():
        program = torch.onnx.export(encoder, (example,), dynamo=True, opset_version=opset, verbose=False,
                                    input_names=[INPUT_NAME], output_names=[OUTPUT_NAME],
                                    dynamic_shapes={"pixel_values": {0: batch}})
    # One self-contained file; torch still switches to external data (a side file next to the .onnx) on its own
    # when the weights exceed its 1.5 GB threshold, below protobuf's 2 GB limit.
    program.save(str(onnx_path), external_data=False)
    _verify(encoder, onnx_path, size)
    return onnx_path


def _verify(encoder: VisionEncoder, onnx_path: Path, size: int, atol: float = 1e-4) -> None:
    import numpy as np
    import onnxruntime as ort

    session = ort.InferenceSession(str(onnx_path), providers=["CPUExecutionProvider"])
    generator = torch.Generator().manual_seed(0)
    for batch in (1, 3):
        pixels = torch.randn(batch, 3, size, size, generator=generator)
        with torch.no_grad():
            expected = encoder(pixels).numpy()
        (got,) = session.run([OUTPUT_NAME], {INPUT_NAME: pixels.numpy()})
        if got.shape != expected.shape or not np.allclose(got, expected, atol=atol, rtol=0):
            diff = np.abs(got - expected).max() if got.shape == expected.shape else float("nan")
            raise RuntimeError(f"ONNX export of the vision encoder does not match torch at batch {batch}: "
                               f"shape {got.shape} vs {expected.shape}, max abs diff {diff:.3g} (atol {atol})")
