"""Video frames for image-only models: sample N frames evenly with PyAV, as RGB PIL images.

A LLaVA model sees a video as that many images, one placeholder each; the server does this for a
`video_url` part, the client library for `multi_modal_data={"video": ...}`.
"""
from __future__ import annotations

import base64
import binascii
import io
import re
from pathlib import Path

from PIL import Image

from .preprocess import DEFAULT_MAX_IMAGE_PIXELS

DEFAULT_FRAMES = 8
MAX_FRAMES = 64  # a request's image limit bounds it further
_VIDEO_DATA_URL = re.compile(rb"\s*data:video/[a-z0-9][a-z0-9.+-]*((?:;[^,;]*)*);base64,", re.IGNORECASE)


def sample_frames(data_or_path: bytes | str | Path, n: int = DEFAULT_FRAMES, field: str = "video",
                  max_pixels: int = DEFAULT_MAX_IMAGE_PIXELS) -> list[Image.Image]:
    """`n` frames spread evenly from first to last (all of them if the video has fewer).

    `data_or_path` is the video file's bytes, a data:video/<type>;base64 URL, or a file path.
    Bad input raises ValueError naming `field`.
    """
    if not 1 <= n <= MAX_FRAMES:
        raise ValueError(f"{field}: the number of frames must be in [1, {MAX_FRAMES}], got {n}")
    source = _source(data_or_path, field)
    total = _count_frames(source, field, max_pixels)
    if total == 0:
        raise ValueError(f"{field}: the video has no frames")
    wanted = frame_indices(total, n)
    frames = []
    with _open(source, field) as container:
        try:
            for i, frame in enumerate(container.decode(video=0)):
                if i in wanted:
                    frames.append(frame.to_image().convert("RGB"))
                    if len(frames) == len(wanted):
                        break
        except Exception as e:  # noqa: BLE001  av.FFmpegError and friends: a corrupt stream
            raise ValueError(f"{field}: not a decodable video ({e})") from None
    if not frames:
        raise ValueError(f"{field}: not a decodable video (no frame could be decoded)")
    return frames


def frame_indices(total: int, n: int) -> set[int]:
    """n indices spread evenly over [0, total), both ends included."""
    if total <= n:
        return set(range(total))
    return {round(k * (total - 1) / (n - 1)) for k in range(n)} if n > 1 else {0}


def is_video_data_url(data: bytes | str) -> bool:
    return _VIDEO_DATA_URL.match(data.encode() if isinstance(data, str) else data) is not None


def _source(data_or_path, field: str) -> bytes | str:
    """The video's bytes, or the path of its file."""
    if isinstance(data_or_path, Path):
        return str(data_or_path)
    if isinstance(data_or_path, str):
        if not data_or_path.lstrip().startswith("data:"):
            return data_or_path
        data_or_path = data_or_path.encode()
    data = bytes(data_or_path)
    if data.lstrip()[:5].lower() != b"data:":
        if not data:
            raise ValueError(f"{field}: empty")
        return data
    match = _VIDEO_DATA_URL.match(data)
    if not match:
        head = data.lstrip()[:48].decode("latin-1")
        raise ValueError(f"{field}: malformed data URL {head!r}...; expected data:video/<type>;base64,<payload>")
    try:
        return base64.b64decode(data[match.end():].translate(None, b" \t\r\n\f\v"), validate=True)
    except (binascii.Error, ValueError):
        raise ValueError(f"{field}: the data URL's payload is not valid base64") from None


def _open(source: bytes | str, field: str):
    import av

    try:
        container = av.open(io.BytesIO(source) if isinstance(source, bytes) else source, mode="r")
    except FileNotFoundError:
        raise ValueError(f"{field}: no such file: {source}") from None
    except Exception as e:  # noqa: BLE001  not a container format FFmpeg knows
        raise ValueError(f"{field}: not a decodable video ({e})") from None
    if not container.streams.video:
        container.close()
        raise ValueError(f"{field}: the file has no video stream")
    return container


def _count_frames(source: bytes | str, field: str, max_pixels: int) -> int:
    """Frames in the first video stream, by demuxing (no decoding); checks the frame size first."""
    with _open(source, field) as container:
        stream = container.streams.video[0]
        width, height = stream.codec_context.width, stream.codec_context.height
        if width * height > max_pixels:
            raise ValueError(f"{field}: {width}x{height} frames exceed the limit of {max_pixels} pixels "
                             "(max_image_pixels)")
        try:
            return sum(1 for packet in container.demux(stream) if packet.size)
        except Exception as e:  # noqa: BLE001
            raise ValueError(f"{field}: not a decodable video ({e})") from None
