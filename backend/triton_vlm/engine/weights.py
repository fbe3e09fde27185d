"""Load a VLM checkpoint's language-model weights from safetensors into our decoder."""
from __future__ import annotations

from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from torch import nn

# Checkpoints name the decoder differently across transformers versions.
PREFIXES = (
    ("language_model.model.", ""),
    ("language_model.lm_head.", "lm_head."),
    ("model.language_model.", ""),
    ("lm_head.", "lm_head."),
    ("model.", ""),  # Qwen2-VL checkpoints: model.layers.*, model.embed_tokens (model.visual is not ours)
)


def decoder_key(key: str) -> str | None:
    for old, new in PREFIXES:
        if key.startswith(old):
            return new + key[len(old):]
    return None  # vision tower, projector: served by vision_encoder


# Pickle-based weight files run code when loaded; we never open them.
PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl")


def weight_files(checkpoint: str | Path) -> list[Path]:
    """The checkpoint's *.safetensors files; a checkpoint with only pickle weights is refused by name."""
    checkpoint = Path(checkpoint)
    files = sorted(checkpoint.glob("*.safetensors"))
    if files:
        return files
    pickles = sorted(f.name for f in checkpoint.glob("*") if f.suffix in PICKLE_SUFFIXES)
    if pickles:
        raise ValueError(f"{checkpoint}: weights only in {', '.join(pickles)}; triton-vlm loads *.safetensors only, "
                         "never pickle files (they can run code when loaded): convert the checkpoint to safetensors")
    raise FileNotFoundError(f"no *.safetensors files in {checkpoint}")


def load_decoder_weights(model: nn.Module, checkpoint: str | Path) -> None:
    params = dict(model.named_parameters())
    loaded = set()
    for f in weight_files(checkpoint):
        try:
            loaded |= _load_file(f, params)
        except SafetensorError as e:  # truncated or not a safetensors file at all
            raise ValueError(f"{f}: not a readable safetensors file ({e})") from None
    tied = {"lm_head.weight"} if getattr(model.geometry, "tie_word_embeddings", False) else set()
    missing = set(params) - loaded - tied
    if missing:
        raise ValueError(f"checkpoint {checkpoint} lacks decoder weights: {sorted(missing)[:5]}...")


def _load_file(f: Path, params: dict[str, nn.Parameter]) -> set[str]:
    loaded = set()
    with safe_open(str(f), framework="pt") as st:
        for key in st.keys():
            name = decoder_key(key)
            if name is None or name not in params:
                continue
            tensor = st.get_tensor(key)
            target = params[name]
            if tuple(tensor.shape) != tuple(target.shape):
                raise ValueError(f"{f}: {key}: checkpoint shape {tuple(tensor.shape)} != model {tuple(target.shape)}")
            with torch.no_grad():
                target.copy_(tensor.to(target.dtype))
            loaded.add(name)
    return loaded
