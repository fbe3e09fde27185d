import json
import queue
import re
from dataclasses import fields

import pytest
import torch
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

from triton_vlm.engine.config import EngineConfig
from triton_vlm.engine.llm_engine import LLMEngine
from triton_vlm.engine.sampling_params import NOT_SUPPORTED, SamplingParams

PROMPT = [1, 20, 21, 22]
LIMIT = 1000  # the server-wide max_tokens limit passed to from_json


def test_defaults_follow_vllm():
    p = SamplingParams.from_json(None)
    assert (p.max_tokens, p.temperature, p.top_p, p.top_k, p.seed) == (16, 1.0, 1.0, 0, None)
    assert not p.greedy


def test_strings_are_accepted_like_the_vllm_backend():
    p = SamplingParams.from_json('{"max_tokens": "7", "temperature": "0", "top_p": "0.5", "ignore_eos": "true"}')
    assert (p.max_tokens, p.temperature, p.top_p, p.ignore_eos, p.greedy) == (7, 0.0, 0.5, True, True)


def test_integral_numbers_become_ints_and_numbers_floats():
    p = SamplingParams.from_json('{"max_tokens": 2.0, "top_k": "3", "seed": "-5", "top_p": 1, "temperature": "1e-5",'
                                 ' "stop_token_ids": ["2", 3.0], "skip_special_tokens": true}')
    assert (p.max_tokens, p.top_k, p.seed, p.top_p, p.temperature, p.stop_token_ids) == (2, 3, -5, 1.0, 1e-5, [2, 3])
    assert [type(v) for v in (p.max_tokens, p.top_k, p.seed, p.top_p, p.temperature)] == [int, int, int, float, float]


def test_round_trip_through_json():
    p = SamplingParams(max_tokens=3, temperature=0.7, top_k=5, seed=9, stop_token_ids=[2])
    assert SamplingParams.from_json(p.to_json()) == p


def test_seed_range_is_what_torch_accepts():
    for seed in (-2**63, 2**64 - 1):
        torch.Generator().manual_seed(seed)
        assert SamplingParams.from_json(json.dumps({"seed": seed})).seed == seed
    for seed in (-2**63 - 1, 2**64):
        with pytest.raises((ValueError, RuntimeError)):
            torch.Generator().manual_seed(seed)
        with pytest.raises(ValueError, match=re.escape(f"sampling_parameters.seed: must be in [-2**63, 2**64 - 1], "
                                                       f"got {seed}")):
            SamplingParams.from_json(json.dumps({"seed": seed}))


@pytest.mark.parametrize("text,message", [
    ("not json", "sampling_parameters: not valid JSON"),
    (b"\xff{}", "sampling_parameters: not valid JSON"),
    ('{"max_tokens": ' + "9" * 5000 + "}", "sampling_parameters: not valid JSON"),
    ("[" * 100_000, "sampling_parameters: not valid JSON"),
    ("[1]", "sampling_parameters: expected a JSON object, got [1]"),
    ("null", "sampling_parameters: expected a JSON object, got null"),
    ('{"max_tokens": 0}', "sampling_parameters.max_tokens: must be >= 1, got 0"),
    ('{"max_tokens": 1.5}', "sampling_parameters.max_tokens: must be an integer, got 1.5"),
    ('{"max_tokens": "2.5"}', 'sampling_parameters.max_tokens: must be an integer, got "2.5"'),
    ('{"max_tokens": "abc"}', 'sampling_parameters.max_tokens: must be an integer, got "abc"'),
    ('{"max_tokens": true}', "sampling_parameters.max_tokens: must be an integer, got true"),
    ('{"max_tokens": null}', "sampling_parameters.max_tokens: must be an integer, got null"),
    ('{"max_tokens": 1e999}', "sampling_parameters.max_tokens: must be an integer, got Infinity"),
    ('{"temperature": NaN}', "sampling_parameters.temperature: must be a finite number, got NaN"),
    ('{"temperature": "nan"}', 'sampling_parameters.temperature: must be a finite number, got "nan"'),
    ('{"temperature": ' + "9" * 400 + "}", "sampling_parameters.temperature: must be a finite number"),
    ('{"temperature": 1e-40}', "sampling_parameters.temperature: must be 0 (greedy) or >= 1e-05, got 1e-40"),
    ('{"temperature": -1}', "sampling_parameters.temperature: must be 0 (greedy) or >= 1e-05, got -1.0"),
    ('{"temperature": true}', "sampling_parameters.temperature: must be a number, got true"),
    ('{"top_p": Infinity}', "sampling_parameters.top_p: must be a finite number, got Infinity"),
    ('{"top_p": 0}', "sampling_parameters.top_p: must be in (0, 1], got 0.0"),
    ('{"top_p": 1.5}', "sampling_parameters.top_p: must be in (0, 1], got 1.5"),
    ('{"top_k": -2}', "sampling_parameters.top_k: must be -1, 0 or positive, got -2"),
    ('{"top_k": 2.5}', "sampling_parameters.top_k: must be an integer, got 2.5"),
    ('{"seed": 1.5}', "sampling_parameters.seed: must be an integer or null, got 1.5"),
    ('{"seed": [1]}', "sampling_parameters.seed: must be an integer or null, got [1]"),
    ('{"ignore_eos": "maybe"}', 'sampling_parameters.ignore_eos: must be true or false, got "maybe"'),
    ('{"stop_token_ids": 3}', "sampling_parameters.stop_token_ids: must be a list of token ids, got 3"),
    ('{"stop_token_ids": [1, -1]}', "sampling_parameters.stop_token_ids[1]: must be a non-negative token id, got -1"),
    ('{"stop_token_ids": [1.5]}', "sampling_parameters.stop_token_ids[0]: must be a token id (an integer), got 1.5"),
    (json.dumps({"stop_token_ids": [2] * 1025}), "sampling_parameters.stop_token_ids: must hold at most 1024"),
    ('{"skip_special_tokens": 3}', "sampling_parameters.skip_special_tokens: must be true or false, got 3"),
    ('{"best_of": 2}', "sampling_parameters.best_of: not supported"),
    ('{"n": 0}', "sampling_parameters.n: must be in [1, 16], got 0"),
    ('{"n": 17}', "sampling_parameters.n: must be in [1, 16], got 17"),
    ('{"min_tokens": 5, "max_tokens": 4}', "sampling_parameters.min_tokens: must be in [0, max_tokens], got 5"),
    ('{"min_p": 1.5}', "sampling_parameters.min_p: must be in [0, 1], got 1.5"),
    ('{"min_p": NaN}', "sampling_parameters.min_p: must be a finite number, got NaN"),
    ('{"presence_penalty": 2.5}', "sampling_parameters.presence_penalty: must be in [-2, 2], got 2.5"),
    ('{"frequency_penalty": "x"}', 'sampling_parameters.frequency_penalty: must be a number, got "x"'),
    ('{"repetition_penalty": 0}', "sampling_parameters.repetition_penalty: must be in [0.01, 100], got 0.0"),
    ('{"repetition_penalty": Infinity}', "sampling_parameters.repetition_penalty: must be a finite number"),
    ('{"logit_bias": [1]}', "sampling_parameters.logit_bias: must be an object of token id: bias, got [1]"),
    ('{"logit_bias": {"a": 1}}', 'sampling_parameters.logit_bias["a"]: must be a token id (an integer), got "a"'),
    ('{"logit_bias": {"-1": 1}}', 'sampling_parameters.logit_bias["-1"]: must be a non-negative token id'),
    ('{"logit_bias": {"5": 101}}', 'sampling_parameters.logit_bias["5"]: must be in [-100, 100], got 101.0'),
    ('{"logit_bias": {"5": NaN}}', 'sampling_parameters.logit_bias["5"]: must be a finite number, got NaN'),
    ('{"allowed_token_ids": []}', "sampling_parameters.allowed_token_ids: must not be empty"),
    ('{"allowed_token_ids": [-3]}', "sampling_parameters.allowed_token_ids[0]: must be a non-negative token id"),
    ('{"bad_words": "x"}', 'sampling_parameters.bad_words: must be a string or a list of strings, got "x"'),
    ('{"bad_words": [""]}', 'sampling_parameters.bad_words[0]: must be a non-empty string'),
    ('{"stop": [3]}', "sampling_parameters.stop[0]: must be a non-empty string of at most 256 characters, got 3"),
    ('{"stop": ""}', "sampling_parameters.stop[0]: must be a non-empty string"),
    (json.dumps({"stop": ["a"] * 17}), "sampling_parameters.stop: must hold at most 16 strings, got 17"),
    ('{"include_stop_str_in_output": 2}', "sampling_parameters.include_stop_str_in_output: must be true or false"),
    ('{"logprobs": 21}', "sampling_parameters.logprobs: must be in [0, 20], got 21"),
    ('{"logprobs": -1}', "sampling_parameters.logprobs: must be in [0, 20], got -1"),
    ('{"logprobs": 1.5}', "sampling_parameters.logprobs: must be an integer or null, got 1.5"),
    ('{"prompt_logprobs": 30}', "sampling_parameters.prompt_logprobs: must be in [0, 20], got 30"),
    ('{"spaces_between_special_tokens": "x"}', "sampling_parameters.spaces_between_special_tokens: must be true"),
    ('{"structured_outputs": 3}', "sampling_parameters.structured_outputs: must be an object with one of"),
    ('{"structured_outputs": "{"}', "sampling_parameters.structured_outputs: not valid JSON"),
    ('{"structured_outputs": {}}', "sampling_parameters.structured_outputs: must set exactly one of"),
    ('{"structured_outputs": {"regex": "a", "choice": ["a"]}}',
     "sampling_parameters.structured_outputs: must set exactly one of"),
    ('{"structured_outputs": {"yaml": "a"}}', "sampling_parameters.structured_outputs.yaml: unknown kind"),
    ('{"structured_outputs": {"json": 3}}', "sampling_parameters.structured_outputs.json: must be a JSON schema"),
    ('{"structured_outputs": {"json": "{"}}', "sampling_parameters.structured_outputs.json: not valid JSON"),
    ('{"structured_outputs": {"choice": []}}', "sampling_parameters.structured_outputs.choice: must hold at least one"),
    ('{"structured_outputs": {"choice": [1]}}', "sampling_parameters.structured_outputs.choice[0]: must be a non-empty"),
    ('{"structured_outputs": {"regex": ""}}', "sampling_parameters.structured_outputs.regex: must be a non-empty"),
    ('{"bogus": 1}', "sampling_parameters.bogus: unknown sampling parameter"),
])
def test_bad_values_name_the_field(text, message):
    with pytest.raises(ValueError) as e:
        SamplingParams.from_json(text)
    assert str(e.value).startswith(message)


def test_max_tokens_limit():
    assert SamplingParams.from_json('{"max_tokens": 64}', max_tokens_limit=64).max_tokens == 64
    with pytest.raises(ValueError, match="sampling_parameters.max_tokens: 65 exceeds this server's limit of 64"):
        SamplingParams.from_json('{"max_tokens": 65}', max_tokens_limit=64)


def test_validate_checks_params_built_directly():
    with pytest.raises(ValueError, match="sampling_parameters.temperature: must be a finite number, got NaN"):
        SamplingParams(temperature=float("nan")).validate()
    with pytest.raises(ValueError, match="sampling_parameters.seed: must be in"):
        SamplingParams(seed=2**64).validate()


# ---- property: any JSON object is refused by name, or accepted and served ----------------------------------
KEYS = sorted({f.name for f in fields(SamplingParams)} | NOT_SUPPORTED | {"bogus", "Temperature", "max-tokens", ""})
SUPPORTED = sorted(f.name for f in fields(SamplingParams))
EDGES = [0, 1, -1, 2, 3, 2**31, 2**63 - 1, 2**63, 2**64 - 1, 2**64, -2**63, -2**63 - 1, 10**30,
         0.0, -0.0, 0.5, 1.0, 2.0, 2.5, 1e-5, 5e-6, 1e-40, 1e300, float("nan"), float("inf"), float("-inf"),
         "0.7", "2", "2.0", "2.5", "-1", "abc", "", "nan", "inf", "1e-40", "true", "false", "1e30", " 3 "]
scalars = st.one_of(st.sampled_from(EDGES), st.integers(-2**70, 2**70), st.floats(), st.text(max_size=6),
                    st.booleans(), st.none())
values = st.one_of(scalars, st.lists(st.one_of(st.integers(-5, 300), scalars), max_size=4),
                   st.dictionaries(st.text(max_size=3), scalars, max_size=2))
# Values that pass, per key: most objects mixing several keys should still be served.
good = st.fixed_dictionaries({}, optional={
    "max_tokens": st.sampled_from([1, 2, 3, "2", 2.0, LIMIT]),
    "temperature": st.sampled_from([0, 0.0, "0", 1e-5, 0.7, "0.7", 1, 2.0, 1e3]),
    "top_p": st.sampled_from([1, 0.5, "0.9", 1e-9]),
    "top_k": st.sampled_from([-1, 0, 1, 5, "3", 10**30]),
    "seed": st.sampled_from([None, 0, -1, "7", 2**64 - 1, -2**63]),
    "ignore_eos": st.sampled_from([True, False, "true", 0, 1]),
    "stop_token_ids": st.lists(st.one_of(st.integers(0, 300), st.just("2"), st.just(3.0)), max_size=3),
    "skip_special_tokens": st.booleans(),
    "spaces_between_special_tokens": st.booleans(),
    "n": st.sampled_from([1, 2, "3"]),
    "min_tokens": st.sampled_from([0, 1, "1"]),
    "min_p": st.sampled_from([0, 0.05, "0.5", 1]),
    "presence_penalty": st.sampled_from([0, -2, 1.5, "0.5"]),
    "frequency_penalty": st.sampled_from([0, 2, -0.5, "1"]),
    "repetition_penalty": st.sampled_from([1, 0.5, 1.3, "2", 100]),
    "logit_bias": st.dictionaries(st.sampled_from(["5", "6", "300"]), st.sampled_from([-100, 0, 5.5, 100]),
                                  max_size=2),
    "allowed_token_ids": st.lists(st.integers(0, 300), min_size=1, max_size=5),
    "bad_words": st.lists(st.sampled_from(["the", "a", "xyz", "é"]), max_size=2),
    "stop": st.one_of(st.sampled_from(["a", "the", "\n", "é"]), st.lists(st.sampled_from(["e", "ab", " "]),
                                                                          max_size=3)),
    "include_stop_str_in_output": st.booleans(),
    "logprobs": st.sampled_from([None, 0, 1, "5", 20]),
    "prompt_logprobs": st.sampled_from([None, 0, 2]),
    "structured_outputs": st.sampled_from([None, {"choice": ["yes", "no"]}, {"regex": "[a-c]+"},
                                           '{"json": {"type": "object"}}', {"json_object": True},
                                           {"grammar": 'start: "x" | "y" "z"'},
                                           {"json": {"type": "array", "items": {"type": "integer"}}}]),
})
def with_one_more(t):
    good_object, key, value = t
    return {**good_object, key: value}


objects = st.one_of(good,
                    st.tuples(good, st.sampled_from(SUPPORTED), st.sampled_from(EDGES)).map(with_one_more),
                    st.tuples(good, st.sampled_from(KEYS), values).map(with_one_more),
                    st.dictionaries(st.sampled_from(SUPPORTED), values, max_size=5),
                    st.dictionaries(st.sampled_from(KEYS), values, max_size=5))


@pytest.fixture(scope="module")
def engine(tiny_checkpoint):
    engine = LLMEngine(str(tiny_checkpoint), EngineConfig(num_kv_blocks=64))
    engine.start()
    yield engine
    engine.stop()


def run(engine: LLMEngine, params: SamplingParams, timeout: float = 30, seq=None):
    got = queue.Queue()
    engine.add(seq or engine.make_sequence(engine.new_request_id(), PROMPT, params), got.put)
    outs = [got.get(timeout=timeout)]
    while not outs[-1].finished:
        outs.append(got.get(timeout=timeout))
    return outs


def refused_by_name_or_served(engine: LLMEngine, raw: dict) -> str:
    """The property: a ValueError naming an offending key, or a request that really generates."""
    text = json.dumps(raw)  # NaN and Infinity go out as the literals Python's json reads back
    try:
        params = SamplingParams.from_json(text, max_tokens_limit=LIMIT)
    except ValueError as e:
        named = re.match(r"sampling_parameters\.([^:\[.]*)[:\[.]", str(e))  # the top-level key
        assert named and named.group(1) in raw, str(e)
        with pytest.raises(ValueError, match=re.escape(f"sampling_parameters.{named.group(1)}")):
            SamplingParams.from_json(json.dumps({named.group(1): raw[named.group(1)]}), max_tokens_limit=LIMIT)
        outcome = "refused"
    else:
        assert SamplingParams.from_json(params.to_json()) == params
        params.max_tokens = min(params.max_tokens, 3)
        params.min_tokens = min(params.min_tokens, 3)
        try:
            seq = engine.make_sequence(engine.new_request_id(), PROMPT, params)
        except ValueError as e:  # a value only the engine can judge (a token id beyond this vocabulary)
            assert str(e).startswith("sampling_parameters.") or str(e).startswith("input_ids"), str(e)
            return "refused by the engine"
        outs = run(engine, params, seq=seq)
        if outs[-1].error and "every token is masked" in outs[-1].error:
            # Masks that exclude each other (allowed_token_ids, bad_words, a grammar): refused when met.
            assert {"allowed_token_ids", "bad_words", "structured_outputs"} & raw.keys(), outs[-1]
            return "masked out"
        finals = [o for o in outs if o.finish_reason]
        assert sorted(o.index for o in finals) == list(range(params.n)), outs
        for o in finals:
            assert o.error is None and o.finish_reason in ("stop", "length"), o
        for i in range(params.n):
            tokens = [t for o in outs if o.index == i for t in o.new_token_ids]
            assert 1 <= len(tokens) <= 3
            assert all(0 <= t < engine.geometry.text.vocab_size for t in tokens)
        outcome = "accepted"
    assert engine.alive
    engine.check()
    return outcome


@settings(max_examples=200, deadline=None, database=None, suppress_health_check=[HealthCheck.too_slow])
@given(raw=objects)
def test_any_object_is_refused_by_name_or_served(engine, raw):
    event(refused_by_name_or_served(engine, raw))


def test_every_edge_value_of_every_key_is_refused_by_name_or_served(engine):
    for key in SUPPORTED:
        for value in EDGES + [None, True, [], [1, -1], {"a": 1}]:
            refused_by_name_or_served(engine, {key: value})


def test_edge_values_that_pass_also_sample(engine):
    for params in (SamplingParams(max_tokens=4, temperature=1e-5, ignore_eos=True),
                   SamplingParams(max_tokens=4, temperature=1e6, top_p=1e-9, ignore_eos=True),
                   SamplingParams(max_tokens=4, seed=2**64 - 1, top_k=10**30, ignore_eos=True),
                   SamplingParams(max_tokens=4, seed=-2**63, top_k=-1, ignore_eos=True)):
        outs = run(engine, params)
        assert outs[-1].finish_reason == "length" and sum(len(o.new_token_ids) for o in outs) == 4
    engine.check()
