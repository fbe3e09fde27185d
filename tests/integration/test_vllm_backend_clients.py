"""What clients written for Triton's vLLM backend (and TensorRT-LLM's ensemble) do, against a real `vlm`.

Our own equivalents of the vLLM backend's client-side tests (additional outputs, streaming rules,
request parameters), plus n, stop strings, structured outputs and TensorRT-LLM scalar inputs.
"""
from __future__ import annotations

import json
import queue
import uuid
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest

from helpers import PROMPTS

PROMPT = PROMPTS[0]
GREEDY = {"temperature": "0", "top_p": "1"}  # as the vLLM backend's tests send them: strings


def tensor(name: str, array: np.ndarray, dtype: str):
    import tritonclient.grpc as grpcclient

    t = grpcclient.InferInput(name, list(array.shape), dtype)
    t.set_data_from_numpy(array)
    return t


def inputs_for(prompt: str = PROMPT, stream: bool = True, sampling: dict | None = None, returns: tuple = (),
               exclude_input: bool | None = None, **scalars) -> list:
    ins = [tensor("text_input", np.array([prompt.encode()], dtype=object), "BYTES"),
           tensor("stream", np.array([stream]), "BOOL")]
    if sampling is not None:
        ins.append(tensor("sampling_parameters", np.array([json.dumps(sampling).encode()], dtype=object), "BYTES"))
    if exclude_input is not None:
        ins.append(tensor("exclude_input_in_output", np.array([exclude_input]), "BOOL"))
    ins += [tensor(f"return_{name}", np.array([True]), "BOOL") for name in returns]
    for name, (array, dtype) in scalars.items():
        ins.append(tensor(name, array, dtype))
    return ins


def infer(url: str, ins: list, parameters: dict | None = None, timeout: float = 120) -> list:
    """All responses of one streamed request: [(InferResult, error)], as the vLLM backend's tests collect them."""
    import tritonclient.grpc as grpcclient

    got: queue.Queue = queue.Queue()
    with grpcclient.InferenceServerClient(url) as c:
        c.start_stream(callback=lambda result, error: got.put((result, error)))
        c.async_stream_infer("vlm", ins, request_id=uuid.uuid4().hex, parameters=parameters,
                             enable_empty_final_response=True)
        out = []
        while True:
            result, error = got.get(timeout=timeout)
            if error is not None:
                out.append((None, error))
                break
            final = result.get_response().parameters["triton_final_response"].bool_param
            if result.as_numpy("text_output") is not None:
                out.append((result, None))
            if final:
                break
        c.stop_stream()
    return out


def texts(responses: list, index: int = 0) -> str:
    return "".join(r.as_numpy("text_output")[index].decode() for r, _ in responses)


@pytest.mark.parametrize("logprobs", [None, 0, 2])
@pytest.mark.parametrize("stream", [True, False], ids=["stream", "nostream"])
def test_additional_outputs_as_the_vllm_backend_sends_them(tiny_server, stream, logprobs):
    sampling = {**GREEDY, "max_tokens": 6, "ignore_eos": True}
    if logprobs is not None:
        sampling["logprobs"] = logprobs
    returns = ("finish_reason", "cumulative_logprob", "logprobs", "num_input_tokens", "num_output_tokens")
    responses = infer(tiny_server.grpc_url, inputs_for(stream=stream, sampling=sampling, returns=returns),
                      parameters=sampling)
    assert all(e is None for _, e in responses), responses
    results = [r for r, _ in responses]
    assert len(results) > 1 if stream else len(results) == 1
    reasons = [r.as_numpy("finish_reason")[0].decode() for r in results]
    assert reasons[:-1] == ["None"] * (len(results) - 1) and reasons[-1] == "length"
    cumulative = [float(r.as_numpy("cumulative_logprob")[0]) for r in results]
    assert all(c < 0 for c in cumulative) and len(set(cumulative)) == len(cumulative)  # it grows each response
    assert sum(int(r.as_numpy("num_output_tokens")[0]) for r in results) == 6
    assert all(int(r.as_numpy("num_input_tokens")[0]) > 0 for r in results)
    for r in results:
        lps = json.loads(r.as_numpy("logprobs")[0].decode())
        if logprobs is None:
            assert lps is None
            continue
        assert len(lps) == int(r.as_numpy("num_output_tokens")[0])
        decoded = ""
        for per_token in lps:
            assert 1 <= len(per_token) <= logprobs + 1
            ranks = [d["rank"] for d in per_token.values()]
            assert ranks.count(1) == 1  # greedy: the sampled token is the most likely one
            for token_id, d in per_token.items():
                assert token_id.isdigit() and set(d) == {"logprob", "rank", "decoded_token"}
                assert isinstance(d["logprob"], float) and d["logprob"] <= 0 and isinstance(d["rank"], int)
            decoded += next(d["decoded_token"] for d in per_token.values() if d["rank"] == 1)
        text = r.as_numpy("text_output")[0].decode()
        assert decoded == (text if stream else text.removeprefix(PROMPT))
    # The sampled tokens' logprobs add up to the cumulative logprob.
    if logprobs is not None:
        picked = [max(d.values(), key=lambda d: d["logprob"])["logprob"]
                  for r in results for d in json.loads(r.as_numpy("logprobs")[0].decode())]
        assert abs(sum(picked) - cumulative[-1]) < 1e-3


def test_outputs_not_asked_for_are_not_sent(tiny_server):
    responses = infer(tiny_server.grpc_url, inputs_for(sampling={**GREEDY, "max_tokens": 3, "logprobs": 2}))
    for r, _ in responses:
        for name in ("finish_reason", "cumulative_logprob", "logprobs", "num_input_tokens", "num_output_tokens"):
            assert r.as_numpy(name) is None


def test_sampling_parameters_from_request_parameters(tiny_server):
    """No sampling_parameters tensor: the request's parameters are used, as by the vLLM backend."""
    url = tiny_server.grpc_url
    by_tensor = infer(url, inputs_for(sampling={"max_tokens": 3, "temperature": 0}, returns=("num_output_tokens",)))
    by_params = infer(url, inputs_for(returns=("num_output_tokens",)), parameters={"max_tokens": 3, "temperature": "0"})
    count = lambda rs: sum(int(r.as_numpy("num_output_tokens")[0]) for r, _ in rs)  # noqa: E731
    assert count(by_params) == count(by_tensor) == 3
    assert texts(by_params) == texts(by_tensor)
    (_, error), = infer(url, inputs_for(), parameters={"temperature": "hot"})
    assert "parameters.temperature: must be a number" in str(error)
    (_, error), = infer(url, inputs_for(), parameters={"not_a_knob": 1})
    assert "parameters.not_a_knob: unknown sampling parameter" in str(error)


def test_streaming_cannot_repeat_the_prompt(tiny_server):
    (_, error), = infer(tiny_server.grpc_url, inputs_for(stream=True, exclude_input=False))
    assert "exclude_input_in_output: false is not allowed when streaming" in str(error)
    # Not sent at all: a stream simply does not repeat it; a non-streamed answer does.
    streamed = texts(infer(tiny_server.grpc_url, inputs_for(stream=True, sampling={**GREEDY, "max_tokens": 4})))
    whole = texts(infer(tiny_server.grpc_url, inputs_for(stream=False, sampling={**GREEDY, "max_tokens": 4})))
    assert whole == PROMPT + streamed


def test_n_completions_seeded_streamed_and_not(tiny_server):
    sampling = {"n": 3, "temperature": 1.0, "seed": 11, "max_tokens": 8, "ignore_eos": True}
    url = tiny_server.grpc_url
    whole = infer(url, inputs_for(stream=False, sampling=sampling, returns=("finish_reason", "num_output_tokens"),
                                  exclude_input=True))
    (result, _), = whole
    answers = [t.decode() for t in result.as_numpy("text_output")]
    assert len(answers) == 3 and len(set(answers)) > 1  # three different completions
    assert [r.decode() for r in result.as_numpy("finish_reason")] == ["length"] * 3
    assert result.as_numpy("num_output_tokens").tolist() == [8, 8, 8]
    streamed = infer(url, inputs_for(stream=True, sampling=sampling))
    assert len(streamed) > 3
    assert [texts(streamed, i) for i in range(3)] == answers  # seeded: the same again, streamed or not


def test_stop_strings_cut_the_text(tiny_server):
    url = tiny_server.grpc_url
    free = texts(infer(url, inputs_for(sampling={**GREEDY, "max_tokens": 12, "ignore_eos": True})))
    stop = free[5:8]  # three characters, most likely spread over tokens
    cut = texts(infer(url, inputs_for(sampling={**GREEDY, "max_tokens": 12, "ignore_eos": True, "stop": [stop]},
                                      returns=("finish_reason",))))
    assert cut == free[:free.index(stop)]
    kept = texts(infer(url, inputs_for(sampling={**GREEDY, "max_tokens": 12, "ignore_eos": True, "stop": stop,
                                                 "include_stop_str_in_output": True})))
    assert kept == free[:free.index(stop) + len(stop)]


SCHEMA = {"type": "object", "properties": {"colour": {"enum": ["red", "green", "blue"]},
                                           "count": {"type": "integer", "minimum": 0, "maximum": 9}},
          "required": ["colour", "count"], "additionalProperties": False}


def test_structured_outputs_validate_beside_unconstrained_requests(tiny_server):
    url = tiny_server.grpc_url
    plain = {"max_tokens": 10, "temperature": 0, "ignore_eos": True}
    expected_plain = texts(infer(url, inputs_for(sampling=plain)))
    # As the vLLM backend takes it: structured_outputs is itself a JSON string.
    shaped = [{"max_tokens": 64, "temperature": 1.0, "seed": s, "structured_outputs": json.dumps({"json": SCHEMA})}
              for s in range(4)]
    choice = {"max_tokens": 16, "temperature": 1.0, "structured_outputs": {"choice": ["yes", "no", "maybe"]}}
    regex = {"max_tokens": 16, "temperature": 1.0, "structured_outputs": {"regex": "[0-9]{3}-[a-c]{2}"}}
    jobs = shaped + [plain, choice, plain, regex]
    with ThreadPoolExecutor(len(jobs)) as pool:
        outs = list(pool.map(lambda s: infer(url, inputs_for(sampling=s, returns=("finish_reason",))), jobs))
    for s, out in zip(jobs, outs):
        assert all(e is None for _, e in out), out
        text = texts(out)
        if s is plain:
            assert text == expected_plain
        elif "seed" in s:
            value = json.loads(text)
            assert set(value) == {"colour", "count"} and value["colour"] in ("red", "green", "blue")
            assert isinstance(value["count"], int) and 0 <= value["count"] <= 9
            assert out[-1][0].as_numpy("finish_reason")[0].decode() == "stop"
        elif s is choice:
            assert text in ("yes", "no", "maybe")
        else:
            assert len(text) == 6 and text[:3].isdigit() and text[3] == "-" and set(text[4:]) <= set("abc")


def test_trtllm_scalar_inputs(tiny_server):
    url = tiny_server.grpc_url
    i32 = lambda v: (np.array([v], np.int32), "INT32")  # noqa: E731
    f32 = lambda v: (np.array([v], np.float32), "FP32")  # noqa: E731
    by_json = infer(url, inputs_for(sampling={"max_tokens": 5, "temperature": 0.5, "seed": 3, "top_k": 20,
                                              "ignore_eos": True}))
    by_scalars = infer(url, inputs_for(max_tokens=i32(5), temperature=f32(0.5), top_k=i32(20),
                                       seed=(np.array([3], np.uint64), "UINT64"), beam_width=i32(1),
                                       pad_id=i32(0), sampling={"ignore_eos": True}))
    assert texts(by_scalars) == texts(by_json)
    # return_log_probs turns on both logprob outputs
    with_lp = infer(url, inputs_for(sampling={"max_tokens": 3, "temperature": 0},
                                    return_log_probs=(np.array([True]), "BOOL")))
    assert with_lp[-1][0].as_numpy("cumulative_logprob") is not None
    assert len(json.loads(with_lp[-1][0].as_numpy("logprobs")[0].decode())) >= 1
    # stop_words and agreeing duplicates are fine; disagreement is refused by name
    free = texts(infer(url, inputs_for(sampling={"max_tokens": 12, "temperature": 0, "ignore_eos": True})))
    stop = free[4:6]
    cut = texts(infer(url, inputs_for(sampling={"max_tokens": 12, "temperature": 0, "ignore_eos": True},
                                      stop_words=(np.array([stop.encode()], dtype=object), "BYTES"),
                                      max_tokens=i32(12))))
    assert cut == free[:free.index(stop)]
    (_, error), = infer(url, inputs_for(sampling={"top_k": 5}, top_k=i32(6)))
    assert "top_k: 6 disagrees with sampling_parameters.top_k = 5" in str(error)


def test_prompt_logprobs_once(tiny_server, hf_tiny):
    import torch

    prompt_ids = hf_tiny.inputs(PROMPT, [])["input_ids"][0].tolist()
    responses = infer(tiny_server.grpc_url, inputs_for(sampling={**GREEDY, "max_tokens": 3, "prompt_logprobs": 1},
                                                       returns=("prompt_logprobs",)))
    sent = [json.loads(r.as_numpy("prompt_logprobs")[0].decode()) for r, _ in responses]
    assert all(s is None for s in sent[1:]) and len(sent[0]) == len(prompt_ids) and sent[0][0] is None
    with torch.no_grad():
        ref = torch.log_softmax(hf_tiny.model(input_ids=torch.tensor([prompt_ids])).logits[0].float(), -1)
    for pos in range(1, len(prompt_ids)):
        entry = sent[0][pos][str(prompt_ids[pos])]
        assert abs(entry["logprob"] - ref[pos - 1, prompt_ids[pos]].item()) < 1e-4
