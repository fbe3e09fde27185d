"""Small helpers shared by the Triton adapters: config parameters and request tensors."""
from __future__ import annotations

import json

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
