"""Load a LLaVA checkpoint's language-model weights from safetensors into our decoder."""
from __future__ import annotations

from pathlib import Path

import torch
from safetensors import safe_open
from torch import nn

# Checkpoints name the decoder differently across transformers versions.
PREFIXES = (
    ("language_model.model.", ""),
    ("language_model.lm_head.", "lm_head."),
    ("model.language_model.", ""),
    ("lm_head.", "lm_head."),
)


def decoder_key(key: str) -> str | None:
    for old, new in PREFIXES:
        if key.startswith(old):
            return new + key[len(old):]
    return None  # vision tower, projector: served by vision_encoder


def load_decoder_weights(model: nn.Module, checkpoint: str | Path) -> None:
    files = sorted(Path(checkpoint).glob("*.safetensors"))
    if not files:
        raise FileNotFoundError(f"no *.safetensors files in {checkpoint}")
    params = dict(model.named_parameters())
    loaded = set()
    for f in files:
        with safe_open(str(f), framework="pt") as st:
            for key in st.keys():
                name = decoder_key(key)
                if name is None or name not in params:
                    continue
                tensor = st.get_tensor(key)
                target = params[name]
                if tuple(tensor.shape) != tuple(target.shape):
                    raise ValueError(f"{key}: checkpoint shape {tuple(tensor.shape)} != model {tuple(target.shape)}")
                with torch.no_grad():
                    target.copy_(tensor.to(target.dtype))
                loaded.add(name)
    tied = {"lm_head.weight"} if getattr(model.geometry, "tie_word_embeddings", False) else set()
    missing = set(params) - loaded - tied
    if missing:
        raise ValueError(f"checkpoint {checkpoint} lacks decoder weights: {sorted(missing)[:5]}...")
