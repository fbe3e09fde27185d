"""Per-request sampling parameters, parsed from the vLLM-style `sampling_parameters` JSON."""
from __future__ import annotations

import json
from dataclasses import dataclass, field, fields

# vLLM names we know of but do not implement yet: refused by name, never silently ignored.
NOT_YET_SUPPORTED = {
    "n", "best_of", "presence_penalty", "frequency_penalty", "repetition_penalty", "min_p", "stop",
    "min_tokens", "logprobs", "prompt_logprobs", "logit_bias", "allowed_token_ids", "bad_words",
    "include_stop_str_in_output", "beam_width", "use_beam_search",
}
# Accepted and without effect on generated tokens (detokenisation always skips special tokens).
ACCEPTED_NO_OP = {"skip_special_tokens", "spaces_between_special_tokens"}


@dataclass
class SamplingParams:
    """Defaults follow vLLM's SamplingParams, so Triton vLLM-backend clients see the same behaviour."""

    max_tokens: int = 16
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0  # 0 or -1: no top-k filter
    seed: int | None = None
    ignore_eos: bool = False
    stop_token_ids: list[int] = field(default_factory=list)

    @property
    def greedy(self) -> bool:
        return self.temperature == 0.0 or self.top_k == 1

    @classmethod
    def from_json(cls, text: str | bytes | None, field_name: str = "sampling_parameters") -> "SamplingParams":
        if text is None or (isinstance(text, (bytes, str)) and not text.strip()):
            return cls()
        try:
            raw = json.loads(text)
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise ValueError(f"{field_name}: not valid JSON ({e})") from None
        if not isinstance(raw, dict):
            raise ValueError(f"{field_name}: expected a JSON object, got {type(raw).__name__}")
        return cls.from_dict(raw, field_name)

    @classmethod
    def from_dict(cls, raw: dict, field_name: str = "sampling_parameters") -> "SamplingParams":
        known = {f.name for f in fields(cls)}
        values = {}
        for key, value in raw.items():
            where = f"{field_name}.{key}"
            if key in NOT_YET_SUPPORTED:
                raise ValueError(f"{where}: not supported yet")
            if key in ACCEPTED_NO_OP:
                continue
            if key not in known:
                raise ValueError(f"{where}: unknown sampling parameter")
            values[key] = _coerce(key, value, where)
        params = cls(**values)
        params.validate(field_name)
        return params

    def validate(self, field_name: str = "sampling_parameters") -> None:
        if self.max_tokens < 1:
            raise ValueError(f"{field_name}.max_tokens: must be >= 1, got {self.max_tokens}")
        if self.temperature < 0:
            raise ValueError(f"{field_name}.temperature: must be >= 0, got {self.temperature}")
        if not 0 < self.top_p <= 1:
            raise ValueError(f"{field_name}.top_p: must be in (0, 1], got {self.top_p}")
        if self.top_k < -1:
            raise ValueError(f"{field_name}.top_k: must be -1, 0 or positive, got {self.top_k}")

    def to_json(self) -> str:
        return json.dumps({f.name: getattr(self, f.name) for f in fields(self)})


_BOOL_WORDS = {"true": True, "false": False, "1": True, "0": False}


def _coerce(key: str, value, where: str):
    """Triton vLLM-backend clients often send numbers as strings ("0.7"); accept both."""
    try:
        if key in ("max_tokens", "top_k"):
            if isinstance(value, bool) or (isinstance(value, float) and not value.is_integer()):
                raise ValueError
            return int(value)
        if key == "seed":
            return None if value is None else int(value)
        if key in ("temperature", "top_p"):
            if isinstance(value, bool):
                raise ValueError
            return float(value)
        if key == "ignore_eos":
            if isinstance(value, bool):
                return value
            return _BOOL_WORDS[str(value).lower()]
        if key == "stop_token_ids":
            if not isinstance(value, list):
                raise ValueError
            return [int(v) for v in value]
    except (TypeError, ValueError, KeyError):
        pass
    raise ValueError(f"{where}: invalid value {value!r}")
