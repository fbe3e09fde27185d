"""vLLM's offline interface, served remotely: `LLM(url).generate(prompts, SamplingParams(...))`.

    from triton_vlm.client import LLM, SamplingParams
    llm = LLM("127.0.0.1:8001")
    outs = llm.generate([{"prompt": "USER: <image>\\nWhat colour is the circle?\\nASSISTANT:",
                          "multi_modal_data": {"image": img}}], SamplingParams(temperature=0, max_tokens=16))
    outs[0].outputs[0].text

Every prompt goes to the `vlm` model concurrently, each over its own gRPC stream; results come back in
prompt order. Nothing is loaded locally: the server holds the model.
"""
from __future__ import annotations

import re
from dataclasses import asdict, dataclass, field

import numpy as np
from PIL import Image

from . import protocol
from .conversation import from_prompt, pack
from .media import DEFAULT_FRAMES, IMAGE_PLACEHOLDER, image_bytes, video_frames

VIDEO_PLACEHOLDER = "<video>"  # in a generate() prompt: becomes one image placeholder per sampled frame
PROGRESS_FROM = 32  # batches at least this large show a progress bar (use_tqdm=None)


@dataclass
class SamplingParams:
    """vLLM's SamplingParams as sent in `sampling_parameters`. A field left None takes the server's default
    (vLLM's: max_tokens 16, temperature 1.0); `extra` carries any other vLLM field by name. The server
    checks every value and its error names the field."""
    max_tokens: int | None = None
    temperature: float | None = None
    top_p: float | None = None
    top_k: int | None = None
    min_p: float | None = None
    seed: int | None = None
    stop: str | list[str] | None = None
    stop_token_ids: list[int] | None = None
    ignore_eos: bool | None = None
    n: int | None = None
    logprobs: int | None = None
    extra: dict = field(default_factory=dict)

    def to_dict(self) -> dict:
        given = {k: v for k, v in asdict(self).items() if v is not None and k != "extra"}
        return {**given, **self.extra}


@dataclass
class CompletionOutput:
    index: int
    text: str
    finish_reason: str | None  # "stop" or "length"
    num_tokens: int  # vlm returns text, not token ids: their count is what we have


@dataclass
class RequestOutput:
    request_id: str
    prompt: str | list[dict]  # the prompt, or the messages of a chat()
    outputs: list[CompletionOutput]
    num_prompt_tokens: int  # image tokens included
    finished: bool = True


class LLM:
    """A client for a running triton-vlm server (gRPC address), with vLLM's generate() and chat()."""

    def __init__(self, url: str = "127.0.0.1:8001", timeout: float = 600, max_in_flight: int = 64,
                 num_frames: int = DEFAULT_FRAMES):
        self.url, self.timeout, self.max_in_flight, self.num_frames = url, timeout, max_in_flight, num_frames
        self._media: dict[str, bytes] = {}  # multi_modal_uuids already sent, so a later prompt may omit the data

    def generate(self, prompts, sampling_params: SamplingParams | None = None, use_tqdm: bool | None = None
                 ) -> list[RequestOutput]:
        """`prompts`: one or a list of prompt strings or {"prompt", "multi_modal_data", "multi_modal_uuids"}
        dicts. Each `<image>` in a prompt takes the next image; each `<video>` the next video's frames."""
        prompts = prompts if isinstance(prompts, list) else [prompts]
        requests = [self._build(p, i) for i, p in enumerate(prompts)]
        texts = [r[0] for r in requests]
        sampling = (sampling_params or SamplingParams()).to_dict()
        builds = [lambda r=r: protocol.grpc_inputs(r[0], r[1], True, sampling, returns=protocol.EXTRA_OUTPUTS)
                  for r in requests]
        return self._run(builds, texts, use_tqdm)

    def chat(self, messages, sampling_params: SamplingParams | None = None, use_tqdm: bool | None = None
             ) -> list[RequestOutput]:
        """OpenAI-style messages (one conversation, or a list of them), rendered by the server with the
        checkpoint's chat template; images and videos in any form the client takes."""
        batch = messages if messages and isinstance(messages[0], list) else [messages]
        sampling = (sampling_params or SamplingParams()).to_dict()
        builds = [lambda m=m: self._chat_inputs(m, sampling) for m in batch]
        return self._run(builds, batch, use_tqdm)

    def _chat_inputs(self, messages: list[dict], sampling: dict):
        packed = pack(from_prompt(messages), self.num_frames)
        return protocol.grpc_inputs(None, packed.images, True, sampling, returns=protocol.EXTRA_OUTPUTS,
                                    messages=packed.messages)

    def _run(self, builds, prompts, use_tqdm) -> list[RequestOutput]:
        progress = len(builds) >= PROGRESS_FROM if use_tqdm is None else use_tqdm
        done = protocol.complete_all(self.url, builds, self.timeout, self.max_in_flight, progress)
        return [RequestOutput(str(i), p, [CompletionOutput(0, c.text, c.finish_reason, c.num_output_tokens)],
                              c.num_input_tokens) for i, (p, c) in enumerate(zip(prompts, done))]

    def _build(self, prompt, index: int) -> tuple[str, list[bytes]]:
        """(text_input with each <video> expanded, the `image` elements in placeholder order)."""
        where = f"prompts[{index}]"
        if isinstance(prompt, str):
            return prompt, []
        if not isinstance(prompt, dict) or not isinstance(prompt.get("prompt"), str):
            raise ValueError(f"{where}: expected a string or a dict with a 'prompt' string")
        data = prompt.get("multi_modal_data") or {}
        uuids = prompt.get("multi_modal_uuids") or {}
        unknown = set(data) - {"image", "video"}
        if unknown:
            raise ValueError(f"{where}.multi_modal_data: unsupported modality {sorted(unknown)[0]!r}")
        images = [self._image(im, uid, f"{where}.multi_modal_data.image[{k}]")
                  for k, (im, uid) in enumerate(_items(data.get("image"), uuids.get("image")))]
        videos = [video_frames(v, self.num_frames, f"{where}.multi_modal_data.video[{k}]")
                  for k, v in enumerate(_videos(data.get("video")))]
        return _interleave(prompt["prompt"], images, videos, where)

    def _image(self, image, uid: str | None, where: str) -> bytes:
        if image is None:
            if uid not in self._media:
                raise ValueError(f"{where}: no data, and uuid {uid!r} was not sent before")
            return self._media[uid]
        data = image_bytes(image, where)
        if uid is not None:
            self._media[uid] = data
        return data


def _as_list(x) -> list:
    return [] if x is None else list(x) if isinstance(x, list) else [x]


def _videos(x) -> list:
    """One video (a file, or its frames: a list of images or a TxHxWx3 array), or a list of videos."""
    first = x[0] if isinstance(x, list) and x else None
    if isinstance(first, Image.Image) or (isinstance(first, np.ndarray) and first.ndim == 3):
        return [x]  # one video's frames
    return _as_list(x)


def _items(data, uuids) -> list[tuple]:
    """(item, uuid) pairs; an item of None is one sent before under its uuid."""
    data, uuids = _as_list(data), _as_list(uuids)
    if uuids and not data:
        data = [None] * len(uuids)
    if uuids and len(uuids) != len(data):
        raise ValueError(f"multi_modal_uuids: {len(uuids)} uuids for {len(data)} items")
    return list(zip(data, uuids or [None] * len(data)))


def _interleave(text: str, images: list[bytes], videos: list[list[bytes]], where: str) -> tuple[str, list[bytes]]:
    """The `image` input in placeholder order, each <video> replaced by its frames' placeholders."""
    marks = re.findall(f"{re.escape(IMAGE_PLACEHOLDER)}|{re.escape(VIDEO_PLACEHOLDER)}", text)
    n_img, n_vid = marks.count(IMAGE_PLACEHOLDER), marks.count(VIDEO_PLACEHOLDER)
    if (n_img, n_vid) != (len(images), len(videos)):
        raise ValueError(f"{where}: the prompt has {n_img} {IMAGE_PLACEHOLDER} and {n_vid} {VIDEO_PLACEHOLDER} "
                         f"placeholders for {len(images)} images and {len(videos)} videos")
    out, img, vid = [], iter(images), iter(videos)
    for mark in marks:
        out += [next(img)] if mark == IMAGE_PLACEHOLDER else next(vid)
    for frames in videos:
        text = text.replace(VIDEO_PLACEHOLDER, "\n".join([IMAGE_PLACEHOLDER] * len(frames)), 1)
    return text, out
