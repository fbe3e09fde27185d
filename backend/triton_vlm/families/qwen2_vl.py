"""The Qwen2-VL / Qwen2.5-VL family: native-resolution images, a variable number of tokens per image, M-RoPE.

- The image processor (Qwen2VLImageProcessor, PIL path: no torchvision) resizes each image within
  min/max_pixels to a multiple of patch_size * merge_size and flattens it into patches; image_grid_thw
  gives each image's (t, h, w) in patches. Each image placeholder becomes t * h * w / merge_size**2 tokens.
- Positions are 3-D (temporal, height, width): text tokens share one index in all three rows; an image's
  tokens take (start + t * interval, start + row, start + column) on the merged grid; text after it
  continues from start + max(h, w) / merge_size (transformers' get_rope_index). Generated tokens follow at
  index + delta, delta = max prompt position + 1 - prompt length (HF's rope_deltas).
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ..geometry import ModelGeometry, eos_ids, read_json, text_geometry

MODEL_TYPES = ("qwen2_vl", "qwen2_5_vl")


@dataclass(frozen=True)
class QwenVisionGeometry:
    version: str  # "2" or "2.5"
    patch_size: int
    temporal_patch_size: int
    merge_size: int
    in_channels: int
    tokens_per_second: float  # Qwen2.5-VL: temporal positions per second of video

    @property
    def patch_dim(self) -> int:
        """Width of one row of pixel_values: a temporal_patch_size x patch_size x patch_size x channels cube."""
        return self.in_channels * self.temporal_patch_size * self.patch_size ** 2


def geometry(path: Path, cfg: dict) -> ModelGeometry:
    # transformers 5 nests the decoder in text_config; older Hub checkpoints keep it at the top level.
    text_cfg = cfg.get("text_config") or cfg
    try:
        text = text_geometry(text_cfg, cfg, model_type="qwen2")
    except KeyError as e:
        raise ValueError(f"{path / 'config.json'}: lacks {e.args[0]!r}") from None
    if sum(text.mrope_section) != text.head_dim // 2:
        raise ValueError(f"{path / 'config.json'}: mrope_section {list(text.mrope_section)} must sum to head_dim / 2 "
                         f"= {text.head_dim // 2}")
    v = cfg.get("vision_config") or {}
    version = "2.5" if cfg["model_type"] == "qwen2_5_vl" else "2"
    vision = QwenVisionGeometry(version, v.get("patch_size", 14), v.get("temporal_patch_size", 2),
                                v.get("spatial_merge_size", 2), v.get("in_channels", 3), v.get("tokens_per_second", 2))
    return ModelGeometry(
        text=text, vision=vision, image_token="<|image_pad|>", image_token_id=cfg.get("image_token_id", 151655),
        vision_feature_layer=-1, vision_feature_select_strategy="full", eos_token_ids=eos_ids(path, text_cfg),
        dtype=cfg.get("dtype") or cfg.get("torch_dtype") or text_cfg.get("dtype") or "float32", family="qwen2_vl",
        video_token="<|video_pad|>", video_token_id=cfg.get("video_token_id", 151656))


def image_processor(checkpoint: str | Path):
    from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil

    return Qwen2VLImageProcessorPil.from_pretrained(str(checkpoint))


def chat_template(checkpoint: str | Path) -> str | None:
    """chat_template.jinja (transformers 5) or chat_template.json (older Hub layout)."""
    path = Path(checkpoint)
    if (path / "chat_template.jinja").exists():
        return (path / "chat_template.jinja").read_text()
    if (path / "chat_template.json").exists():
        return read_json(path / "chat_template.json").get("chat_template")
    return None


class VisionInputs:
    """One request's images (or one video's frame groups) as vision_encoder inputs."""

    def __init__(self, pixel_values: np.ndarray, grid_thw: np.ndarray, merge_size: int):
        self.pixel_values = pixel_values  # [patches, patch_dim] float32
        self.grid_thw = grid_thw  # [images, 3] int64
        self.tokens = [int(t * h * w) // merge_size ** 2 for t, h, w in grid_thw]  # tokens per image


def vision_inputs(processor, images: list, merge_size: int) -> VisionInputs:
    out = processor(images=images, return_tensors="np")
    return VisionInputs(np.ascontiguousarray(out["pixel_values"], dtype=np.float32),
                        np.asarray(out["image_grid_thw"], dtype=np.int64), merge_size)


def expand_placeholders(text: str, token: str, counts: list[int]) -> str:
    """The i-th placeholder becomes counts[i] copies of it (as Qwen2VLProcessor does)."""
    pieces = text.split(token)
    if len(pieces) - 1 != len(counts):
        raise ValueError(f"{len(pieces) - 1} {token} placeholder(s) for {len(counts)} image(s)")
    return "".join(p + token * n for p, n in zip(pieces, counts)) + pieces[-1]


def positions(input_ids: list[int], spans: list[tuple[int, tuple[int, int, int], float]], merge_size: int
              ) -> np.ndarray:
    """M-RoPE positions [3, len(input_ids)] as transformers' get_rope_index computes them.

    spans: per image or video, in prompt order: (its first token's index, its grid (t, h, w) in patches,
    its temporal interval: 1 for Qwen2-VL, tokens_per_second * seconds per grid step for Qwen2.5-VL video,
    anything for a still image, whose t is 1).
    """
    out = np.empty((3, len(input_ids)), dtype=np.int64)
    pos = at = 0
    for first, (t, h, w), interval in spans:
        n_text = first - at
        out[:, at:first] = np.arange(pos, pos + n_text)
        pos += n_text
        gh, gw = h // merge_size, w // merge_size
        tt, hh, ww = np.meshgrid((np.arange(t) * interval).astype(np.int64), np.arange(gh), np.arange(gw),
                                 indexing="ij")
        n = t * gh * gw
        out[:, first:first + n] = np.stack([tt.reshape(-1), hh.reshape(-1), ww.reshape(-1)]) + pos
        pos += max(h, w) // merge_size
        at = first + n
    out[:, at:] = np.arange(pos, pos + len(input_ids) - at)
    return out


def span_starts(input_ids: list[int], token_ids: tuple[int, ...], counts: list[int]) -> list[int]:
    """Index of each image's (or video's) first placeholder token: each takes the next counts[i] placeholders."""
    at = [i for i, t in enumerate(input_ids) if t in token_ids]
    if len(at) != sum(counts):
        raise ValueError(f"input_ids: {len(at)} placeholder tokens for {sum(counts)} image tokens")
    return [at[k] for k in np.cumsum([0, *counts[:-1]])] if counts else []


def vision_aux(grid_thw: np.ndarray, vision: QwenVisionGeometry, window_size: int = 0) -> dict[str, np.ndarray]:
    """What the tower needs besides the patches, computed from the grids (transformers computes it inside
    forward, in Python loops that an ONNX graph cannot hold):
    - position_ids [patches, 2]: each patch's (row, column), patches ordered merge block by merge block;
    - segment_ids [patches]: full attention stays within one frame of one image;
    Qwen2.5-VL (window_size > 0) adds window attention:
    - window_index [patches / merge**2]: merge blocks reordered window by window;
    - window_segment_ids [patches]: which window each patch (in window order) attends within.
    """
    m = vision.merge_size
    positions, segments, windows, window_segments = [], [], [], []
    frames = blocks = n_windows = 0
    for t, h, w in np.asarray(grid_thw, dtype=np.int64).tolist():
        rows, cols = np.meshgrid(np.arange(h), np.arange(w), indexing="ij")
        block_order = lambda a: a.reshape(h // m, m, w // m, m).transpose(0, 2, 1, 3).reshape(-1)  # noqa: E731
        positions.append(np.tile(np.stack([block_order(rows), block_order(cols)], axis=-1), (t, 1)))
        segments.append(np.repeat(np.arange(frames, frames + t), h * w))
        frames += t
        if window_size:
            order, sizes = _windows(t, h // m, w // m, window_size // m // vision.patch_size)
            windows.append(order + blocks)
            window_segments.append(np.repeat(np.arange(n_windows, n_windows + len(sizes)), np.asarray(sizes) * m * m))
            n_windows += len(sizes)
        blocks += t * (h // m) * (w // m)
    aux = {"position_ids": np.concatenate(positions).astype(np.int64),
           "segment_ids": np.concatenate(segments).astype(np.int64)}
    if window_size:
        aux["window_index"] = np.concatenate(windows).astype(np.int64)
        aux["window_segment_ids"] = np.concatenate(window_segments).astype(np.int64)
    return aux


def _windows(t: int, gh: int, gw: int, size: int) -> tuple[np.ndarray, list[int]]:
    """Merge blocks of one image in window order (windows of size x size blocks, row-major, per frame), and
    each non-empty window's block count."""
    index = np.arange(t * gh * gw).reshape(t, gh, gw)
    order, sizes = [], []
    for f in range(t):
        for r in range(0, gh, size):
            for c in range(0, gw, size):
                window = index[f, r:r + size, c:c + size].reshape(-1)
                order.append(window)
                sizes.append(len(window))
    return np.concatenate(order), sizes
