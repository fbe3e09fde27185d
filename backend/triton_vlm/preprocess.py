"""Request-side preprocessing: decode image bytes, run the checkpoint's own image processor, expand placeholders."""
from __future__ import annotations

import base64
import binascii
import io
import threading
from pathlib import Path

import numpy as np
from PIL import Image, UnidentifiedImageError

from .geometry import ModelGeometry


def decode_image(data: bytes, field: str = "image") -> Image.Image:
    """Accept an encoded image file (PNG/JPEG/WebP/...), its base64, or a data: URL of it."""
    if not data:
        raise ValueError(f"{field}: empty")
    raw = data
    if raw[:5] == b"data:":
        _, _, raw = raw.partition(b",")
    try:
        return _open(raw)
    except (UnidentifiedImageError, OSError):
        pass
    try:
        raw = base64.b64decode(raw, validate=True)
    except (binascii.Error, ValueError):
        raise ValueError(f"{field}: not a decodable image (neither an image file nor base64 of one)") from None
    try:
        return _open(raw)
    except UnidentifiedImageError:
        raise ValueError(f"{field}: base64 decoded but is not a decodable image") from None
    except OSError as e:  # a known format, but truncated or corrupt
        raise ValueError(f"{field}: base64 decoded but is not a decodable image ({e})") from None


def _open(raw: bytes) -> Image.Image:
    img = Image.open(io.BytesIO(raw))
    img.load()  # decode now, so truncated files fail here and not inside the processor
    return img.convert("RGB")


class Preprocessor:
    """Tokenizer + image processor of one checkpoint, producing exactly what its HF processor would."""

    def __init__(self, checkpoint: str | Path):
        from transformers import AutoImageProcessor, AutoTokenizer

        self.geometry = ModelGeometry.from_checkpoint(checkpoint)
        self.tokenizer = AutoTokenizer.from_pretrained(checkpoint)
        self.image_processor = AutoImageProcessor.from_pretrained(checkpoint)
        # Fast tokenizers reset their truncation state on each call: not safe from two threads at once.
        self._encode_lock = threading.Lock()

    @property
    def image_token(self) -> str:
        return self.geometry.image_token

    def count_placeholders(self, text: str) -> int:
        return text.count(self.image_token)

    def pixel_values(self, images: list[Image.Image]) -> np.ndarray:
        out = self.image_processor(images=images, return_tensors="np")["pixel_values"]
        return np.ascontiguousarray(out, dtype=np.float32)

    def input_ids(self, text: str) -> list[int]:
        """Each placeholder becomes image_seq_len image tokens, as LlavaProcessor does, then tokenize."""
        token = self.image_token
        expanded = text.replace(token, token * self.geometry.image_seq_len)
        with self._encode_lock:
            return self.tokenizer(expanded)["input_ids"]
