"""llm's responses, asked for directly over gRPC: streamed ones carry every token in order, however the
response thread merges them; a request that does not stream gets its outputs merged (one response per
HOLD_S at most), with the same tokens."""
from __future__ import annotations

import json
import queue
import time
import uuid

import numpy as np

from triton_vlm.engine.llm_engine import KEEPALIVE_S as HOLD_S  # triton/responder.py's hold

PROMPT_IDS = [1, 20, 21, 22, 23, 24]


def llm_stream(server, max_tokens: int, stream: bool | None):
    """(responses as (output_ids, finish_reason), seconds from sending to the final response)."""
    import tritonclient.grpc as grpcclient

    def tensor(name, array, dtype):
        t = grpcclient.InferInput(name, list(array.shape), dtype)
        t.set_data_from_numpy(array)
        return t

    sampling = {"max_tokens": max_tokens, "temperature": 0, "ignore_eos": True}
    inputs = [tensor("input_ids", np.array(PROMPT_IDS, dtype=np.int64), "INT64"),
              tensor("sampling_parameters", np.array([json.dumps(sampling).encode()], dtype=object), "BYTES")]
    if stream is not None:
        inputs.append(tensor("stream", np.array([stream]), "BOOL"))
    results: queue.Queue = queue.Queue()
    client = grpcclient.InferenceServerClient(server.grpc_url)
    client.start_stream(callback=lambda result, error: results.put((result, error)))
    responses = []
    try:
        start = time.monotonic()
        client.async_stream_infer("llm", inputs, request_id=uuid.uuid4().hex, enable_empty_final_response=True)
        while True:
            result, error = results.get(timeout=60)
            assert error is None, error
            ids = result.as_numpy("output_ids")
            if ids is not None:
                reason = result.as_numpy("finish_reason")
                responses.append((ids.tolist(), None if reason is None else reason[0].decode()))
            if result.get_response().parameters["triton_final_response"].bool_param:
                return responses, time.monotonic() - start
    finally:
        client.stop_stream()
        client.close()


def test_streamed_and_held_responses_carry_the_same_tokens(tiny_server):
    streamed, _ = llm_stream(tiny_server, 48, None)  # no `stream` input: streamed, as before it existed
    held, seconds = llm_stream(tiny_server, 48, False)
    tokens = lambda responses: [t for ids, _ in responses for t in ids]  # noqa: E731
    assert len(tokens(streamed)) == 48 and tokens(held) == tokens(streamed)
    assert streamed[-1][1] == held[-1][1] == "length"
    assert all(reason is None for _, reason in held[:-1])
    # Held: merged into one response per HOLD_S at most (plus the final one).
    assert len(held) <= 1 + seconds / HOLD_S, (len(held), seconds)
