"""The LLaVA family (LLaVA-1.5 style: CLIP or SigLIP tower, MLP projector, Llama/Mistral/Qwen2 decoder).

Every image becomes the same number of tokens (image_seq_len); positions are the token indexes.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np

from ..geometry import ModelGeometry, VisionGeometry, eos_ids, image_token, text_geometry

MODEL_TYPES = ("llava",)
VISION_BACKENDS = ("onnxruntime", "tensorrt")
NATIVE_VIDEO = False  # a video is sent as its frames, one image placeholder each
# Every image takes image_seq_len rows: vlm knows a request's tokens before decoding, and its image cache
# can answer without decoding.
FIXED_IMAGE_TOKENS = True


def geometry(path: Path, cfg: dict) -> ModelGeometry:
    if "text_config" not in cfg or "vision_config" not in cfg:
        raise ValueError(f"{path}/config.json is not a LLaVA-style checkpoint (needs text_config and vision_config)")
    try:
        text = text_geometry(cfg["text_config"], cfg)
    except KeyError as e:
        raise ValueError(f"{path / 'config.json'}: text_config lacks {e.args[0]!r}") from None
    v = cfg["vision_config"]
    tower = v.get("model_type", "clip_vision_model")
    if tower not in ("clip_vision_model", "siglip_vision_model"):
        raise ValueError(f"unsupported vision tower {tower!r}; supported: CLIP and SigLIP")
    vision = VisionGeometry(v.get("image_size", 224), v.get("patch_size", 32), v.get("num_channels", 3),
                            has_cls=tower == "clip_vision_model")
    layer = cfg.get("vision_feature_layer", -2)
    return ModelGeometry(
        text=text,
        vision=vision,
        image_token=image_token(path),
        image_token_id=cfg.get("image_token_index", cfg.get("image_token_id", 32000)),
        vision_feature_layer=tuple(layer) if isinstance(layer, list) else layer,
        vision_feature_select_strategy=cfg.get("vision_feature_select_strategy", "default"),
        eos_token_ids=eos_ids(path, cfg["text_config"]),
        dtype=cfg.get("dtype") or cfg.get("torch_dtype") or cfg["text_config"].get("torch_dtype") or "float32",
        family="llava",
    )


def load_image_processor(checkpoint: str | Path):
    from transformers import AutoImageProcessor

    return AutoImageProcessor.from_pretrained(checkpoint)


def load_chat(checkpoint: str | Path, tokenizer):
    """The checkpoint's processor renders chats if it carries a chat template; else None (text_input only)."""
    from transformers import AutoProcessor

    try:
        processor = AutoProcessor.from_pretrained(checkpoint)
    except Exception:  # noqa: BLE001  no processor files: prompts come as text_input only
        return None
    if not getattr(processor, "chat_template", None):
        return None
    return lambda messages: processor.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)


def vision_request(image_processor, geometry: ModelGeometry, images: list, fields: list[str], max_pixels: int):
    """pixel_values [images, 3, H, W]; every image takes image_seq_len tokens."""
    from ..preprocess import VisionRequest, check_resize

    for img, name in zip(images, fields):
        check_resize(image_processor, img, name, max_pixels)
    pixels = image_processor(images=images, return_tensors="np")["pixel_values"]
    return VisionRequest({"pixel_values": np.ascontiguousarray(pixels, dtype=np.float32)},
                         [geometry.image_seq_len] * len(images))


def vision_batches(geometry: ModelGeometry, inputs: dict[str, np.ndarray], max_batch: int, backend: str
                   ) -> list[dict[str, np.ndarray]]:
    """At most vision_encoder's max_batch_size images per call (either backend takes pixel_values)."""
    pixels = inputs["pixel_values"]
    return [{"pixel_values": pixels[i:i + max_batch]} for i in range(0, len(pixels), max_batch)]


def request_positions(input_ids: list[int], geometry: ModelGeometry, request) -> None:
    """Positions are the token indexes, the engine's default."""
    return None


def build_vision(checkpoint: Path, model_dir: Path, g: ModelGeometry, options) -> None:
    """The tower + projector to ONNX (dynamic batch axis); to a TensorRT plan when asked."""
    from ..export.vision import export_vision_onnx

    version = model_dir / "1"
    if options.vision_backend == "tensorrt":
        from ..export.tensorrt import build_tensorrt_engine, require_tensorrt

        require_tensorrt()  # fail before the slow export if TensorRT is missing
        onnx_path = export_vision_onnx(checkpoint, model_dir / "vision.onnx")
        build_tensorrt_engine(onnx_path, version / "model.plan", g.vision.image_size, options.vision_max_batch_size)
    else:
        export_vision_onnx(checkpoint, version / "model.onnx")
    (model_dir / "config.pbtxt").write_text(vision_config(g, options))


def vision_config(g: ModelGeometry, o) -> str:
    from ..repository import params_text, vision_group

    size = g.vision.image_size
    io = f"""input [ {{ name: "pixel_values" data_type: TYPE_FP32 dims: [ {g.vision.num_channels}, {size}, {size} ] }} ]
output [ {{ name: "image_embeds" data_type: TYPE_FP32 dims: [ {g.image_seq_len}, {g.text.hidden_size} ] }} ]
max_batch_size: {o.vision_max_batch_size}
dynamic_batching {{ max_queue_delay_microseconds: {o.vision_queue_delay_us} }}"""
    if o.vision_backend == "tensorrt":
        return f"""name: "vision_encoder"
platform: "tensorrt_plan"
default_model_filename: "model.plan"
{io}
instance_group [ {vision_group(o, gpu_only=True)} ]
"""
    return f"""name: "vision_encoder"
backend: "python"
{io}
instance_group [ {vision_group(o, gpu_only=False)} ]
{params_text({"ort_intra_op_threads": o.ort_intra_op_threads})}
"""
