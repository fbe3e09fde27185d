"""vLLM-style prompts: images and video frames in placeholder order, uuids for media sent before."""
from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from triton_vlm.client import LLM, SamplingParams, media

A, B = Image.new("RGB", (8, 8), (255, 0, 0)), Image.new("RGB", (8, 8), (0, 255, 0))


def test_sampling_params_send_only_what_was_given():
    assert SamplingParams().to_dict() == {}
    assert SamplingParams(temperature=0, max_tokens=64, stop=["."], extra={"min_tokens": 2}).to_dict() == \
        {"temperature": 0, "max_tokens": 64, "stop": ["."], "min_tokens": 2}


def test_images_and_video_frames_follow_the_placeholders():
    frames = [np.full((8, 8, 3), 40 * i, np.uint8) for i in range(3)]
    text, images = LLM(num_frames=2)._build(
        {"prompt": "USER: <image>\n<video>\n<image>\nSay.\nASSISTANT:",
         "multi_modal_data": {"image": [A, B], "video": frames}}, 0)
    assert text == "USER: <image>\n<image>\n<image>\n<image>\nSay.\nASSISTANT:"
    expected = [A, Image.fromarray(frames[0]), Image.fromarray(frames[2]), B]
    assert images == [media.png(im) for im in expected]


def test_placeholder_count_must_match():
    with pytest.raises(ValueError, match=r"^prompts\[3\]: the prompt has 2 <image> and 0 <video> placeholders for 1 "):
        LLM()._build({"prompt": "<image><image>", "multi_modal_data": {"image": A}}, 3)
    with pytest.raises(ValueError, match=r"^prompts\[0\]\.multi_modal_data: unsupported modality 'audio'"):
        LLM()._build({"prompt": "x", "multi_modal_data": {"audio": b""}}, 0)
    with pytest.raises(ValueError, match=r"^prompts\[1\]: expected a string or a dict"):
        LLM()._build({"text": "x"}, 1)


def test_uuids_let_a_later_prompt_leave_out_media_already_sent():
    llm = LLM()
    _, first = llm._build({"prompt": "<image>", "multi_modal_data": {"image": A},
                           "multi_modal_uuids": {"image": ["scene-a"]}}, 0)
    _, again = llm._build({"prompt": "<image>", "multi_modal_data": {"image": [None]},
                           "multi_modal_uuids": {"image": ["scene-a"]}}, 1)
    _, implicit = llm._build({"prompt": "<image>", "multi_modal_uuids": {"image": "scene-a"}}, 2)
    assert first == again == implicit == [media.png(A)]
    with pytest.raises(ValueError, match=r"^prompts\[4\]\.multi_modal_data\.image\[0\]: no data, and uuid 'b'"):
        llm._build({"prompt": "<image>", "multi_modal_uuids": {"image": ["b"]}}, 4)
