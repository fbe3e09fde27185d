"""OpenAI request fields -> vLLM sampling_parameters, vLLM-backend logprobs -> OpenAI's, error objects."""
from __future__ import annotations

import pytest

from triton_vlm.openai_protocol import (APIError, chat_logprobs, completion_logprobs, error_body,
                                        sampling_parameters)


def test_openai_fields_map_onto_vllm_names():
    body = {"max_completion_tokens": 20, "max_tokens": 5, "temperature": 0.5, "top_p": 0.9, "seed": 7, "n": 3,
            "stop": "\n", "logprobs": True, "top_logprobs": 2, "presence_penalty": 0, "frequency_penalty": 0.5,
            "logit_bias": {"5": -100}, "top_k": 4, "min_p": 0.1, "repetition_penalty": 1.1, "ignore_eos": True,
            "user": "someone", "metadata": {"a": "b"}}
    assert sampling_parameters(body, chat=True) == {
        "max_tokens": 20, "temperature": 0.5, "top_p": 0.9, "seed": 7, "n": 3, "stop": ["\n"], "logprobs": 2,
        "frequency_penalty": 0.5, "logit_bias": {"5": -100}, "top_k": 4, "min_p": 0.1, "repetition_penalty": 1.1,
        "ignore_eos": True}


def test_defaults_stay_out_and_max_tokens_defaults_to_the_context():
    assert sampling_parameters({"n": 1, "stop": None}, chat=True, default_max_tokens=2048) == {"max_tokens": 2048}
    assert sampling_parameters({"max_tokens": 3}, chat=True, default_max_tokens=2048) == {"max_tokens": 3}
    # Completions: logprobs is the number of top logprobs; max_completion_tokens is a chat field.
    assert sampling_parameters({"logprobs": 0, "max_completion_tokens": 9}, chat=False) == {"logprobs": 0}


@pytest.mark.parametrize("body, structured", [
    ({"response_format": {"type": "json_object"}}, {"json_object": True}),
    ({"response_format": {"type": "json_schema", "json_schema": {"name": "x", "schema": {"type": "integer"}}}},
     {"json": {"type": "integer"}}),
    ({"response_format": {"type": "text"}}, None),
    ({"guided_choice": ["yes", "no"]}, {"choice": ["yes", "no"]}),
    ({"guided_regex": "[0-9]+"}, {"regex": "[0-9]+"}),
    ({"structured_outputs": {"grammar": "root ::= 'a'"}}, {"grammar": "root ::= 'a'"}),
])
def test_response_format_and_guided_fields_become_structured_outputs(body, structured):
    assert sampling_parameters(body, chat=True).get("structured_outputs") == structured


@pytest.mark.parametrize("body, error", [
    ({"tools": [{"type": "function"}]}, "tools: not supported"),
    ({"response_format": {"type": "yaml"}}, "response_format.type: must be text, json_object or json_schema"),
    ({"response_format": {"type": "json_schema", "json_schema": {}}}, "response_format.json_schema.schema"),
    ({"top_logprobs": 3}, "top_logprobs: needs logprobs set to true"),
])
def test_unsupported_fields_are_refused_by_name(body, error):
    with pytest.raises(APIError, match=error) as info:
        sampling_parameters(body, chat=True)
    assert info.value.status == 400


# Two generated tokens in the vLLM backend's layout, the sampled token first; top_logprobs 2.
POSITIONS = [
    {"42": {"logprob": -0.1, "rank": 1, "decoded_token": "red"},
     "7": {"logprob": -2.5, "rank": 2, "decoded_token": "blue"}},
    {"9": {"logprob": -3.0, "rank": 3, "decoded_token": "!"},  # sampled, but outside the top 2
     "2": {"logprob": -0.2, "rank": 1, "decoded_token": "</s>"},
     "5": {"logprob": -1.9, "rank": 2, "decoded_token": "."}},
]


def test_chat_logprobs_follow_openai():
    content = chat_logprobs(POSITIONS, top=2)["content"]
    assert [(c["token"], c["logprob"]) for c in content] == [("red", -0.1), ("!", -3.0)]
    assert content[0]["bytes"] == list(b"red")
    assert [t["token"] for t in content[0]["top_logprobs"]] == ["red", "blue"]
    assert [t["token"] for t in content[1]["top_logprobs"]] == ["</s>", "."]
    assert chat_logprobs(POSITIONS, top=0)["content"][1]["top_logprobs"] == []
    assert chat_logprobs(None) is None


def test_completion_logprobs_follow_openai():
    out = completion_logprobs(POSITIONS, offset=4)
    assert out["tokens"] == ["red", "!"] and out["token_logprobs"] == [-0.1, -3.0]
    assert out["text_offset"] == [4, 7]
    assert out["top_logprobs"][1] == {"</s>": -0.2, ".": -1.9, "!": -3.0}


def test_error_body_names_the_field():
    body = error_body(APIError(400, "messages[2].content[1].image_url: not a decodable image"))
    assert body["error"]["param"] == "messages[2].content[1].image_url"
    assert body["error"]["type"] == "invalid_request_error" and body["error"]["code"] == 400
    assert error_body(APIError(400, "temperature: must be a finite number"))["error"]["param"] == "temperature"
    assert error_body(APIError(400, "image[1]: not referenced"))["error"]["param"] == "image[1]"
    assert error_body(APIError(400, "llm: input_ids: too long"))["error"]["param"] is None
    busy = error_body(APIError(503, "server busy: 320 requests in flight"))["error"]
    assert busy["type"] == "service_unavailable" and busy["param"] is None
