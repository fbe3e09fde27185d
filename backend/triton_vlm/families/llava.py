"""The LLaVA family (LLaVA-1.5 style: CLIP or SigLIP tower, MLP projector, Llama/Mistral/Qwen2 decoder).

Every image becomes the same number of tokens (image_seq_len); positions are the token indexes.
"""
from __future__ import annotations

from pathlib import Path

from ..geometry import ModelGeometry, VisionGeometry, eos_ids, image_token, text_geometry

MODEL_TYPES = ("llava",)


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
