"""vlm's `messages` input on a real tritonserver: the checkpoint's template, images from any turn, videos as frames."""
from __future__ import annotations

import base64
import json
import random

import pytest
from helpers import TOY_CHECKPOINT
from test_bad_input import Raw, send_grpc, send_http
from test_video import make_video

from triton_vlm.preprocess import decode_image
from triton_vlm.toy import evaluate as ev
from triton_vlm.toy.scenes import sample_example
from triton_vlm.video import sample_frames

GREEDY = json.dumps({"max_tokens": 12, "temperature": 0})


def data_url(png: bytes) -> str:
    return "data:image/png;base64," + base64.b64encode(png).decode()


def hf_answer(hf, messages_for_template: list[dict], images: list, max_new_tokens: int = 12) -> str:
    """transformers' own LLaVA on the prompt its processor renders for the same conversation."""
    import torch

    prompt = hf.processor.apply_chat_template(messages_for_template, add_generation_prompt=True, tokenize=False)
    inputs = hf.processor(text=prompt, images=images or None, return_tensors="pt")
    with torch.no_grad():
        out = hf.model.generate(**inputs, max_new_tokens=max_new_tokens, do_sample=False)
    return hf.processor.decode(out[0, inputs["input_ids"].shape[1]:], skip_special_tokens=True)


@pytest.mark.parametrize("protocol", ["grpc", "http"])
def test_multi_turn_chat_with_images_in_two_turns_matches_hf(tiny_server, hf_tiny, photos, protocol):
    cat, astronaut = photos["chelsea"], photos["astronaut"]
    messages = [
        {"role": "system", "content": "You are terse."},
        {"role": "user", "content": [{"type": "text", "text": "What is in this picture?"},
                                     {"type": "image_url", "image_url": {"url": data_url(cat)}}]},
        {"role": "assistant", "content": "A cat."},
        {"role": "user", "content": [{"type": "image_url", "image_url": {"url": "#0"}},
                                     {"type": "image_url", "image_url": {"url": "#1"}},
                                     {"type": "text", "text": "How do these two pictures differ?"}]},
    ]
    template = [
        {"role": "user", "content": [{"type": "text", "text": "What is in this picture?"}, {"type": "image"}]},
        {"role": "assistant", "content": "A cat."},
        {"role": "user", "content": [{"type": "image"}, {"type": "image"},
                                     {"type": "text", "text": "How do these two pictures differ?"}]},
    ]
    expected = hf_answer(hf_tiny, template, [decode_image(b) for b in (cat, astronaut, photos["coffee"])])
    inputs = {"messages": json.dumps(messages), "image": [Raw(astronaut), Raw(photos["coffee"])],
              "sampling_parameters": GREEDY}
    send = send_grpc if protocol == "grpc" else send_http
    assert send(tiny_server.grpc_url if protocol == "grpc" else tiny_server.http_url, inputs) == expected


def test_video_is_sent_as_frames_in_placeholder_layout(tiny_server, hf_tiny):
    video = make_video(24, size=40)
    url = "data:video/mp4;base64," + base64.b64encode(video).decode()
    messages = [{"role": "user", "content": [{"type": "video_url", "video_url": {"url": url, "num_frames": 3}},
                                             {"type": "text", "text": "What is in this picture?"}]}]
    template = [{"role": "user", "content": [{"type": "image"}] * 3 + [{"type": "text",
                                                                        "text": "What is in this picture?"}]}]
    expected = hf_answer(hf_tiny, template, sample_frames(video, 3))
    got = send_grpc(tiny_server.grpc_url, {"messages": json.dumps(messages), "sampling_parameters": GREEDY})
    assert got == expected


@pytest.mark.parametrize("seed", [1, 2, 3])
def test_toy_model_answers_a_fresh_scene_through_messages(toy_server, seed):
    from transformers import AutoProcessor

    size = ev.image_size(AutoProcessor.from_pretrained(TOY_CHECKPOINT))
    example = sample_example(random.Random(f"messages-{seed}"), size, "colour")
    messages = [{"role": "user", "content": [
        {"type": "image_url", "image_url": {"url": data_url(ev.png_bytes(example.image))}},
        {"type": "text", "text": example.question}]}]
    answer = send_grpc(toy_server.grpc_url, {"messages": json.dumps(messages), "sampling_parameters": GREEDY})
    assert answer.strip() == example.answer
