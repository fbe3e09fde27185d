"""OpenAI's sampling fields through the OpenAI server onto the engine's full sampler (n, stop, seed, logprobs,
response_format), with the official `openai` package against the toy model."""
from __future__ import annotations

import json
import math
import time

import pytest
from test_openai_api import ask, fresh_scene

from triton_vlm.toy.scenes import COLOURS

CAPTION = "Describe the image."


@pytest.fixture(scope="module")
def image_size() -> int:
    from helpers import TOY_CHECKPOINT
    from transformers import AutoProcessor

    from triton_vlm.toy import evaluate as ev

    return ev.image_size(AutoProcessor.from_pretrained(TOY_CHECKPOINT))


def test_n_completions_each_with_their_own_index(sdk, image_size):
    example = fresh_scene(f"sampling-n-{time.time_ns()}", image_size)
    reply = sdk.chat.completions.create(model="toy-vlm", messages=ask(example), n=3, temperature=1.0, seed=5,
                                        max_tokens=12)
    assert [c.index for c in reply.choices] == [0, 1, 2]
    assert all(c.finish_reason in ("stop", "length") for c in reply.choices)
    chunks = list(sdk.chat.completions.create(model="toy-vlm", messages=ask(example), n=2, temperature=0,
                                              max_tokens=12, stream=True))
    texts = ["", ""]
    for chunk in chunks:
        for choice in chunk.choices:
            texts[choice.index] += choice.delta.content or ""
    assert [t.strip() for t in texts] == [example.answer] * 2  # greedy: both completions are the answer


def test_seed_reproduces_and_stop_cuts_the_text(sdk, image_size):
    example = fresh_scene(f"sampling-seed-{time.time_ns()}", image_size)
    messages = ask(example)
    messages[0]["content"][1]["text"] = CAPTION
    once, again = (sdk.chat.completions.create(model="toy-vlm", messages=messages, temperature=1.5, seed=1234,
                                               max_tokens=20).choices[0].message.content for _ in range(2))
    assert once == again
    full = sdk.chat.completions.create(model="toy-vlm", messages=messages, temperature=0, max_tokens=20)
    cut = sdk.chat.completions.create(model="toy-vlm", messages=messages, temperature=0, max_tokens=20,
                                      stop=[" and"])
    text = full.choices[0].message.content
    if " and" in text:  # a caption of two or more shapes
        assert cut.choices[0].message.content == text[:text.index(" and")]
        assert cut.choices[0].finish_reason == "stop"


def test_logprobs_of_a_greedy_answer(sdk, image_size):
    example = fresh_scene(f"sampling-logprobs-{time.time_ns()}", image_size)
    reply = sdk.chat.completions.create(model="toy-vlm", messages=ask(example), temperature=0, max_tokens=12,
                                        logprobs=True, top_logprobs=3)
    choice = reply.choices[0]
    tokens = choice.logprobs.content
    assert "".join(t.token for t in tokens) == choice.message.content
    for t in tokens:
        assert len(t.top_logprobs) == 3
        assert t.top_logprobs[0].token == t.token and t.top_logprobs[0].logprob == pytest.approx(t.logprob)
        assert [x.logprob for x in t.top_logprobs] == sorted((x.logprob for x in t.top_logprobs), reverse=True)
        assert sum(math.exp(x.logprob) for x in t.top_logprobs) <= 1 + 1e-4
    assert reply.usage.completion_tokens == len(tokens)


def test_completions_logprobs(sdk):
    reply = sdk.completions.create(model="toy-vlm", prompt="USER: How many shapes are there?\nASSISTANT:",
                                   max_tokens=4, temperature=0, logprobs=2)
    lp = reply.choices[0].logprobs
    assert "".join(lp.tokens) == reply.choices[0].text
    assert len(lp.token_logprobs) == len(lp.tokens) == len(lp.top_logprobs)


def test_choice_constraint_still_names_the_right_colour(sdk, image_size):
    example = fresh_scene(f"sampling-choice-{time.time_ns()}", image_size)
    # With the space the toy model puts before every answer word: it was never trained without it.
    reply = sdk.chat.completions.create(model="toy-vlm", messages=ask(example), temperature=0, max_tokens=8,
                                        extra_body={"guided_choice": [" " + c for c in COLOURS]})
    assert reply.choices[0].message.content == " " + example.answer


def test_json_schema_response_format_parses(sdk, image_size):
    example = fresh_scene(f"sampling-json-{time.time_ns()}", image_size)
    schema = {"type": "object", "properties": {"colour": {"enum": list(COLOURS)}}, "required": ["colour"],
              "additionalProperties": False}
    reply = sdk.chat.completions.create(model="toy-vlm", messages=ask(example), temperature=0, max_tokens=40,
                                        response_format={"type": "json_schema",
                                                         "json_schema": {"name": "answer", "schema": schema}})
    answer = json.loads(reply.choices[0].message.content)
    # Valid by the schema; which colour is the toy model's guess: it never answered in JSON in training.
    assert set(answer) == {"colour"} and answer["colour"] in COLOURS
    # Any JSON object: the toy model, which never saw JSON, fills it until max_tokens, but in JSON's syntax.
    reply = sdk.chat.completions.create(model="toy-vlm", messages=ask(example), temperature=0, max_tokens=20,
                                        response_format={"type": "json_object"})
    text, reason = reply.choices[0].message.content, reply.choices[0].finish_reason
    assert text.startswith("{") and (reason == "length" or isinstance(json.loads(text), dict))
