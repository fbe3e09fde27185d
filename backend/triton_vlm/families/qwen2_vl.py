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
VISION_BACKENDS = ("onnxruntime", "tensorrt")
NATIVE_VIDEO = True  # a video is one <|video_pad|> run: frames grouped by temporal_patch_size
FIXED_IMAGE_TOKENS = False  # an image's rows (and positions) follow its size: vlm decodes every image
VIDEO_FPS = 2.0  # sampled video frames are taken as this far apart in time (Qwen2.5-VL's temporal positions)


@dataclass(frozen=True)
class QwenVisionGeometry:
    version: str  # "2" or "2.5"
    patch_size: int
    temporal_patch_size: int
    merge_size: int
    in_channels: int
    tokens_per_second: float  # Qwen2.5-VL: temporal positions per second of video
    window_size: int  # Qwen2.5-VL: window attention over window_size x window_size pixels; 0: none (Qwen2-VL)

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
                                v.get("spatial_merge_size", 2), v.get("in_channels", 3), v.get("tokens_per_second", 2),
                                v.get("window_size", 112) if version == "2.5" else 0)
    return ModelGeometry(
        text=text, vision=vision, image_token="<|image_pad|>", image_token_id=cfg.get("image_token_id", 151655),
        vision_feature_layer=-1, vision_feature_select_strategy="full", eos_token_ids=eos_ids(path, text_cfg),
        dtype=cfg.get("dtype") or cfg.get("torch_dtype") or text_cfg.get("dtype") or "float32", family="qwen2_vl",
        video_token="<|video_pad|>", video_token_id=cfg.get("video_token_id", 151656))


def chat_template(checkpoint: str | Path) -> str | None:
    """chat_template.jinja (transformers 5) or chat_template.json (older Hub layout)."""
    path = Path(checkpoint)
    if (path / "chat_template.jinja").exists():
        return (path / "chat_template.jinja").read_text()
    if (path / "chat_template.json").exists():
        return read_json(path / "chat_template.json").get("chat_template")
    return None


def load_image_processor(checkpoint: str | Path):
    """Qwen2VLImageProcessor's PIL path: the default one needs torchvision."""
    from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil

    return Qwen2VLImageProcessorPil.from_pretrained(str(checkpoint))


def load_chat(checkpoint: str | Path, tokenizer):
    """The chat template rendered by the tokenizer (AutoProcessor would want torchvision); None without one."""
    template = chat_template(checkpoint)
    if template is None:
        return None
    return lambda messages: tokenizer.apply_chat_template(messages, chat_template=template,
                                                          add_generation_prompt=True, tokenize=False)


def vision_request(image_processor, geometry: ModelGeometry, items: list, fields: list[str], max_pixels: int):
    """vision_encoder inputs for images and native videos (a list of frames) in prompt order: pixel_values
    [patches, patch_dim] and image_grid_thw [items, 3]; also tokens per item and each one's temporal step.
    The processor bounds every image by its own max_pixels, so no input can blow up its size."""
    from ..preprocess import VisionRequest

    v = geometry.vision
    patches, grids, intervals = [], [], []
    for item in items:
        rows, grid = _video_patches(image_processor, item, v) if isinstance(item, list) else \
            _image_patches(image_processor, item)
        patches.append(rows)
        grids.append(grid)
        # Qwen2.5-VL spaces a video's temporal positions by seconds (frames assumed VIDEO_FPS apart);
        # Qwen2-VL by one per temporal step. A still image has one step, so its interval never counts.
        step = v.tokens_per_second * v.temporal_patch_size / VIDEO_FPS if v.version == "2.5" else 1
        intervals.append(step if isinstance(item, list) else 1)
    grids = np.asarray(grids, dtype=np.int64)
    inputs = {"pixel_values": np.ascontiguousarray(np.concatenate(patches), dtype=np.float32),
              "image_grid_thw": grids}
    return VisionRequest(inputs, [int(t * h * w) // v.merge_size ** 2 for t, h, w in grids], intervals)


def _image_patches(image_processor, image) -> tuple[np.ndarray, list[int]]:
    out = image_processor(images=[image], return_tensors="np")
    return out["pixel_values"], out["image_grid_thw"][0].tolist()


def _video_patches(image_processor, frames: list, v: QwenVisionGeometry) -> tuple[np.ndarray, list[int]]:
    """Frames resized and normalised as images, then each temporal_patch_size consecutive frames (the last
    repeated to fill the final group) stacked into one cube per patch, as Qwen2-VL's video processor lays out
    pixel_values_videos: rows by (group, merge block, patch), features (channel, frame, y, x)."""
    per_frame = []
    for frame in frames:
        rows, (_, h, w) = _image_patches(image_processor, frame)
        # An image's rows hold the frame temporal_patch_size times over: keep one copy.
        per_frame.append(rows.reshape(len(rows), v.in_channels, v.temporal_patch_size, -1)[:, :, 0])
    if len({f.shape for f in per_frame}) != 1:
        raise ValueError("video: frames of different sizes")
    per_frame += [per_frame[-1]] * (-len(per_frame) % v.temporal_patch_size)
    groups = [np.stack(per_frame[i:i + v.temporal_patch_size], axis=2)
              for i in range(0, len(per_frame), v.temporal_patch_size)]
    return np.concatenate([g.reshape(len(g), -1) for g in groups]), [len(groups), h, w]


def vision_batches(geometry: ModelGeometry, inputs: dict[str, np.ndarray], max_batch: int, backend: str
                   ) -> list[dict[str, np.ndarray]]:
    """One vision_encoder call per request: its rows are ragged (patches per image vary). The Python backend
    derives the graph's other inputs from image_grid_thw; a TensorRT plan takes them as they are."""
    if backend == "tensorrt":
        return [{"pixel_values": inputs["pixel_values"], **vision_aux(inputs["image_grid_thw"], geometry.vision)}]
    return [inputs]


def request_positions(input_ids: list[int], geometry: ModelGeometry, request) -> np.ndarray | None:
    """M-RoPE positions of a prompt whose placeholders were expanded for `request`; None without images
    (then positions are the indexes in all three rows, which the engine does by default)."""
    if not request.tokens:
        return None
    starts = span_starts(input_ids, (geometry.image_token_id, geometry.video_token_id), request.tokens)
    grids = request.inputs["image_grid_thw"].tolist()
    return positions(input_ids, list(zip(starts, map(tuple, grids), request.time_intervals)),
                     geometry.vision.merge_size)


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


def vision_aux(grid_thw: np.ndarray, vision: QwenVisionGeometry) -> dict[str, np.ndarray]:
    """What the tower needs besides the patches, computed from the grids (transformers computes it inside
    forward, in Python loops that an ONNX graph cannot hold):
    - position_ids [patches, 2]: each patch's (row, column), patches ordered merge block by merge block;
    - segment_ids [patches]: full attention stays within one frame of one image;
    Qwen2.5-VL (vision.window_size > 0) adds window attention:
    - window_index [patches / merge**2]: merge blocks reordered window by window;
    - window_segment_ids [patches]: which window each patch (in window order) attends within.
    """
    m, window_size = vision.merge_size, vision.window_size
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


def build_vision(checkpoint: Path, model_dir: Path, g: ModelGeometry, options) -> None:
    """Tower + merger to ONNX (dynamic patch count): served by the Python backend with onnxruntime, or compiled
    to a TensorRT plan with one optimisation profile over the patch count."""
    from ..export.qwen2_vl_vision import export_qwen_vision_onnx

    if options.vision_backend == "tensorrt":
        from ..export.tensorrt import build_tensorrt_ragged, require_tensorrt

        require_tensorrt()  # fail before the slow export if TensorRT is missing
        onnx_path = export_qwen_vision_onnx(checkpoint, model_dir / "vision.onnx")
        build_tensorrt_ragged(onnx_path, model_dir / "1" / "model.plan", tensorrt_profile(checkpoint, g, options))
    else:
        export_qwen_vision_onnx(checkpoint, model_dir / "1" / "model.onnx")
    (model_dir / "config.pbtxt").write_text(vision_config(g, options, checkpoint))


def graph_inputs(g: ModelGeometry) -> dict[str, tuple[str, tuple[int, ...]]]:
    """The exported graph's inputs: name -> (Triton type, dims after the patch axis)."""
    inputs = {"pixel_values": ("TYPE_FP32", (g.vision.patch_dim,)), "position_ids": ("TYPE_INT64", (2,)),
              "segment_ids": ("TYPE_INT64", ())}
    if g.vision.window_size:
        inputs.update(window_index=("TYPE_INT64", ()), window_segment_ids=("TYPE_INT64", ()))
    return inputs


def tensorrt_profile(checkpoint: Path, g: ModelGeometry, options) -> dict:
    """From one merge block up to max_images_per_request images of the processor's max_pixels each."""
    from ..export.tensorrt import patch_profile

    most = load_image_processor(checkpoint).size["longest_edge"] // g.vision.patch_size ** 2
    images = options.limits.max_images_per_request
    shapes = {name: dims for name, (_, dims) in graph_inputs(g).items()}
    return patch_profile(shapes, g.vision.merge_size ** 2, images * most, most)


def vision_config(g: ModelGeometry, o, checkpoint: Path | None = None) -> str:
    """No dynamic batching: a request's rows are its images' patches, ragged, with no batch axis to stack on."""
    from ..repository import params_text, vision_group

    output = f'output [ {{ name: "image_embeds" data_type: TYPE_FP32 dims: [ -1, {g.text.hidden_size} ] }} ]'
    if o.vision_backend == "tensorrt":
        inputs = ",\n".join(f'  {{ name: "{name}" data_type: {dtype} dims: [ {", ".join(map(str, (-1, *dims)))} ] }}'
                            for name, (dtype, dims) in graph_inputs(g).items())
        return f"""name: "vision_encoder"
platform: "tensorrt_plan"
default_model_filename: "model.plan"
max_batch_size: 0
input [
{inputs}
]
{output}
instance_group [ {vision_group(o, gpu_only=True)} ]
"""
    return f"""name: "vision_encoder"
backend: "python"
max_batch_size: 0
input [
  {{ name: "pixel_values" data_type: TYPE_FP32 dims: [ -1, {g.vision.patch_dim} ] }},
  {{ name: "image_grid_thw" data_type: TYPE_INT64 dims: [ -1, 3 ] }}
]
{output}
instance_group [ {vision_group(o, gpu_only=False)} ]
{params_text({"ort_intra_op_threads": o.ort_intra_op_threads, "checkpoint": checkpoint or ""})}
"""
