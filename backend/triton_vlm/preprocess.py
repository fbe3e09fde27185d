"""Request-side preprocessing: decode image bytes, run the checkpoint's own image processor, expand placeholders."""
from __future__ import annotations

import base64
import binascii
import io
import re
import threading
from pathlib import Path
from typing import NamedTuple

import numpy as np
from PIL import Image, UnidentifiedImageError

from .geometry import ModelGeometry

DEFAULT_MAX_IMAGE_PIXELS = 16 * 1024 * 1024  # width x height (LLaVA resizes to 336 px anyway)

# Formats whose header, read by Image.open before any pixel is decoded, gives the size the decoder will allocate.
# Others are refused (EPS would run Ghostscript; ICO learns its real size only on load).
FORMATS = ("PNG", "JPEG", "WEBP", "GIF", "BMP", "TIFF")  # JPEG includes MPO (multi-picture JPEG)
SUPPORTED = "supported: PNG, JPEG, WebP, GIF, BMP, TIFF"  # ends the "not an image" messages

# PIL's bomb check is one process-wide limit that warns or raises its own error types inside Image.open. Ours is
# the caller's max_pixels, checked on the header before any pixel is decoded.
Image.MAX_IMAGE_PIXELS = None

_URL = re.compile(rb"\s*[a-z][a-z0-9+.-]*://", re.IGNORECASE)
_IMAGE_MEDIA_TYPE = re.compile(r"image/[a-z0-9][a-z0-9.+-]*", re.IGNORECASE)
_SIXTEEN_BIT = ("I;16", "I;16B", "I;16L", "I;16N")


def decode_image(data: bytes, field: str = "image", max_pixels: int = DEFAULT_MAX_IMAGE_PIXELS) -> Image.Image:
    """An encoded image file, its base64, or a data:image/<type>;base64 URL of it, as the RGB image that
    transformers' convert_to_rgb makes of it. Bad input raises ValueError naming `field`; URLs are never fetched."""
    img, sent_as = _open(bytes(data), field)
    width, height = img.size
    if width * height > max_pixels:
        raise ValueError(f"{field}: {width}x{height} pixels exceeds the limit of {max_pixels} (max_image_pixels)")
    try:
        img.load()
    except Exception as e:  # noqa: BLE001  corrupt data: OSError, SyntaxError, ValueError, EOFError, zlib.error...
        raise ValueError(f"{field}: not a decodable image (truncated or corrupt {img.format}{sent_as}: {e})") from None
    try:
        return to_rgb(img)
    except ValueError as e:  # a pixel mode PIL cannot convert
        raise ValueError(f"{field}: not a decodable image ({img.mode} pixels: {e})") from None


def _open(data: bytes, field: str) -> tuple[Image.Image, str]:
    """The image with only its header read, and how it was sent: "" (the file itself), " sent as base64" or
    " in a data URL"."""
    start = data.lstrip()[:5].lower()
    if not start:
        raise ValueError(f"{field}: empty")
    if _URL.match(data, 0, 64):
        raise ValueError(f"{field}: URLs are not fetched by this server; send the image bytes, base64 or a data: URL")
    if start == b"data:":
        payload = _b64decode(_data_url_payload(data, field))
        if payload is None:
            raise ValueError(f"{field}: not a decodable image (the data URL's payload is not valid base64)")
        img = _header(payload, field, " in a data URL")
        if img is None:
            raise ValueError(f"{field}: not a decodable image (the data URL's payload is not a supported image file; "
                             f"{SUPPORTED})")
        return img, " in a data URL"
    img = _header(data, field, "")
    if img is not None:
        return img, ""
    decoded = _b64decode(data)
    if decoded is None:
        raise ValueError(f"{field}: not a decodable image (neither a supported image file nor base64 of one; "
                         f"{SUPPORTED})")
    img = _header(decoded, field, " sent as base64")
    if img is None:
        raise ValueError(f"{field}: not a decodable image (base64 decoded, but not to a supported image file; "
                         f"{SUPPORTED})")
    return img, " sent as base64"


def _header(raw: bytes, field: str, sent_as: str) -> Image.Image | None:
    """Image.open reads the header only. None when no supported format recognises the bytes."""
    try:
        return Image.open(io.BytesIO(raw), formats=FORMATS)
    except UnidentifiedImageError:
        return None
    except Exception as e:  # noqa: BLE001  a recognised format with a corrupt header; PIL raises many types
        raise ValueError(f"{field}: not a decodable image (truncated or corrupt header{sent_as}: {e})") from None


def _b64decode(text: bytes) -> bytes | None:
    try:  # line-wrapped base64 (76 columns, as `base64` writes it) is fine
        return base64.b64decode(text.translate(None, b" \t\r\n\f\v"), validate=True)
    except (binascii.Error, ValueError):
        return None


def _data_url_payload(data: bytes, field: str) -> bytes:
    """The payload of data:image/<type>[;name=value...];base64,<payload>."""
    header, comma, payload = data.lstrip().partition(b",")
    media_type, *params = header[5:].decode("latin-1").split(";")
    problem = ("no ',' before the payload" if not comma else
               "the media type is not image/*" if not _IMAGE_MEDIA_TYPE.fullmatch(media_type) else
               "the payload is not marked ;base64" if not params or params[-1].lower() != "base64" else None)
    if problem:
        raise ValueError(f"{field}: malformed data URL header {header[:64].decode('latin-1')!r} ({problem}); "
                         "expected data:image/<type>;base64,<payload>")
    return payload


def to_rgb(img: Image.Image) -> Image.Image:
    """RGB as transformers' convert_to_rgb makes it (image_transforms.py; every image processor with do_convert_rgb
    calls it on PIL images): transparency is composited onto white, anything else is Image.convert("RGB")."""
    if img.mode in _SIXTEEN_BIT:
        img = _sixteen_bit_to_8(img)
    if "A" in img.getbands() or img.info.get("transparency") is not None:
        white = Image.new("RGBA", img.size, (255, 255, 255, 255))
        return Image.alpha_composite(white, img.convert("RGBA")).convert("RGB")
    return img.convert("RGB")


def _sixteen_bit_to_8(img: Image.Image) -> Image.Image:
    """16-bit grey by its high byte, as PIL already reads 16-bit RGB(A) PNGs. Here we differ from HF on purpose:
    convert_to_rgb clips every value above 255 to white, so a 16-bit photo would arrive all but blank."""
    wide = np.asarray(img)
    grey = Image.fromarray((wide >> 8).astype(np.uint8))
    key = img.info.get("transparency")
    if key is None:
        return grey
    alpha = Image.fromarray(np.where(wide == key, 0, 255).astype(np.uint8))  # the transparent key stays transparent
    return Image.merge("LA", (grey, alpha))


def as_image(data: bytes | Image.Image, field: str, max_pixels: int = DEFAULT_MAX_IMAGE_PIXELS) -> Image.Image:
    """decode_image for encoded bytes; an already decoded image (a video frame) gets the same pixel limit."""
    if not isinstance(data, Image.Image):
        return decode_image(data, field, max_pixels)
    if data.width * data.height > max_pixels:
        raise ValueError(f"{field}: {data.width}x{data.height} pixels exceeds the limit of {max_pixels} "
                         "(max_image_pixels)")
    return to_rgb(data)


class VisionRequest(NamedTuple):
    """One request's images as its family's vision_encoder inputs, and how many tokens each image takes."""
    inputs: dict[str, np.ndarray]
    tokens: list[int]
    # M-RoPE families: per image or video, how far its temporal position moves per temporal grid step.
    time_intervals: list[float] = []


def expand_placeholders(text: str, tokens: tuple[str, ...], counts: list[int]) -> str:
    """The i-th placeholder (any of `tokens`: image, video) becomes counts[i] copies of it, as HF processors do."""
    pieces = re.split("(" + "|".join(map(re.escape, tokens)) + ")", text)
    texts, found = pieces[::2], pieces[1::2]
    if len(found) != len(counts):
        raise ValueError(f"{len(found)} {'/'.join(tokens)} placeholder(s) for {len(counts)} image(s) or video(s)")
    return "".join(t + token * n for t, token, n in zip(texts, found, counts)) + texts[-1]


class Preprocessor:
    """Tokenizer + image processor of one checkpoint, producing exactly what its HF processor would; what
    differs by model family (processor, tokens per image, positions) is asked of the family module."""

    def __init__(self, checkpoint: str | Path):
        from transformers import AutoTokenizer

        from .families import FAMILIES

        self.geometry = ModelGeometry.from_checkpoint(checkpoint)
        self.family = FAMILIES[self.geometry.family]
        self.tokenizer = AutoTokenizer.from_pretrained(checkpoint)
        self.image_processor = self.family.load_image_processor(checkpoint)
        self.render_chat = self.family.load_chat(checkpoint, self.tokenizer)
        # Fast tokenizers reset their truncation state on each call: not safe from two threads at once.
        self._encode_lock = threading.Lock()

    @property
    def image_token(self) -> str:
        return self.geometry.image_token

    @property
    def placeholders(self) -> tuple[str, ...]:
        """The image token, and the video token where the family takes videos natively."""
        video = self.geometry.video_token
        return (self.image_token, video) if video else (self.image_token,)

    def count_placeholders(self, text: str) -> int:
        return sum(text.count(token) for token in self.placeholders)

    def chat_prompt(self, messages: list[dict]) -> str:
        """The checkpoint's own chat template over messages.parse_messages' output, generation prompt added."""
        if self.render_chat is None:
            raise ValueError("messages: this checkpoint has no chat template; send text_input instead")
        try:
            return self.render_chat(messages)
        except Exception as e:  # noqa: BLE001  jinja's own errors, e.g. a template that demands alternating roles
            raise ValueError(f"messages: the checkpoint's chat template refused them ({e})") from None

    def vision_request(self, images: list[Image.Image | list[Image.Image]], max_pixels: int = DEFAULT_MAX_IMAGE_PIXELS,
                       fields: list[str] | None = None) -> VisionRequest:
        """images[i] is the request's image[i] (or fields[i]), or a native video's frames; bad ones raise
        ValueError naming the field."""
        fields = fields or [f"image[{i}]" for i in range(len(images))]
        return self.family.vision_request(self.image_processor, self.geometry, images, fields, max_pixels)

    def pixel_values(self, images: list[Image.Image], max_pixels: int = DEFAULT_MAX_IMAGE_PIXELS,
                     fields: list[str] | None = None) -> np.ndarray:
        return self.vision_request(images, max_pixels, fields).inputs["pixel_values"]

    def input_ids(self, text: str, tokens: list[int] | None = None) -> list[int]:
        """Each placeholder becomes its image's tokens (tokens[i]; LLaVA: image_seq_len each), then tokenize."""
        if tokens is None:
            tokens = [self.geometry.image_seq_len] * self.count_placeholders(text)
        expanded = expand_placeholders(text, self.placeholders, tokens)
        with self._encode_lock:
            return self.tokenizer(expanded)["input_ids"]

    def positions(self, input_ids: list[int], request: VisionRequest | None) -> np.ndarray | None:
        """Rotary positions [rows, tokens] where the family's differ from the indexes, else None."""
        return None if request is None else self.family.request_positions(input_ids, self.geometry, request)


def check_resize(image_processor, img: Image.Image, field: str, max_pixels: int) -> None:
    """A shortest_edge resize keeps the aspect ratio with no bound on the long side, so a 1x100000 image would
    become 336x33600000 inside the processor. Refuse it if that (computed as HF does) exceeds max_pixels."""
    proc = image_processor
    edge = proc.size.get("shortest_edge") if proc.do_resize and not proc.size.get("longest_edge") else None
    if not edge:
        return
    short, long = sorted(img.size)
    resized = edge * int(edge * long / short)  # as get_resize_output_image_size computes the long side
    if resized > max_pixels:
        raise ValueError(f"{field}: {img.width}x{img.height} pixels would be resized to {resized} pixels (shortest "
                         f"edge {edge}), which exceeds the limit of {max_pixels} (max_image_pixels)")
