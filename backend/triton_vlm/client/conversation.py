"""OpenAI-style chat messages as the client sends them: media moved into the `image` input.

Every image_url part (whatever form its url takes: data:/http(s) URL, path, bytes, PIL image) becomes
`{"url": "#N"}`, N indexing the request's `image` tensor; a video_url part becomes its sampled frames,
one `#N` image part each. The server renders the result with the checkpoint's chat template.
"""
from __future__ import annotations

import json
from typing import NamedTuple

from .media import DEFAULT_FRAMES, image_bytes, video_frames


class Packed(NamedTuple):
    messages: str  # JSON for the `messages` input
    images: list[bytes]


def pack(messages: list[dict], frames: int = DEFAULT_FRAMES) -> Packed:
    if not isinstance(messages, list) or not all(isinstance(m, dict) for m in messages):
        raise ValueError("messages: expected a list of {'role': ..., 'content': ...} dicts")
    images: list[bytes] = []
    out = []
    for i, message in enumerate(messages):
        content = message.get("content")
        if isinstance(content, list):
            parts = []
            for j, part in enumerate(content):
                parts += _pack_part(part, f"messages[{i}].content[{j}]", images, frames)
            message = {**message, "content": parts}
        out.append(message)
    return Packed(json.dumps(out), images)


def _pack_part(part, where: str, images: list[bytes], frames: int) -> list[dict]:
    kind = part.get("type") if isinstance(part, dict) else None
    if kind in ("image_url", "video_url"):
        url = part.get(kind)
        url = url.get("url") if isinstance(url, dict) else url  # {"url": ...}, or the url itself
        if url is None:
            raise ValueError(f"{where}.{kind}: no url")
        if isinstance(url, str) and url.startswith("#"):
            raise ValueError(f"{where}.{kind}: '#N' refers to an image the client sends itself; give the image")
        if kind == "video_url":
            data = video_frames(url, frames, f"{where}.video_url")
        else:
            data = [image_bytes(url, f"{where}.image_url")]
    elif kind == "image" and "image" in part:  # Hugging Face style {"type": "image", "image": ...}
        data = [image_bytes(part["image"], f"{where}.image")]
    else:
        return [part]
    images += data
    first = len(images) - len(data)
    return [{"type": "image_url", "image_url": {"url": f"#{first + k}"}} for k in range(len(data))]


def user_message(text: str, images=()) -> dict:
    """One user turn: its images first (as LLaVA's templates place them), then the text."""
    return {"role": "user", "content": [{"type": "image_url", "image_url": {"url": im}} for im in images]
            + [{"type": "text", "text": text}]}


def from_prompt(prompt) -> list[dict]:
    """LMDeploy's prompt forms as messages: "text", ("text", image or [images]), (image(s), "text"), or
    messages already (a list of role dicts)."""
    if isinstance(prompt, str):
        return [user_message(prompt)]
    if isinstance(prompt, tuple) and len(prompt) == 2:
        text, media = prompt if isinstance(prompt[0], str) and not _looks_like_media(prompt[0]) else prompt[::-1]
        if not isinstance(text, str):
            raise ValueError("prompt: a tuple must hold a text and an image (or a list of images)")
        return [user_message(text, media if isinstance(media, (list, tuple)) else [media])]
    if isinstance(prompt, list) and all(isinstance(m, dict) and "role" in m for m in prompt):
        return prompt
    raise ValueError(f"prompt: expected a text, a (text, image) tuple or a list of messages, got {type(prompt).__name__}")


def _looks_like_media(text: str) -> bool:
    """A string that names an image (a URL or a file name), not a question: ("photo.jpg", "What is it?")."""
    low = text.lower()
    return low.startswith(("data:", "http://", "https://")) or (
        "\n" not in text and " " not in text and low.rsplit(".", 1)[-1] in ("png", "jpg", "jpeg", "gif", "bmp", "webp"))
