"""OpenAI's request fields -> vLLM's sampling_parameters, and vlm's outputs -> OpenAI's response objects.

Plain functions over dicts, no Triton and no HTTP, so every mapping is testable on its own.
Logprobs arrive in the vLLM backend's layout: per completion, a list with one {token_id: {"logprob",
"rank", "decoded_token"}} per generated token, the sampled token first.
"""
from __future__ import annotations

import re

# Sampling fields passed to vlm under the same name: OpenAI's own, then vLLM's extra sampling fields.
OPENAI_SAMPLING = ("temperature", "top_p", "seed", "presence_penalty", "frequency_penalty", "logit_bias")
VLLM_SAMPLING = ("top_k", "min_p", "repetition_penalty", "min_tokens", "ignore_eos", "stop_token_ids",
                 "skip_special_tokens", "spaces_between_special_tokens", "include_stop_str_in_output", "bad_words",
                 "allowed_token_ids", "prompt_logprobs", "structured_outputs")
# vLLM's older guided_* fields, as structured_outputs kinds.
GUIDED = {"guided_json": "json", "guided_regex": "regex", "guided_choice": "choice", "guided_grammar": "grammar"}
# OpenAI fields we cannot honour: refused by name rather than ignored.
UNSUPPORTED = ("tools", "tool_choice", "functions", "function_call", "audio", "prediction", "suffix", "best_of",
               "web_search_options")
_FIELD = re.compile(r"^([a-z_]+)([\w\[\].]*)(?=: )")  # "messages[2].content[1].image_url: ..."
# Request fields an error may start with; others ("llm: ...", "request: ...") name no parameter.
PARAMS = {"messages", "prompt", "image", "model", "stream", "stream_options", "n", "stop", "max_tokens",
          "max_completion_tokens", "logprobs", "top_logprobs", "response_format", *OPENAI_SAMPLING, *VLLM_SAMPLING,
          *GUIDED, *UNSUPPORTED}


class APIError(Exception):
    def __init__(self, status: int, message: str, param: str | None = None, code: str | None = None):
        super().__init__(message)
        self.status, self.param, self.code = status, param, code


def error_body(e: APIError) -> dict:
    """OpenAI's error object; `param` is the field an error message starts with, when it names one."""
    kind = {400: "invalid_request_error", 404: "not_found_error", 499: "client_closed_request",
            500: "internal_server_error", 502: "bad_gateway", 503: "service_unavailable"}.get(e.status, "error")
    match = _FIELD.match(str(e))
    param = e.param or (match.group(0) if match and match.group(1) in PARAMS else None)
    return {"error": {"message": str(e), "type": kind, "param": param, "code": e.code or e.status}}


def sampling_parameters(body: dict, chat: bool, default_max_tokens: int = 0) -> dict:
    """vLLM sampling_parameters for an OpenAI request; vlm validates every value and names the bad one."""
    for name in UNSUPPORTED:
        if body.get(name) not in (None, [], {}):
            raise APIError(400, f"{name}: not supported by this server", name)
    params = {k: body[k] for k in OPENAI_SAMPLING + VLLM_SAMPLING if body.get(k) is not None}
    for k in ("presence_penalty", "frequency_penalty"):  # SDKs send the defaults; leave them to vlm's own
        if params.get(k) == 0:
            del params[k]
    max_tokens = body.get("max_completion_tokens") if chat else None
    max_tokens = body.get("max_tokens") if max_tokens is None else max_tokens
    if max_tokens is not None:
        params["max_tokens"] = max_tokens
    elif default_max_tokens:
        params["max_tokens"] = default_max_tokens  # as vLLM: up to the context length, not vLLM's 16
    if body.get("n") not in (None, 1):
        params["n"] = body["n"]
    stop = body.get("stop")
    if stop:
        params["stop"] = [stop] if isinstance(stop, str) else stop
    if chat and body.get("logprobs"):
        params["logprobs"] = body.get("top_logprobs") or 0
    elif chat and body.get("top_logprobs"):
        raise APIError(400, "top_logprobs: needs logprobs set to true", "top_logprobs")
    elif not chat and body.get("logprobs") is not None:
        params["logprobs"] = body["logprobs"]
    structured = _structured(body)
    if structured is not None:
        params["structured_outputs"] = structured
    return params


def _structured(body: dict) -> dict | None:
    fmt = body.get("response_format")
    guided = {kind: body[name] for name, kind in GUIDED.items() if body.get(name) is not None}
    if fmt is None or (isinstance(fmt, dict) and fmt.get("type") == "text"):
        return guided or None
    if not isinstance(fmt, dict):
        raise APIError(400, "response_format: expected an object with a type", "response_format")
    if fmt.get("type") == "json_object":
        return {"json_object": True}
    if fmt.get("type") == "json_schema":
        schema = (fmt.get("json_schema") or {}).get("schema")
        if not isinstance(schema, dict):
            raise APIError(400, "response_format.json_schema.schema: expected a JSON schema object",
                           "response_format")
        return {"json": schema}
    raise APIError(400, f"response_format.type: must be text, json_object or json_schema, got {fmt.get('type')!r}",
                   "response_format")


def usage(n_in: int, n_out: int) -> dict:
    return {"prompt_tokens": n_in, "completion_tokens": n_out, "total_tokens": n_in + n_out}


def _finish(reason: str | None) -> str | None:
    return "stop" if reason == "abort" else reason


# ---- logprobs ---------------------------------------------------------------------------------------

def _entries(position: dict) -> list[tuple[str, float, int]]:
    """(decoded token, logprob, rank) of one position, the sampled token first."""
    return [(v.get("decoded_token") or "", float(v["logprob"]), int(v.get("rank") or 0)) for v in position.values()]


def chat_logprobs(positions: list[dict] | None, top: int = 0) -> dict | None:
    """{"content": [{token, logprob, bytes, top_logprobs}]} as OpenAI's chat API has it; `top` is the
    request's top_logprobs (vLLM adds the sampled token when it ranks below them)."""
    if positions is None:
        return None
    content = []
    for position in positions:
        entries = _entries(position)
        if not entries:
            continue
        token, logprob, _ = entries[0]
        ranked = sorted((e for e in entries if 1 <= e[2] <= top), key=lambda e: e[2])
        content.append({"token": token, "logprob": logprob, "bytes": list(token.encode()),
                        "top_logprobs": [{"token": t, "logprob": lp, "bytes": list(t.encode())} for t, lp, _ in ranked]})
    return {"content": content}


def completion_logprobs(positions: list[dict] | None, offset: int = 0) -> dict | None:
    """{"tokens", "token_logprobs", "top_logprobs", "text_offset"} as OpenAI's completions API has it."""
    if positions is None:
        return None
    out = {"tokens": [], "token_logprobs": [], "top_logprobs": [], "text_offset": []}
    for position in positions:
        entries = _entries(position)
        if not entries:
            continue
        token, logprob, _ = entries[0]
        out["tokens"].append(token)
        out["token_logprobs"].append(logprob)
        out["top_logprobs"].append({t: lp for t, lp, _ in sorted(entries, key=lambda e: e[2])})  # sampled + top
        out["text_offset"].append(offset)
        offset += len(token)
    return out


# ---- responses --------------------------------------------------------------------------------------

def chat_completion(head, result, body: dict) -> dict:
    choices = [{"index": i, "message": {"role": "assistant", "content": text},
                "logprobs": chat_logprobs(result.logprobs[i], top_logprobs(body)), "finish_reason": _finish(result.finish[i])}
               for i, text in enumerate(result.texts)]
    return {"id": head.id, "object": "chat.completion", "created": head.created, "model": head.model,
            "choices": choices, "usage": usage(result.n_in, result.n_out)}


def top_logprobs(body: dict) -> int:
    value = body.get("top_logprobs")
    return value if isinstance(value, int) and not isinstance(value, bool) else 0


def chat_chunk(head, index: int, delta: dict, reason: str | None, logprobs, top: int, with_usage: bool) -> dict:
    chunk = {"id": head.id, "object": "chat.completion.chunk", "created": head.created, "model": head.model,
             "choices": [{"index": index, "delta": delta, "logprobs": chat_logprobs(logprobs, top),
                          "finish_reason": _finish(reason)}]}
    if with_usage:
        chunk["usage"] = None
    return chunk


def completion(head, results: list, prompts: list[str], body: dict) -> dict:
    choices = []
    for k, result in enumerate(results):
        for i, text in enumerate(result.texts):
            prefix = prompts[k] if body.get("echo") else ""
            choices.append({"index": len(choices), "text": prefix + text, "finish_reason": _finish(result.finish[i]),
                            "logprobs": completion_logprobs(result.logprobs[i], len(prefix))})
    n_in, n_out = sum(r.n_in for r in results), sum(r.n_out for r in results)
    return {"id": head.id, "object": "text_completion", "created": head.created, "model": head.model,
            "choices": choices, "usage": usage(n_in, n_out)}


def completion_chunk(head, index: int, text: str, reason: str | None, logprobs, with_usage: bool) -> dict:
    chunk = {"id": head.id, "object": "text_completion", "created": head.created, "model": head.model,
             "choices": [{"index": index, "text": text, "finish_reason": _finish(reason),
                          "logprobs": completion_logprobs(logprobs)}]}
    if with_usage:
        chunk["usage"] = None
    return chunk
