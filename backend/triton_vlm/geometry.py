"""Model geometry read from a checkpoint's config.json: the one source of truth for every size.

The engine, the exporters and the Triton config renderer all take their numbers from here.
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

SUPPORTED_TEXT_MODELS = ("llama", "mistral", "qwen2")


@dataclass(frozen=True)
class TextGeometry:
    model_type: str
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    rms_norm_eps: float
    rope_theta: float
    rope_scaling_factor: float  # 1.0 unless "linear" rope scaling
    max_position_embeddings: int
    attention_bias: bool
    mlp_bias: bool
    tie_word_embeddings: bool
    hidden_act: str
    sliding_window: int | None
    # M-RoPE: rotary frequencies split into sections, each rotated by its own row of 3-D positions
    # (temporal, height, width). Empty: ordinary 1-D positions.
    mrope_section: tuple[int, ...] = ()


@dataclass(frozen=True)
class VisionGeometry:
    image_size: int
    patch_size: int
    num_channels: int
    has_cls: bool  # CLIP prepends a CLS token; SigLIP does not

    @property
    def num_patches(self) -> int:
        return (self.image_size // self.patch_size) ** 2


@dataclass(frozen=True)
class ModelGeometry:
    text: TextGeometry
    vision: Any  # the family's own vision geometry (VisionGeometry for LLaVA)
    image_token: str
    image_token_id: int
    vision_feature_layer: int | tuple[int, ...]
    vision_feature_select_strategy: str
    eos_token_ids: tuple[int, ...]
    dtype: str
    family: str = "llava"  # a module of triton_vlm.families
    video_token: str | None = None
    video_token_id: int | None = None

    @property
    def image_seq_len(self) -> int:
        """Embedding rows per image: the tower's tokens, less the first if the 'default' strategy drops it."""
        tokens = self.vision.num_patches + int(self.vision.has_cls)
        return tokens - 1 if self.vision_feature_select_strategy == "default" else tokens

    @property
    def max_model_len(self) -> int:
        limit = self.text.max_position_embeddings
        # Our attention is full-context; cap at the sliding window so outputs stay exact.
        if self.text.sliding_window:
            limit = min(limit, self.text.sliding_window)
        return limit

    @classmethod
    def from_checkpoint(cls, path: str | Path) -> "ModelGeometry":
        """The family named by config.json's model_type reads the rest (families/)."""
        from .families import family_for

        path = Path(path)
        cfg = read_json(path / "config.json")
        return family_for(path, cfg).geometry(path, cfg)


def read_json(path: Path) -> dict:
    """A checkpoint's JSON file; errors name the file."""
    try:
        data = json.loads(path.read_text())
    except FileNotFoundError:
        raise FileNotFoundError(f"{path}: missing from the checkpoint") from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ValueError(f"{path}: not a readable JSON file ({e})") from None
    if not isinstance(data, dict):
        raise ValueError(f"{path}: expected a JSON object, got {type(data).__name__}")
    return data


def text_geometry(t: dict, top: dict, model_type: str | None = None) -> TextGeometry:
    model_type = model_type or t.get("model_type", "llama")
    if model_type not in SUPPORTED_TEXT_MODELS:
        raise ValueError(f"unsupported language model {model_type!r}; supported: {', '.join(SUPPORTED_TEXT_MODELS)}")
    rope = t.get("rope_parameters") or t.get("rope_scaling") or {}
    rope_type = rope.get("rope_type", rope.get("type", "default"))
    if rope_type == "mrope":  # the Hub's older spelling of default rope with M-RoPE sections
        rope_type = "default"
    if rope_type not in ("default", "linear"):
        raise ValueError(f"rope type {rope_type!r} is not supported yet (default and linear are)")
    heads = t["num_attention_heads"]
    return TextGeometry(
        model_type=model_type,
        vocab_size=t["vocab_size"],
        hidden_size=t["hidden_size"],
        intermediate_size=t["intermediate_size"],
        num_layers=t["num_hidden_layers"],
        num_heads=heads,
        num_kv_heads=t.get("num_key_value_heads") or heads,
        head_dim=t.get("head_dim") or t["hidden_size"] // heads,
        rms_norm_eps=t.get("rms_norm_eps", 1e-6),
        rope_theta=rope.get("rope_theta", t.get("rope_theta", 10000.0)),
        rope_scaling_factor=rope.get("factor", 1.0) if rope_type == "linear" else 1.0,
        max_position_embeddings=t.get("max_position_embeddings", 4096),
        # Qwen2 always has q/k/v biases; Llama/Mistral say so in attention_bias.
        attention_bias=model_type == "qwen2" or bool(t.get("attention_bias", False)),
        mlp_bias=bool(t.get("mlp_bias", False)),
        tie_word_embeddings=bool(t.get("tie_word_embeddings", False) or top.get("tie_word_embeddings", False)),
        hidden_act=t.get("hidden_act", "silu"),
        sliding_window=t.get("sliding_window") if t.get("use_sliding_window", True) else None,
        mrope_section=tuple(rope.get("mrope_section") or ()),
    )


def eos_ids(path: Path, text_cfg: dict) -> tuple[int, ...]:
    gen = path / "generation_config.json"
    eos = read_json(gen).get("eos_token_id") if gen.exists() else None
    if eos is None:
        eos = text_cfg.get("eos_token_id")
    if eos is None:
        return ()
    return tuple(eos) if isinstance(eos, list) else (eos,)


def image_token(path: Path) -> str:
    for name in ("processor_config.json", "tokenizer_config.json"):
        f = path / name
        if f.exists():
            cfg = read_json(f)
            extra = cfg.get("extra_special_tokens")
            token = cfg.get("image_token") or (extra.get("image_token") if isinstance(extra, dict) else None)
            if isinstance(token, str):
                return token
    return "<image>"
