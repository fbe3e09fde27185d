import pytest

from triton_vlm.engine.sampling_params import SamplingParams


def test_defaults_follow_vllm():
    p = SamplingParams.from_json(None)
    assert (p.max_tokens, p.temperature, p.top_p, p.top_k, p.seed) == (16, 1.0, 1.0, 0, None)
    assert not p.greedy


def test_strings_are_accepted_like_the_vllm_backend():
    p = SamplingParams.from_json('{"max_tokens": "7", "temperature": "0", "top_p": "0.5", "ignore_eos": "true"}')
    assert (p.max_tokens, p.temperature, p.top_p, p.ignore_eos, p.greedy) == (7, 0.0, 0.5, True, True)


def test_round_trip_through_json():
    p = SamplingParams(max_tokens=3, temperature=0.7, top_k=5, seed=9, stop_token_ids=[2])
    assert SamplingParams.from_json(p.to_json()) == p


@pytest.mark.parametrize("text,message", [
    ("not json", "sampling_parameters: not valid JSON"),
    ("[1]", "expected a JSON object"),
    ('{"max_tokens": 0}', "sampling_parameters.max_tokens: must be >= 1"),
    ('{"max_tokens": 1.5}', "sampling_parameters.max_tokens: invalid value"),
    ('{"top_p": 0}', "sampling_parameters.top_p: must be in"),
    ('{"top_k": -2}', "sampling_parameters.top_k"),
    ('{"temperature": true}', "sampling_parameters.temperature: invalid value"),
    ('{"stop_token_ids": 3}', "sampling_parameters.stop_token_ids: invalid value"),
    ('{"frequency_penalty": 1}', "sampling_parameters.frequency_penalty: not supported yet"),
    ('{"bogus": 1}', "sampling_parameters.bogus: unknown"),
])
def test_bad_values_name_the_field(text, message):
    with pytest.raises(ValueError, match=message):
        SamplingParams.from_json(text)
