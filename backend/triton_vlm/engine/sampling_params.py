"""Per-request sampling parameters, parsed from the vLLM-style `sampling_parameters` JSON.

Every field is checked for type, range and finiteness before a request reaches the engine,
so a bad value fails its own request with a message naming the field, never the sampler.
"""
from __future__ import annotations

import json
import math
import numbers
from dataclasses import dataclass, field, fields

# vLLM names we know of but do not implement: refused by name, never silently ignored.
NOT_SUPPORTED = {"best_of", "use_beam_search", "beam_width", "length_penalty", "early_stopping",
                 "logits_processors", "truncate_prompt_tokens", "guided_decoding", "output_kind", "detokenize"}

MIN_TEMPERATURE = 1e-5  # closer to 0, logits / temperature overflow to inf
SEED_MIN, SEED_MAX = -2**63, 2**64 - 1  # what torch.Generator.manual_seed accepts
MAX_STOP_TOKEN_IDS = 1024  # also bounds allowed_token_ids, logit_bias and bad_words
MAX_N = 16  # completions per request
MAX_LOGPROBS = 20  # vLLM's default max_logprobs
MAX_STOPS, MAX_STOP_CHARS = 16, 256
MAX_LOGIT_BIAS = 100.0  # OpenAI's range
STRUCTURED_KINDS = ("json", "regex", "choice", "grammar", "json_object")
MAX_STRUCTURED_CHARS = 64 * 1024


@dataclass
class SamplingParams:
    """vLLM's names, defaults and meanings, so Triton vLLM-backend clients see the same behaviour."""

    n: int = 1
    max_tokens: int = 16
    min_tokens: int = 0
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0  # 0 or -1: no top-k filter
    min_p: float = 0.0
    seed: int | None = None
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    repetition_penalty: float = 1.0
    logit_bias: dict[int, float] | None = None
    allowed_token_ids: list[int] | None = None
    bad_words: list[str] = field(default_factory=list)
    stop: list[str] = field(default_factory=list)
    stop_token_ids: list[int] = field(default_factory=list)
    include_stop_str_in_output: bool = False
    ignore_eos: bool = False
    logprobs: int | None = None  # top logprobs per generated token (the sampled token's is added)
    prompt_logprobs: int | None = None
    skip_special_tokens: bool = True
    spaces_between_special_tokens: bool = True
    # {"json": schema} | {"regex": str} | {"choice": [str]} | {"grammar": lark} | {"json_object": true}
    structured_outputs: dict | None = None

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
        return cls.from_dict(_json(text, field_name), field_name, max_tokens_limit)

    @classmethod
    def from_dict(cls, raw: dict, field_name: str = "sampling_parameters",
                  max_tokens_limit: int | None = None) -> "SamplingParams":
        if not isinstance(raw, dict):
            raise ValueError(f"{field_name}: expected a JSON object, got {_show(raw)}")
        known = {f.name for f in fields(cls)}
        for key in raw:
            if key in NOT_SUPPORTED:
                raise ValueError(f"{field_name}.{key}: not supported")
            if key not in known:
                raise ValueError(f"{field_name}.{key}: unknown sampling parameter")
        params = cls(**raw)
        params.validate(field_name, max_tokens_limit)
        return params

    def validate(self, field_name: str = "sampling_parameters", max_tokens_limit: int | None = None) -> None:
        """Check every field; numbers given as strings ("0.7") become numbers.

        Raises ValueError "<field_name>.<field>: <problem>, got <value>" for the first bad field.
        """
        at = f"{field_name}."
        self.n = _integer(self.n, at + "n")
        _require(1 <= self.n <= MAX_N, at + "n", f"must be in [1, {MAX_N}]", self.n)
        self.max_tokens = _integer(self.max_tokens, at + "max_tokens")
        _require(self.max_tokens >= 1, at + "max_tokens", "must be >= 1", self.max_tokens)
        if max_tokens_limit is not None and self.max_tokens > max_tokens_limit:
            raise ValueError(f"{at}max_tokens: {self.max_tokens} exceeds this server's limit of {max_tokens_limit}")
        self.min_tokens = _integer(self.min_tokens, at + "min_tokens")
        _require(0 <= self.min_tokens <= self.max_tokens, at + "min_tokens", "must be in [0, max_tokens]",
                 self.min_tokens)
        self.temperature = _real(self.temperature, at + "temperature")
        _require(self.temperature == 0 or self.temperature >= MIN_TEMPERATURE, at + "temperature",
                 f"must be 0 (greedy) or >= {MIN_TEMPERATURE}", self.temperature)
        self.top_p = _real(self.top_p, at + "top_p")
        _require(0 < self.top_p <= 1, at + "top_p", "must be in (0, 1]", self.top_p)
        self.top_k = _integer(self.top_k, at + "top_k")
        _require(self.top_k >= -1, at + "top_k", "must be -1, 0 or positive", self.top_k)
        self.min_p = _real(self.min_p, at + "min_p")
        _require(0 <= self.min_p <= 1, at + "min_p", "must be in [0, 1]", self.min_p)
        if self.seed is not None:
            self.seed = _integer(self.seed, at + "seed", "an integer or null")
            _require(SEED_MIN <= self.seed <= SEED_MAX, at + "seed", "must be in [-2**63, 2**64 - 1]", self.seed)
        for name in ("presence_penalty", "frequency_penalty"):
            value = _real(getattr(self, name), at + name)
            _require(-2 <= value <= 2, at + name, "must be in [-2, 2]", value)
            setattr(self, name, value)
        self.repetition_penalty = _real(self.repetition_penalty, at + "repetition_penalty")
        _require(0.01 <= self.repetition_penalty <= 100, at + "repetition_penalty", "must be in [0.01, 100]",
                 self.repetition_penalty)
        self.logit_bias = _logit_bias(self.logit_bias, at + "logit_bias")
        if self.allowed_token_ids is not None:
            self.allowed_token_ids = _token_ids(self.allowed_token_ids, at + "allowed_token_ids")
            _require(len(self.allowed_token_ids) > 0, at + "allowed_token_ids", "must not be empty", [])
        self.bad_words = _strings(self.bad_words, at + "bad_words", MAX_STOP_TOKEN_IDS)
        self.stop = _strings([self.stop] if isinstance(self.stop, str) else self.stop, at + "stop", MAX_STOPS)
        self.stop_token_ids = _token_ids(self.stop_token_ids, at + "stop_token_ids")
        for name in ("include_stop_str_in_output", "ignore_eos", "skip_special_tokens",
                     "spaces_between_special_tokens"):
            setattr(self, name, _boolean(getattr(self, name), at + name))
        for name in ("logprobs", "prompt_logprobs"):
            if getattr(self, name) is not None:
                value = _integer(getattr(self, name), at + name, "an integer or null")
                _require(0 <= value <= MAX_LOGPROBS, at + name, f"must be in [0, {MAX_LOGPROBS}]", value)
                setattr(self, name, value)
        self.structured_outputs = _structured(self.structured_outputs, at + "structured_outputs")

    def to_json(self) -> str:
        return json.dumps({f.name: getattr(self, f.name) for f in fields(self)})


def _json(text, where: str):
    try:
        return json.loads(text)
    except (ValueError, RecursionError) as e:  # ValueError: bad syntax, bad UTF-8, an int of > 4300 digits
        raise ValueError(f"{where}: not valid JSON ({e})") from None


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


def _strings(value, where: str, most: int) -> list[str]:
    _require(isinstance(value, (list, tuple)), where, "must be a string or a list of strings", value)
    if len(value) > most:
        raise ValueError(f"{where}: must hold at most {most} strings, got {len(value)}")
    for i, v in enumerate(value):
        _require(isinstance(v, str) and 0 < len(v) <= MAX_STOP_CHARS, f"{where}[{i}]",
                 f"must be a non-empty string of at most {MAX_STOP_CHARS} characters", v)
    return list(value)


def _logit_bias(value, where: str) -> dict[int, float] | None:
    if value is None:
        return None
    _require(isinstance(value, dict), where, "must be an object of token id: bias", value)
    if len(value) > MAX_STOP_TOKEN_IDS:
        raise ValueError(f"{where}: must hold at most {MAX_STOP_TOKEN_IDS} entries, got {len(value)}")
    bias = {}
    for key, v in value.items():
        token = _integer(key, f"{where}[{_show(key)}]", "a token id (an integer)")
        _require(token >= 0, f"{where}[{_show(key)}]", "must be a non-negative token id", key)
        b = _real(v, f"{where}[{_show(key)}]")
        _require(-MAX_LOGIT_BIAS <= b <= MAX_LOGIT_BIAS, f"{where}[{_show(key)}]",
                 f"must be in [-{MAX_LOGIT_BIAS:g}, {MAX_LOGIT_BIAS:g}]", b)
        bias[token] = b
    return bias


def _structured(value, where: str) -> dict | None:
    """One of STRUCTURED_KINDS; a JSON string of the object is accepted too, as the vLLM backend sends it."""
    if value is None:
        return None
    if isinstance(value, (str, bytes)):
        value = _json(value, where)
    _require(isinstance(value, dict), where, f"must be an object with one of {', '.join(STRUCTURED_KINDS)}",
             value)
    kinds = [k for k, v in value.items() if v is not None]
    for k in kinds:
        _require(k in STRUCTURED_KINDS, f"{where}.{k}", f"unknown kind (expected one of "
                 f"{', '.join(STRUCTURED_KINDS)})", value[k])
    _require(len(kinds) == 1, where, f"must set exactly one of {', '.join(STRUCTURED_KINDS)}", value)
    kind, spec = kinds[0], value[kinds[0]]
    here = f"{where}.{kind}"
    if kind == "json" and isinstance(spec, str):
        spec = _json(spec, here)
    if kind == "json":
        _require(isinstance(spec, (dict, bool)), here, "must be a JSON schema (an object)", spec)
    elif kind == "choice":
        spec = _strings(spec, here, MAX_STOP_TOKEN_IDS)
        _require(len(spec) > 0, here, "must hold at least one string", spec)
    elif kind == "json_object":
        _require(_boolean(spec, here), here, "must be true", spec)
        spec = True
    else:
        _require(isinstance(spec, str) and spec.strip() != "", here, "must be a non-empty string", spec)
    if len(json.dumps(spec)) > MAX_STRUCTURED_CHARS:
        raise ValueError(f"{here}: longer than {MAX_STRUCTURED_CHARS} characters")
    return {kind: spec}
