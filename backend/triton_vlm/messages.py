"""OpenAI chat messages -> what the checkpoint's chat template takes, plus the images in placeholder order.

Content parts: `text`, `image_url` (a data: URL, or "#N" = element N of the request's `image` input)
and `video_url` (a data: URL of a video, sampled to `num_frames` frames, default 8, each one image).
Images become {"type": "image"} parts, which LLaVA-style templates render as one placeholder each, in
message and part order; that is the order of `Chat.media`. Every error names its message and part,
e.g. `messages[2].content[1].image_url: ...`. URLs to fetch are refused: the caller fetches (or not).
"""
from __future__ import annotations

import json
import re
from typing import NamedTuple

from PIL import Image

from . import video

ROLES = ("system", "developer", "user", "assistant")
PART_TYPES = ("text", "image_url", "video_url")
_REF = re.compile(r"#(\d+)")
_REMOTE = re.compile(r"\s*[a-z][a-z0-9+.-]*://", re.IGNORECASE)


class Media(NamedTuple):
    """One image (or, for families with native video, one video) a placeholder stands for."""
    field: str  # where it came from, for errors: "messages[0].content[1].image_url"
    # an encoded image (data URL or `image` element), a decoded video frame, or a native video's frames
    data: bytes | Image.Image | list[Image.Image]


class Chat(NamedTuple):
    messages: list[dict]  # for apply_chat_template: parts {"type": "text", "text": ...} and {"type": "image"}
    media: list[Media]


class _Video(NamedTuple):
    field: str
    url: str
    frames: int


def parse_messages(raw: bytes | str | list, images: list[bytes] = (), *, image_token: str = "<image>",
                   max_images: int = 8, max_pixels: int | None = None, native_video: bool = False) -> Chat:
    """Check `raw` (JSON text or the decoded list) and resolve its media; ValueError names the field.

    native_video: a video stays one {"type": "video"} part and one Media holding its frames (Qwen2-VL);
    otherwise it becomes one image part and one Media per frame."""
    if isinstance(raw, (bytes, str)):
        try:
            raw = json.loads(raw)
        except (ValueError, RecursionError) as e:
            raise ValueError(f"messages: not valid JSON ({e})") from None
    if not isinstance(raw, list) or not raw:
        raise ValueError("messages: expected a non-empty JSON array of messages")
    turns, media, used = [], [], set()
    for i, message in enumerate(raw):
        turns.append(_message(message, f"messages[{i}]", images, image_token, media, used))
    unused = sorted(set(range(len(images))) - used)
    if unused:
        raise ValueError(f"image[{unused[0]}]: not referenced by any image_url \"#{unused[0]}\" in messages")
    n_images = sum(m.frames if isinstance(m, _Video) else 1 for m in media)
    if n_images > max_images:
        raise ValueError(f"messages: {n_images} images (video frames included) exceed the limit of {max_images} "
                         "per request (max_images_per_request)")
    media, counts = _sample_videos(media, max_pixels, native_video)
    return Chat(turns if native_video else [_expand_videos(turn, counts) for turn in turns], media)


def _message(message, where: str, images, image_token: str, media: list, used: set) -> dict:
    if not isinstance(message, dict):
        raise ValueError(f"{where}: expected an object with role and content")
    role = message.get("role")
    if role not in ROLES:
        raise ValueError(f"{where}.role: must be one of {', '.join(ROLES)}, got {json.dumps(role)[:40]}")
    content = message.get("content")
    if content is None and role == "assistant":
        content = ""
    if isinstance(content, str):
        _check_text(content, f"{where}.content", image_token)
        content = [{"type": "text", "text": content}]
    elif not isinstance(content, list):
        raise ValueError(f"{where}.content: expected a string or a list of content parts")
    parts = [_part(part, f"{where}.content[{j}]", role, images, image_token, media, used)
             for j, part in enumerate(content)]
    # The chat template sees "system" for OpenAI's newer "developer" role.
    return {"role": "system" if role == "developer" else role, "content": [p for ps in parts for p in ps]}


def _part(part, where: str, role: str, images, image_token: str, media: list, used: set) -> list[dict]:
    kind = part.get("type") if isinstance(part, dict) else None
    if kind not in PART_TYPES:
        raise ValueError(f"{where}: unsupported content part {json.dumps(kind)[:40]} "
                         f"(supported: {', '.join(PART_TYPES)})")
    if kind == "text":
        text = part.get("text")
        if not isinstance(text, str):
            raise ValueError(f"{where}.text: expected a string")
        _check_text(text, f"{where}.text", image_token)
        return [{"type": "text", "text": text}]
    where = f"{where}.{kind}"
    if role != "user":
        raise ValueError(f"{where}: images and videos go in user messages, not {role}")
    url, extra = _url(part.get(kind), where)
    if kind == "video_url":
        frames = _frames(extra.get("num_frames", video.DEFAULT_FRAMES), f"{where}.num_frames")
        media.append(_Video(where, url, frames))
        return [{"type": "video"}]  # becomes a placeholder per frame once the video is sampled
    ref = _REF.fullmatch(url.strip())
    if ref:
        n = int(ref.group(1))
        if n >= len(images):
            raise ValueError(f"{where}: \"#{n}\" but the image input has {len(images)} element(s)")
        used.add(n)
        media.append(Media(where, images[n]))
    elif url.lstrip()[:5].lower() == "data:":
        media.append(Media(where, url.encode()))
    elif _REMOTE.match(url):
        raise ValueError(f"{where}: URLs are not fetched by this server; send a data: URL, or the image in the "
                         "image input and \"#N\" here")
    else:
        raise ValueError(f"{where}: expected a data: URL or \"#N\" (element N of the image input), got "
                         f"{json.dumps(url[:40])}")
    return [{"type": "image"}]


def _url(value, where: str) -> tuple[str, dict]:
    """OpenAI sends {"url": ...}; a bare string is accepted too."""
    if isinstance(value, str):
        return value, {}
    if isinstance(value, dict) and isinstance(value.get("url"), str):
        return value["url"], value
    raise ValueError(f"{where}: expected {{\"url\": \"data:...\"}}")


def _frames(value, where: str) -> int:
    if not isinstance(value, int) or isinstance(value, bool) or not 1 <= value <= video.MAX_FRAMES:
        raise ValueError(f"{where}: must be an integer in [1, {video.MAX_FRAMES}], got {json.dumps(value)[:40]}")
    return value


def _check_text(text: str, where: str, image_token: str) -> None:
    if image_token and image_token in text:
        raise ValueError(f"{where}: contains the image placeholder {image_token}; send images as image_url parts")


def _sample_videos(media: list, max_pixels: int | None, native: bool = False) -> tuple[list[Media], list[int]]:
    """Videos become their frames (after the image count was checked: decoding is the costly part);
    also the number of frames of each video, fewer than asked for when the video is shorter."""
    out, counts = [], []
    for m in media:
        if not isinstance(m, _Video):
            out.append(m)
            continue
        limit = {} if max_pixels is None else {"max_pixels": max_pixels}
        frames = video.sample_frames(m.url, m.frames, m.field, **limit)
        out += [Media(m.field, frames)] if native else [Media(m.field, f) for f in frames]
        counts.append(len(frames))
    return out, counts


def _expand_videos(turn: dict, counts: list[int]) -> dict:
    """Each {"type": "video"} part becomes one image part per sampled frame (`counts` is consumed in order)."""
    parts = []
    for part in turn["content"]:
        parts += [{"type": "image"}] * counts.pop(0) if part["type"] == "video" else [part]
    return {**turn, "content": parts}
