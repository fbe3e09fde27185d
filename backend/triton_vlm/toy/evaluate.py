"""Exact-match evaluation of the toy VLM, in process (HF transformers) or through Triton."""
from __future__ import annotations

import io
from collections import defaultdict
from dataclasses import dataclass
from typing import Callable, Iterable

from PIL import Image

from triton_vlm.toy.scenes import QTYPES, held_out, held_out_chats

# Minimum exact-match accuracy per question type; captions are reported, not gated. "follow-up" is any
# question after the first in a chat about one image, scored with the model's own earlier answers as history.
TARGETS = {"colour": 0.95, "shape": 0.95, "count": 0.95, "spatial": 0.85, "follow-up": 0.90}
CATEGORIES = (*QTYPES, "follow-up")
MAX_TOKENS = 16

Predict = Callable[[Image.Image, str], str]  # (image, chat-formatted prompt) -> answer text


@dataclass
class Result:
    qtype: str
    question: str
    answer: str
    prediction: str

    @property
    def correct(self) -> bool:
        return self.prediction.strip() == self.answer


def chat_prompt(processor, question: str, history: Iterable[tuple[str, str]] = ()) -> str:
    """The checkpoint's template applied to a chat about one image (shown with the first question):
    `history` holds the earlier (question, answer) turns."""
    messages = []
    for q, a in [*history, (question, None)]:
        image = [] if messages else [{"type": "image"}]
        messages.append({"role": "user", "content": image + [{"type": "text", "text": q}]})
        if a is not None:
            messages.append({"role": "assistant", "content": [{"type": "text", "text": a}]})
    return processor.apply_chat_template(messages, add_generation_prompt=True)


def image_size(processor) -> int:
    return processor.image_processor.crop_size["height"]


def hf_predictor(model, processor, max_tokens: int = MAX_TOKENS) -> Predict:
    import torch

    @torch.inference_mode()
    def predict(image: Image.Image, prompt: str) -> str:
        inputs = processor(images=image, text=prompt, return_tensors="pt")
        out = model.generate(**inputs, max_new_tokens=max_tokens, do_sample=False)
        return processor.decode(out[0, inputs["input_ids"].shape[1]:], skip_special_tokens=True).strip()

    return predict


def load_hf(checkpoint: str):
    """(model, processor) from a checkpoint directory, float32 on CPU."""
    import torch
    from transformers import AutoModelForImageTextToText, AutoProcessor

    processor = AutoProcessor.from_pretrained(checkpoint)
    model = AutoModelForImageTextToText.from_pretrained(checkpoint, dtype=torch.float32).eval()
    return model, processor


def png_bytes(image: Image.Image) -> bytes:
    buf = io.BytesIO()
    image.save(buf, format="PNG")
    return buf.getvalue()


def triton_predictor(url: str, max_tokens: int = MAX_TOKENS) -> Predict:
    """Each pair streamed through the server's `vlm` model over gRPC; a response error raises VLMError."""
    from triton_vlm import client

    greedy = {"max_tokens": max_tokens, "temperature": 0}

    def predict(image: Image.Image, prompt: str) -> str:
        return client.generate_grpc(url, prompt, [png_bytes(image)], greedy, stream=True).strip()

    return predict


def evaluate(predict: Predict, processor, n: int = 500, seed: int = 0) -> list[Result]:
    prompts: dict[str, str] = {}
    results = []
    for image, question, answer, qtype in held_out(n, image_size(processor), seed):
        prompt = prompts.setdefault(question, chat_prompt(processor, question))
        results.append(Result(qtype, question, answer, predict(image, prompt)))
    return results


def evaluate_chats(predict: Predict, processor, n: int = 100, seed: int = 0) -> list[Result]:
    """Held-out chats of two or three turns, asked as a user would (each answer the model gave becomes history);
    one "follow-up" result per question after the first."""
    results = []
    for image, chat in held_out_chats(n, image_size(processor), seed):
        history: list[tuple[str, str]] = []
        for turn in chat:
            prediction = predict(image, chat_prompt(processor, turn.question, history))
            if history:
                results.append(Result("follow-up", turn.question, turn.answer, prediction))
            history.append((turn.question, prediction.strip()))
    return results


def accuracy(results: Iterable[Result]) -> dict[str, tuple[int, int]]:
    """qtype -> (n, correct), plus "overall"."""
    stats: dict[str, list[int]] = defaultdict(lambda: [0, 0])
    for r in results:
        for key in (r.qtype, "overall"):
            stats[key][0] += 1
            stats[key][1] += r.correct
    order = [q for q in CATEGORIES if q in stats] + ["overall"]
    return {k: (stats[k][0], stats[k][1]) for k in order if k in stats}


def table(results: list[Result], title: str = "") -> str:
    lines = [title] if title else []
    lines.append(f"{'type':<10}{'n':>6}{'correct':>9}{'accuracy':>10}{'target':>8}")
    for qtype, (n, ok) in accuracy(results).items():
        target = f"{TARGETS[qtype]:.0%}" if qtype in TARGETS else "-"
        lines.append(f"{qtype:<10}{n:>6}{ok:>9}{ok / n:>10.1%}{target:>8}")
    return "\n".join(lines)


def missed_targets(results: list[Result]) -> list[str]:
    acc = accuracy(results)
    return [f"{q}: {acc[q][1] / acc[q][0]:.1%} < {t:.0%}" for q, t in TARGETS.items()
            if q in acc and acc[q][1] / acc[q][0] < t]
