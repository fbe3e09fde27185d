"""Per-request sampling parameters, parsed from the vLLM-style `sampling_parameters` JSON.

Every field is checked for type, range and finiteness before a request reaches the engine,
so a bad value fails its own request with a message naming the field, never the sampler.
"""
from __future__ import annotations

import json
import math
import numbers
from dataclasses import dataclass, field, fields

# vLLM names we know of but do not implement yet: refused by name, never silently ignored.
NOT_YET_SUPPORTED = {
    "n", "best_of", "presence_penalty", "frequency_penalty", "repetition_penalty", "min_p", "stop",
    "min_tokens", "logprobs", "prompt_logprobs", "logit_bias", "allowed_token_ids", "bad_words",
    "include_stop_str_in_output", "beam_width", "use_beam_search",
}
# Accepted and without effect on generated tokens (detokenisation always skips special tokens).
ACCEPTED_NO_OP = {"skip_special_tokens", "spaces_between_special_tokens"}

MIN_TEMPERATURE = 1e-5  # closer to 0, logits / temperature overflow to inf
SEED_MIN, SEED_MAX = -2**63, 2**64 - 1  # what torch.Generator.manual_seed accepts
MAX_STOP_TOKEN_IDS = 1024


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
    def from_json(cls, text: str | bytes | None, field_name: str = "sampling_parameters",
                  max_tokens_limit: int | None = None) -> "SamplingParams":
        if text is None or (isinstance(text, (bytes, str)) and not text.strip()):
            text = "{}"
        if not isinstance(text, (bytes, bytearray, str)):
            raise ValueError(f"{field_name}: expected JSON text, got {type(text).__name__}")
        try:
            raw = json.loads(text)
        except (ValueError, RecursionError) as e:  # ValueError: bad syntax, bad UTF-8, an int of > 4300 digits
            raise ValueError(f"{field_name}: not valid JSON ({e})") from None
        return cls.from_dict(raw, field_name, max_tokens_limit)

    @classmethod
    def from_dict(cls, raw: dict, field_name: str = "sampling_parameters",
                  max_tokens_limit: int | None = None) -> "SamplingParams":
        if not isinstance(raw, dict):
            raise ValueError(f"{field_name}: expected a JSON object, got {_show(raw)}")
        known = {f.name for f in fields(cls)}
        values = {}
        for key, value in raw.items():
            where = f"{field_name}.{key}"
            if key in NOT_YET_SUPPORTED:
                raise ValueError(f"{where}: not supported yet")
            if key in ACCEPTED_NO_OP:
                _boolean(value, where)
                continue
            if key not in known:
                raise ValueError(f"{where}: unknown sampling parameter")
            values[key] = value
        params = cls(**values)
        params.validate(field_name, max_tokens_limit)
        return params

    def validate(self, field_name: str = "sampling_parameters", max_tokens_limit: int | None = None) -> None:
        """Check every field; numbers given as strings ("0.7") become numbers.

        Raises ValueError "<field_name>.<field>: <problem>, got <value>" for the first bad field.
        """
        at = f"{field_name}."
        self.max_tokens = _integer(self.max_tokens, at + "max_tokens")
        _require(self.max_tokens >= 1, at + "max_tokens", "must be >= 1", self.max_tokens)
        if max_tokens_limit is not None and self.max_tokens > max_tokens_limit:
            raise ValueError(f"{at}max_tokens: {self.max_tokens} exceeds this server's limit of {max_tokens_limit}")
        self.temperature = _real(self.temperature, at + "temperature")
        _require(self.temperature == 0 or self.temperature >= MIN_TEMPERATURE, at + "temperature",
                 f"must be 0 (greedy) or >= {MIN_TEMPERATURE}", self.temperature)
        self.top_p = _real(self.top_p, at + "top_p")
        _require(0 < self.top_p <= 1, at + "top_p", "must be in (0, 1]", self.top_p)
        self.top_k = _integer(self.top_k, at + "top_k")
        _require(self.top_k >= -1, at + "top_k", "must be -1, 0 or positive", self.top_k)
        if self.seed is not None:
            self.seed = _integer(self.seed, at + "seed", "an integer or null")
            _require(SEED_MIN <= self.seed <= SEED_MAX, at + "seed", "must be in [-2**63, 2**64 - 1]", self.seed)
        self.ignore_eos = _boolean(self.ignore_eos, at + "ignore_eos")
        self.stop_token_ids = _token_ids(self.stop_token_ids, at + "stop_token_ids")

    def to_json(self) -> str:
        return json.dumps({f.name: getattr(self, f.name) for f in fields(self)})


def _require(ok: bool, where: str, problem: str, value) -> None:
    if not ok:
        raise ValueError(f"{where}: {problem}, got {_show(value)}")


def _show(value) -> str:
    """The offending value as JSON (NaN, true, null, "2.5"), cut short."""
    try:
        text = json.dumps(value, default=repr)
    except Exception:  # noqa: BLE001  (e.g. an int too long to print: only the message is at stake)
        text = f"a {type(value).__name__}"
    return text if len(text) <= 80 else text[:77] + "..."


def _number(value, where: str, kind: str) -> int | float:
    """An int or float from a number or a numeric string (vLLM-backend clients send "0.7"); bools are not numbers."""
    if isinstance(value, str):
        for parse in (int, float):
            try:
                return parse(value)
            except ValueError:
                pass
    elif isinstance(value, numbers.Integral) and not isinstance(value, bool):
        return int(value)
    elif isinstance(value, numbers.Real) and not isinstance(value, bool):
        return float(value)
    raise ValueError(f"{where}: must be {kind}, got {_show(value)}")


def _integer(value, where: str, kind: str = "an integer") -> int:
    """2, 2.0, "2" and "2.0" are integers; 2.5, "2.5", "abc", true and null are not."""
    number = _number(value, where, kind)
    if isinstance(number, float):
        if not (math.isfinite(number) and number.is_integer()):
            raise ValueError(f"{where}: must be {kind}, got {_show(value)}")
        number = int(number)
    return number


def _real(value, where: str) -> float:
    number = _number(value, where, "a number")
    try:
        number = float(number)
    except OverflowError:  # an int beyond float range
        number = math.inf
    _require(math.isfinite(number), where, "must be a finite number", value)
    return number


_BOOL_WORDS = {"true": True, "false": False, "1": True, "0": False}


def _boolean(value, where: str) -> bool:
    if isinstance(value, bool):
        return value
    if isinstance(value, int) and value in (0, 1):
        return bool(value)
    if isinstance(value, str) and value.strip().lower() in _BOOL_WORDS:
        return _BOOL_WORDS[value.strip().lower()]
    raise ValueError(f"{where}: must be true or false, got {_show(value)}")


def _token_ids(value, where: str) -> list[int]:
    _require(isinstance(value, (list, tuple)), where, "must be a list of token ids", value)
    if len(value) > MAX_STOP_TOKEN_IDS:
        raise ValueError(f"{where}: must hold at most {MAX_STOP_TOKEN_IDS} token ids, got {len(value)}")
    ids = [_integer(v, f"{where}[{i}]", "a token id (an integer)") for i, v in enumerate(value)]
    for i, t in enumerate(ids):
        _require(t >= 0, f"{where}[{i}]", "must be a non-negative token id", t)
    return ids
