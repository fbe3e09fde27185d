"""OpenAI chat messages: parts resolved in placeholder order, rendered by the checkpoint's template, errors by field."""
from __future__ import annotations

import base64
import json

import numpy as np
import pytest
from helpers import TOY_CHECKPOINT, rng_image
from test_video import level, make_video

from triton_vlm.messages import parse_messages
from triton_vlm.preprocess import Preprocessor

PNG = rng_image(1)
DATA_URL = "data:image/png;base64," + base64.b64encode(PNG).decode()
VIDEO_URL = "data:video/mp4;base64," + base64.b64encode(make_video(20)).decode()


@pytest.fixture(scope="module")
def pre() -> Preprocessor:
    return Preprocessor(TOY_CHECKPOINT)


def image(url: str) -> dict:
    return {"type": "image_url", "image_url": {"url": url}}


def test_multi_turn_with_images_in_two_turns(pre):
    other = rng_image(2)
    messages = [
        {"role": "system", "content": "Answer in one word."},
        {"role": "user", "content": [{"type": "text", "text": "What colour is the circle?"}, image("#1"),
                                     image(DATA_URL)]},
        {"role": "assistant", "content": "red"},
        {"role": "user", "content": [image("#0"), {"type": "text", "text": "And here?"}]},
    ]
    chat = parse_messages(json.dumps(messages), [other, PNG])
    # Images in message order, and in part order inside a message.
    assert [m.data for m in chat.media] == [PNG, DATA_URL.encode(), other]
    assert [m.field for m in chat.media] == ["messages[1].content[1].image_url", "messages[1].content[2].image_url",
                                             "messages[3].content[0].image_url"]
    # The toy template has no system turn: it drops it, as the checkpoint's own processor does.
    assert pre.chat_prompt(chat.messages) == (
        "USER: <image>\n<image>\nWhat colour is the circle?\nASSISTANT: red</s>\nUSER: <image>\nAnd here?\nASSISTANT:")


def test_same_prompt_as_the_processor_for_its_own_format(pre):
    from transformers import AutoProcessor

    processor = AutoProcessor.from_pretrained(TOY_CHECKPOINT)
    ours = [{"role": "user", "content": [image(DATA_URL), {"type": "text", "text": "Describe the image."}]}]
    theirs = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "Describe the image."}]}]
    assert pre.chat_prompt(parse_messages(ours).messages) == processor.apply_chat_template(
        theirs, add_generation_prompt=True, tokenize=False)


def test_system_is_honoured_where_the_template_has_it(pre):
    template = ("{% for m in messages %}<{{ m['role'] }}>{% for p in m['content'] %}"
                "{% if p['type'] == 'text' %}{{ p['text'] }}{% else %}<image>{% endif %}{% endfor %}{% endfor %}"
                "{% if add_generation_prompt %}<assistant>{% endif %}")
    messages = [{"role": "developer", "content": "Be brief."}, {"role": "user", "content": "Hi"}]
    chat = parse_messages(messages)
    assert pre.tokenizer.apply_chat_template(chat.messages, chat_template=template, add_generation_prompt=True,
                                             tokenize=False) == "<system>Be brief.<user>Hi<assistant>"


def test_video_becomes_its_frames_in_placeholder_layout(pre):
    messages = [{"role": "user", "content": [
        {"type": "video_url", "video_url": {"url": VIDEO_URL, "num_frames": 4}},
        {"type": "text", "text": "What happens?"}]}]
    chat = parse_messages(messages)
    assert [level(m.data) for m in chat.media] == [0, 6, 13, 19]
    assert pre.chat_prompt(chat.messages) == "USER: " + "<image>\n" * 4 + "What happens?\nASSISTANT:"
    assert {m.field for m in chat.media} == {"messages[0].content[0].video_url"}


def test_a_short_video_gives_fewer_placeholders(pre):
    short = "data:video/mp4;base64," + base64.b64encode(make_video(3)).decode()
    chat = parse_messages([{"role": "user", "content": [{"type": "video_url", "video_url": {"url": short}}]}])
    assert len(chat.media) == 3
    assert pre.chat_prompt(chat.messages).count("<image>") == 3


def user(*parts) -> list[dict]:
    return [{"role": "user", "content": list(parts)}]


TEXT = {"type": "text", "text": "hi"}
BAD = [
    ("not json", "not JSON", r"^messages: not valid JSON"),
    ("empty list", [], r"^messages: expected a non-empty JSON array"),
    ("object", {"role": "user"}, r"^messages: expected a non-empty JSON array"),
    ("message not object", ["hi"], r"^messages\[0\]: expected an object"),
    ("bad role", [{"role": "tool", "content": "x"}], r"^messages\[0\]\.role: must be one of"),
    ("content number", [{"role": "user", "content": 3}], r"^messages\[0\]\.content: expected a string or a list"),
    ("part type", user(TEXT, {"type": "input_audio"}), r"^messages\[0\]\.content\[1\]: unsupported content part "
                                                       r"\"input_audio\""),
    ("text not string", user({"type": "text", "text": 5}), r"^messages\[0\]\.content\[0\]\.text: expected a string"),
    ("placeholder in text", user({"type": "text", "text": "look <image>"}),
     r"^messages\[0\]\.content\[0\]\.text: contains the image placeholder <image>"),
    ("placeholder in string content", [{"role": "user", "content": "<image> what"}],
     r"^messages\[0\]\.content: contains the image placeholder"),
    ("image_url missing url", user({"type": "image_url", "image_url": {}}),
     r"^messages\[0\]\.content\[0\]\.image_url: expected \{\"url\""),
    ("http url", user(image("https://example.com/cat.png")),
     r"^messages\[0\]\.content\[0\]\.image_url: URLs are not fetched by this server"),
    ("file url", user(image("file:///etc/passwd")), r"^messages\[0\]\.content\[0\]\.image_url: URLs are not fetched"),
    ("ref out of range", user(image("#1")),
     r"^messages\[0\]\.content\[0\]\.image_url: \"#1\" but the image input has 1 element"),
    ("neither url nor ref", user(image("cat.png")), r"^messages\[0\]\.content\[0\]\.image_url: expected a data: URL"),
    ("image in assistant", [{"role": "user", "content": "hi"}, {"role": "assistant", "content": [image("#0")]}],
     r"^messages\[1\]\.content\[0\]\.image_url: images and videos go in user messages, not assistant"),
    ("too many images", user(*[image("#0")] * 9), r"^messages: 9 images \(video frames included\) exceed the limit "
                                                  r"of 8 per request \(max_images_per_request\)"),
    ("too many frames", user(image("#0"), {"type": "video_url", "video_url": {"url": VIDEO_URL}}),
     r"^messages: 9 images \(video frames included\)"),
    ("num_frames zero", user(image("#0"), {"type": "video_url", "video_url": {"url": VIDEO_URL, "num_frames": 0}}),
     r"^messages\[0\]\.content\[1\]\.video_url\.num_frames: must be an integer in \[1, 64\]"),
    ("video not a video", user(image("#0"), {"type": "video_url", "video_url": {"url": "data:video/mp4;base64,AAAA", "num_frames": 2}}),
     r"^messages\[0\]\.content\[1\]\.video_url: not a decodable video"),
    ("image unused", user(TEXT), r"^image\[0\]: not referenced by any image_url \"#0\""),
]


@pytest.mark.parametrize("raw, error", [(raw, error) for _, raw, error in BAD], ids=[b[0] for b in BAD])
def test_bad_messages_name_the_message_and_part(raw, error):
    with pytest.raises(ValueError, match=error):
        parse_messages(json.dumps(raw) if not isinstance(raw, str) else raw, [PNG])


def test_frames_are_sampled_only_after_the_count_check(monkeypatch):
    from triton_vlm import video

    monkeypatch.setattr(video, "sample_frames", lambda *a, **k: pytest.fail("decoded a video beyond the limit"))
    with pytest.raises(ValueError, match="max_images_per_request"):
        parse_messages(user({"type": "video_url", "video_url": {"url": VIDEO_URL, "num_frames": 9}}))


def test_frames_keep_their_pixels():
    chat = parse_messages(user({"type": "video_url", "video_url": {"url": VIDEO_URL, "num_frames": 2}}))
    assert [np.asarray(m.data).shape for m in chat.media] == [(32, 32, 3)] * 2


def test_native_video_stays_one_part_with_its_frames():
    """For families that take video natively (Qwen2-VL): one video part, one Media holding the frames."""
    messages = [{"role": "user", "content": [{"type": "video_url", "video_url": {"url": VIDEO_URL, "num_frames": 4}},
                                             {"type": "text", "text": "What happens?"}]}]
    chat = parse_messages(messages, native_video=True)
    assert chat.messages[0]["content"] == [{"type": "video"}, {"type": "text", "text": "What happens?"}]
    (media,) = chat.media
    assert isinstance(media.data, list) and len(media.data) == 4
