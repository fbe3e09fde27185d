"""Images and videos in the forms users hold them, turned into the encoded bytes the `image` input takes.

Images: PIL images, numpy HxWx3 arrays, file paths, encoded bytes, data: URLs, http(s) URLs (fetched here,
with a timeout and a size cap). Videos: a file path, bytes, data:/http(s) URL, or frames already decoded;
the model sees N frames sampled evenly (default 8), one image placeholder each.
"""
from __future__ import annotations

import io
import urllib.error
import urllib.request
from pathlib import Path

import numpy as np
from PIL import Image

FETCH_TIMEOUT_S = 10.0
MAX_FETCH_BYTES = 32 * 1024 * 1024
DEFAULT_FRAMES = 8
IMAGE_PLACEHOLDER = "<image>"  # LLaVA's; a video's frames each get one


def image_bytes(image, field: str = "image", timeout: float = FETCH_TIMEOUT_S, max_bytes: int = MAX_FETCH_BYTES) -> bytes:
    """The bytes to send for one image; the server decodes them (and data: URLs). Bad input: ValueError naming
    `field`."""
    if isinstance(image, Image.Image):
        return png(image)
    if isinstance(image, np.ndarray):
        return png(_from_array(image, field))
    if isinstance(image, (bytes, bytearray, memoryview)):
        return bytes(image)
    if isinstance(image, (str, Path)):
        return _load(image, field, timeout, max_bytes)
    raise ValueError(f"{field}: expected a PIL image, an array, bytes, a path or a URL, got {type(image).__name__}")


def png(image: Image.Image) -> bytes:
    buf = io.BytesIO()
    image.save(buf, format="PNG")
    return buf.getvalue()


def _from_array(array: np.ndarray, field: str) -> Image.Image:
    if array.ndim != 3 or array.shape[2] not in (3, 4) or array.dtype != np.uint8:
        raise ValueError(f"{field}: expected a uint8 array of shape HxWx3 (or 4), got {array.dtype} {array.shape}")
    return Image.fromarray(array)


def _load(source: str | Path, field: str, timeout: float, max_bytes: int) -> bytes:
    """A data: URL as is, an http(s) URL fetched, anything else read as a file."""
    text = str(source)
    if isinstance(source, str) and text.lstrip()[:5].lower() == "data:":
        return text.encode()
    if isinstance(source, str) and text.lower().startswith(("http://", "https://")):
        return fetch(text, field, timeout, max_bytes)
    try:
        return Path(source).read_bytes()
    except OSError as e:
        raise ValueError(f"{field}: cannot read {text!r} ({e.strerror or e})") from None


def fetch(url: str, field: str = "image", timeout: float = FETCH_TIMEOUT_S, max_bytes: int = MAX_FETCH_BYTES) -> bytes:
    """GET `url`: at most `max_bytes`, and no wait longer than `timeout` for any read."""
    try:
        with urllib.request.urlopen(urllib.request.Request(url, headers={"User-Agent": "triton-vlm"}),
                                    timeout=timeout) as r:
            size = r.headers.get("Content-Length")
            if size and size.isdigit() and int(size) > max_bytes:
                raise ValueError(f"{field}: {url} is {int(size)} bytes, over the limit of {max_bytes}")
            data = r.read(max_bytes + 1)
    except (urllib.error.URLError, TimeoutError, OSError) as e:
        raise ValueError(f"{field}: cannot fetch {url} ({getattr(e, 'reason', e)})") from None
    if len(data) > max_bytes:
        raise ValueError(f"{field}: {url} is over the limit of {max_bytes} bytes")
    return data


def video_frames(video, n: int = DEFAULT_FRAMES, field: str = "video", timeout: float = FETCH_TIMEOUT_S,
                 max_bytes: int = MAX_FETCH_BYTES) -> list[bytes]:
    """`n` frames spread evenly over the video (all of them if it has fewer), each encoded for `image`.

    `video` is decoded frames (a TxHxWx3 array, or a list of images in any form image_bytes takes), or a
    video file: a path, its bytes, or a data:/http(s) URL, decoded with PyAV."""
    from triton_vlm.video import frame_indices, sample_frames

    if isinstance(video, np.ndarray) and video.ndim == 4:
        video = list(video)
    if isinstance(video, (list, tuple)):
        if not video:
            raise ValueError(f"{field}: no frames")
        return [image_bytes(video[i], f"{field}[{i}]", timeout, max_bytes) for i in sorted(frame_indices(len(video), n))]

    if isinstance(video, str) and video.lower().startswith(("http://", "https://")):
        video = fetch(video, field, timeout, max_bytes)
    return [png(frame) for frame in sample_frames(video, n, field=field)]
