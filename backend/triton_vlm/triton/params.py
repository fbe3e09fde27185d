"""Small helpers shared by the Triton adapters: config parameters and request tensors."""
from __future__ import annotations

import json
import math

import numpy as np


def model_parameters(args: dict) -> dict[str, str]:
    """The `parameters { key: ... value: { string_value: ... } }` of a model's config.pbtxt."""
    config = json.loads(args["model_config"])
    return {k: v["string_value"] for k, v in config.get("parameters", {}).items()}


def optional_input(pb_utils, request, name: str) -> np.ndarray | None:
    tensor = pb_utils.get_input_tensor_by_name(request, name)
    return None if tensor is None else tensor.as_numpy()


def scalar(array: np.ndarray | None, name: str, default=None):
    """One element from a tensor the client may send as [1] or [1, 1]."""
    if array is None:
        return default
    flat = array.reshape(-1)
    if flat.size != 1:
        raise ValueError(f"{name}: expected 1 element, got {flat.size}")
    return flat[0]


def text(value, name: str) -> str:
    if isinstance(value, bytes):
        try:
            return value.decode("utf-8")
        except UnicodeDecodeError:
            raise ValueError(f"{name}: not valid UTF-8") from None
    return str(value)


def flag(pb_utils, request, name: str) -> bool:
    """An optional BOOL [1] input; false when absent."""
    return bool(scalar(optional_input(pb_utils, request, name), name, False))


def error_response(pb_utils, message: str, code=None):
    """An error response carrying a Triton status code (INVALID_ARG when none is given), so gRPC
    clients see INVALID_ARGUMENT, UNAVAILABLE, ... and can tell bad input from a busy server."""
    code = pb_utils.TritonError.INVALID_ARG if code is None else code
    return pb_utils.InferenceResponse(error=pb_utils.TritonError(message, code))


# Triton's own request parameters: never sampling parameters.
RESERVED_PARAMETERS = {"sequence_id", "sequence_start", "sequence_end", "priority", "timeout",
                       "binary_data_output", "headers"}
# TensorRT-LLM ensemble inputs -> (config data type, sampling parameter). Recipes and perf_analyzer
# input files written for that ensemble send these instead of sampling_parameters.
SCALAR_INPUTS = {
    "max_tokens": ("TYPE_INT32", "max_tokens"), "min_tokens": ("TYPE_INT32", "min_tokens"),
    "temperature": ("TYPE_FP32", "temperature"), "top_k": ("TYPE_INT32", "top_k"), "top_p": ("TYPE_FP32", "top_p"),
    "seed": ("TYPE_UINT64", "seed"), "repetition_penalty": ("TYPE_FP32", "repetition_penalty"),
    "presence_penalty": ("TYPE_FP32", "presence_penalty"), "frequency_penalty": ("TYPE_FP32", "frequency_penalty"),
    "stop_words": ("TYPE_STRING", "stop"), "bad_words": ("TYPE_STRING", "bad_words"),
    "end_id": ("TYPE_INT32", "stop_token_ids"), "pad_id": ("TYPE_INT32", None),
    "beam_width": ("TYPE_INT32", None), "return_log_probs": ("TYPE_BOOL", None),
}
LIST_INPUTS = {"stop_words", "bad_words"}


def request_sampling_params(inputs: dict, max_tokens_limit: int | None = None):
    """SamplingParams from a request: the `sampling_parameters` tensor, else the request's `parameters`
    (as Triton's vLLM backend), then TensorRT-LLM's scalar tensors, which must agree with either."""
    from ..engine.sampling_params import SamplingParams

    raw_text = scalar(inputs["sampling_parameters"], "sampling_parameters")
    if raw_text is not None:
        source, raw = "sampling_parameters", _json_object(raw_text, "sampling_parameters")
    else:
        source = "parameters"
        raw = {k: v for k, v in _json_object(inputs.get("parameters") or "{}", source).items()
               if k not in RESERVED_PARAMETERS}
    scalars = _scalar_settings(inputs)
    if "end_id" in scalars:  # one more stop token, not a replacement for the others
        scalars["stop_token_ids"] = list(raw.get("stop_token_ids") or []) + [scalars.pop("end_id")]
    if not scalars:
        return SamplingParams.from_dict(raw, source, max_tokens_limit)
    alone = SamplingParams.from_dict(raw, source)
    both = SamplingParams.from_dict({**raw, **scalars}, source, max_tokens_limit)
    for key in scalars.keys() & raw.keys() - {"stop_token_ids"}:
        ours, theirs = getattr(alone, key), getattr(both, key)
        if ours != theirs and not (isinstance(ours, float) and math.isclose(ours, theirs, rel_tol=1e-6)):
            raise ValueError(f"{_tensor_for(key)}: {_show(theirs)} disagrees with {source}.{key} = {_show(ours)}")
    return both


def _scalar_settings(inputs: dict) -> dict:
    from ..engine.sampling_params import SamplingParams

    settings = {}
    for name, (_, key) in SCALAR_INPUTS.items():
        array = inputs.get(name)
        if array is None:
            continue
        if name in LIST_INPUTS:
            settings[key] = [text(v, f"{name}[{i}]") for i, v in enumerate(array.reshape(-1))]
            continue
        value = scalar(array, name).item()
        if name == "beam_width":
            if value != 1:
                raise ValueError(f"beam_width: only 1 is supported (no beam search), got {value}")
        elif name == "return_log_probs":
            if value:
                settings["logprobs"] = 0  # the sampled tokens' logprobs, as TensorRT-LLM's output_log_probs
        elif name == "end_id":
            settings["end_id"] = value
        elif key is not None:
            settings[key] = value
    for name, (_, key) in SCALAR_INPUTS.items():  # each checked alone first, so errors name its tensor
        if key in settings and key != "min_tokens":  # min_tokens is judged against max_tokens, later
            try:
                SamplingParams.from_dict({key: settings[key]}, "tensor")
            except ValueError as e:
                raise ValueError(str(e).replace(f"tensor.{key}", name, 1)) from None
    return settings


def _tensor_for(key: str) -> str:
    return next(name for name, (_, k) in SCALAR_INPUTS.items() if k == key)


def _json_object(raw, name: str) -> dict:
    raw = text(raw, name)
    if not raw.strip():
        return {}
    try:
        value = json.loads(raw)
    except (ValueError, RecursionError) as e:
        raise ValueError(f"{name}: not valid JSON ({e})") from None
    if not isinstance(value, dict):
        raise ValueError(f"{name}: expected a JSON object, got {_show(value)}")
    return value


def _show(value) -> str:
    return json.dumps(value, default=repr)[:80]
