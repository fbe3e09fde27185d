"""The Qwen2-VL / Qwen2.5-VL vision tower + merger as a standalone module, and its ONNX export with a dynamic
patch count.

transformers' tower splits attention per image with Python lists (cu_seqlens.tolist()), which an exported
graph cannot hold. Here the same weights run with attention masked by segment ids instead: patches attend
only within their segment (one frame of one image; for Qwen2.5-VL's windowed blocks, one window). The
segment ids, rotary positions and window order come from families/qwen2_vl.vision_aux, computed from
image_grid_thw by whoever calls the encoder.
"""
from __future__ import annotations

from pathlib import Path

import torch
import torch.nn.functional as F

OUTPUT_NAME = "image_embeds"
INPUTS_2 = ("pixel_values", "position_ids", "segment_ids")
INPUTS_25 = (*INPUTS_2, "window_index", "window_segment_ids")


class QwenVisionEncoder(torch.nn.Module):
    """pixel_values [patches, patch_dim] (+ vision_aux) -> merged embeddings [patches / merge**2, hidden]."""

    def __init__(self, visual: torch.nn.Module, windowed: bool):
        super().__init__()
        self.visual = visual
        self.windowed = windowed
        self.unit = visual.spatial_merge_size ** 2
        # Qwen2.5-VL: these blocks attend over the whole frame, the others within windows.
        self.full_blocks = set(getattr(visual, "fullatt_block_indexes", None) or range(len(visual.blocks)))

    @classmethod
    def from_checkpoint(cls, checkpoint_dir: str | Path) -> "QwenVisionEncoder":
        from transformers import AutoModelForImageTextToText

        model = AutoModelForImageTextToText.from_pretrained(str(checkpoint_dir), dtype=torch.float32,
                                                            use_safetensors=True)
        return cls(model.model.visual, windowed=model.config.model_type == "qwen2_5_vl").eval()

    @property
    def input_names(self) -> tuple[str, ...]:
        return INPUTS_25 if self.windowed else INPUTS_2

    def forward(self, pixel_values, position_ids, segment_ids, window_index=None, window_segment_ids=None):
        visual = self.visual
        x = visual.patch_embed(pixel_values)
        cos, sin = visual.rotary_pos_emb(x, position_ids)
        full = _segment_bias(segment_ids, x.dtype)
        windowed = full
        if self.windowed:  # reorder merge blocks window by window, as transformers does
            x, cos, sin = (self._by_window(a, window_index) for a in (x, cos, sin))
            windowed = _segment_bias(window_segment_ids, x.dtype)
        for i, block in enumerate(visual.blocks):
            bias = full if i in self.full_blocks else windowed
            x = x + _attention(block.attn, block.norm1(x), cos, sin, bias)
            x = x + block.mlp(block.norm2(x))
        merged = visual.merger(x)
        if self.windowed:
            merged = merged[torch.argsort(window_index)]
        return merged

    def _by_window(self, a: torch.Tensor, window_index: torch.Tensor) -> torch.Tensor:
        n = a.shape[0]
        return a.reshape(n // self.unit, self.unit, -1)[window_index].reshape(n, -1)


def _segment_bias(segments: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    same = segments[:, None] == segments[None, :]
    return torch.zeros(same.shape, dtype=dtype).masked_fill(~same, float("-inf"))


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


def _attention(attn, x, cos, sin, bias):
    n = x.shape[0]
    q, k, v = attn.qkv(x).reshape(n, 3, attn.num_heads, -1).permute(1, 2, 0, 3).unbind(0)  # [heads, n, d] each
    cos, sin = cos[None], sin[None]
    q, k = q * cos + _rotate_half(q) * sin, k * cos + _rotate_half(k) * sin
    out = F.scaled_dot_product_attention(q[None], k[None], v[None], attn_mask=bias, scale=attn.scaling)[0]
    return attn.proj(out.transpose(0, 1).reshape(n, -1))


def example_inputs(encoder: QwenVisionEncoder, grids: list[tuple[int, int, int]], vision, seed=0):
    """Random patches for `grids` plus their vision_aux, as torch tensors in input order."""
    import numpy as np

    from ..families.qwen2_vl import vision_aux

    aux = vision_aux(np.array(grids), vision)
    patches = sum(t * h * w for t, h, w in grids)
    pixels = torch.randn(patches, vision.patch_dim, generator=torch.Generator().manual_seed(seed))
    return (pixels, *(torch.from_numpy(aux[name]) for name in encoder.input_names[1:]))


def export_qwen_vision_onnx(checkpoint_dir: str | Path, onnx_path: str | Path, opset: int = 18) -> Path:
    """Export with a dynamic patch count, then check onnxruntime against torch for two image sizes in one batch."""
    from ..geometry import ModelGeometry

    onnx_path = Path(onnx_path)
    onnx_path.parent.mkdir(parents=True, exist_ok=True)
    encoder = QwenVisionEncoder.from_checkpoint(checkpoint_dir)
    geometry = ModelGeometry.from_checkpoint(checkpoint_dir)
    m = geometry.vision.merge_size
    example = example_inputs(encoder, [(1, 2 * m, 3 * m), (1, 4 * m, 2 * m)], geometry.vision)
    patches = torch.export.Dim("patches", min=m * m, max=1 << 20)
    blocks = torch.export.Dim("blocks", min=1, max=(1 << 20) // (m * m))
    dims = {"pixel_values": {0: patches}, "position_ids": {0: patches}, "segment_ids": {0: patches}}
    if encoder.windowed:
        dims.update(window_index={0: blocks}, window_segment_ids={0: patches})
    with torch.no_grad():
        program = torch.onnx.export(encoder, example, dynamo=True, opset_version=opset, verbose=False,
                                    input_names=list(encoder.input_names), output_names=[OUTPUT_NAME],
                                    dynamic_shapes=dims)
    program.save(str(onnx_path), external_data=False)
    verify(encoder, onnx_path, geometry.vision)
    return onnx_path


def verify(encoder: QwenVisionEncoder, onnx_path: Path, vision, atol: float = 1e-4) -> None:
    import numpy as np
    import onnxruntime as ort

    session = ort.InferenceSession(str(onnx_path), providers=["CPUExecutionProvider"])
    m = vision.merge_size
    for grids in ([(1, 6 * m, 2 * m), (1, 3 * m, 5 * m)], [(1, 2 * m, 2 * m)]):
        inputs = example_inputs(encoder, grids, vision, seed=1)
        with torch.no_grad():
            expected = encoder(*inputs).numpy()
        (got,) = session.run([OUTPUT_NAME], {n: t.numpy() for n, t in zip(encoder.input_names, inputs)})
        if got.shape != expected.shape or not np.allclose(got, expected, atol=atol, rtol=0):
            diff = np.abs(got - expected).max() if got.shape == expected.shape else float("nan")
            raise RuntimeError(f"ONNX export of the vision encoder does not match torch for grids {grids}: shape "
                               f"{got.shape} vs {expected.shape}, max abs diff {diff:.3g} (atol {atol})")
