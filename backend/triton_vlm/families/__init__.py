"""Model families. Each module holds what one family of VLMs does its own way: geometry from config.json,
the vision export, how the image processor's output becomes vision_encoder inputs, how placeholders are
expanded and how token positions are computed. The family is chosen by config.json's model_type.
"""
from __future__ import annotations

from pathlib import Path
from types import ModuleType

from . import llava, qwen2_vl

FAMILIES: dict[str, ModuleType] = {**{t: llava for t in llava.MODEL_TYPES}, **{t: qwen2_vl for t in qwen2_vl.MODEL_TYPES}}


def family_for(path: str | Path, cfg: dict) -> ModuleType:
    # LLaVA checkpoints written before model_type was saved have only text_config + vision_config.
    model_type = cfg.get("model_type") or ("llava" if "text_config" in cfg and "vision_config" in cfg else None)
    family = FAMILIES.get(model_type)
    if family is None:
        raise ValueError(f"{Path(path) / 'config.json'}: model_type {model_type!r} is not supported; supported: "
                         f"{', '.join(sorted(FAMILIES))}")
    return family
