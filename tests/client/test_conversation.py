"""Prompts in LMDeploy's forms become OpenAI messages; media move into the `image` input as #N."""
from __future__ import annotations

import json

import numpy as np
import pytest
from PIL import Image

from triton_vlm.client import media
from triton_vlm.client.conversation import from_prompt, pack

RED = Image.new("RGB", (8, 8), (255, 0, 0))
BLUE = Image.new("RGB", (8, 8), (0, 0, 255))


def test_tuples_in_either_order_become_one_user_message():
    for prompt in (("What is it?", RED), (RED, "What is it?")):
        (message,) = from_prompt(prompt)
        assert message["role"] == "user"
        assert [p["type"] for p in message["content"]] == ["image_url", "text"]
        assert message["content"][0]["image_url"]["url"] is RED
    (message,) = from_prompt(("Compare.", [RED, BLUE]))
    assert [p["type"] for p in message["content"]] == ["image_url", "image_url", "text"]
    assert from_prompt(("scene.png", "What is it?"))[0]["content"][0]["image_url"]["url"] == "scene.png"
    assert from_prompt("Hello") == [{"role": "user", "content": [{"type": "text", "text": "Hello"}]}]
    with pytest.raises(ValueError, match="^prompt: "):
        from_prompt(42)


def test_pack_numbers_images_in_order_across_turns():
    messages = [*from_prompt(("Compare.", [RED, BLUE])), {"role": "assistant", "content": "red and blue"},
                {"role": "user", "content": [{"type": "image", "image": BLUE}, {"type": "text", "text": "And this?"}]}]
    packed = pack(messages)
    sent = json.loads(packed.messages)
    urls = [p["image_url"]["url"] for m in sent if isinstance(m["content"], list) for p in m["content"]
            if p["type"] == "image_url"]
    assert urls == ["#0", "#1", "#2"]
    assert packed.images == [media.png(RED), media.png(BLUE), media.png(BLUE)]
    assert sent[1] == {"role": "assistant", "content": "red and blue"}
    assert sent[0]["content"][2] == {"type": "text", "text": "Compare."}


def test_pack_names_the_bad_part():
    with pytest.raises(ValueError, match=r"^messages\[0\]\.content\[1\]\.image_url: no url"):
        pack([{"role": "user", "content": [{"type": "text", "text": "hi"}, {"type": "image_url", "image_url": {}}]}])
    with pytest.raises(ValueError, match=r"^messages\[0\]\.content\[0\]\.image_url: '#N'"):
        pack([{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "#0"}}]}])


def test_video_frames_become_image_parts():
    frames = [np.full((8, 8, 3), i * 10, np.uint8) for i in range(20)]
    packed = pack([{"role": "user", "content": [{"type": "video_url", "video_url": {"url": frames}},
                                                 {"type": "text", "text": "What happens?"}]}], frames=4)
    assert [p["image_url"]["url"] for p in json.loads(packed.messages)[0]["content"][:4]] == ["#0", "#1", "#2", "#3"]
    # Evenly spread, first and last included: frames 0, 6, 13, 19.
    assert [media.png(Image.fromarray(frames[i])) for i in (0, 6, 13, 19)] == packed.images
