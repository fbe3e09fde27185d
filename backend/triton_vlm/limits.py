"""What one request to `vlm` may ask for: the serving limits, in one place.

`triton-vlm build` writes them into the vlm config (one flag per field), the vlm adapter reads
them back and refuses anything beyond them by name, before any vision or LLM work is done.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass, fields

from .preprocess import DEFAULT_MAX_IMAGE_PIXELS


@dataclass
class ServingLimits:
    max_image_pixels: int = DEFAULT_MAX_IMAGE_PIXELS  # width x height, checked from the header before decoding
    max_images_per_request: int = 8
    max_prompt_tokens: int = 0  # image tokens included; 0: max_model_len - 1 (room for one new token)
    max_tokens: int = 0  # the largest sampling_parameters.max_tokens; 0: max_model_len
    max_request_bytes: int = 64 * 1024 * 1024  # all input tensors together
    max_concurrent_requests: int = 64  # requests vlm works on at once
    max_queued_requests: int = 256  # more wait behind those; beyond that: "server busy"
    vision_timeout_s: float = 60.0  # the longest wait for one vision_encoder call
    llm_idle_timeout_s: float = 600.0  # the longest llm silence tolerated while llm answers pings

    @classmethod
    def from_params(cls, params: dict[str, str]) -> "ServingLimits":
        defaults = cls()
        return cls(**{f.name: type(getattr(defaults, f.name))(params[f.name])
                      for f in fields(cls) if params.get(f.name, "") != ""})

    def resolved(self, max_model_len: int) -> "ServingLimits":
        """Fill the 0 defaults that depend on the model, and check every limit is usable."""
        limits = ServingLimits(**asdict(self))
        limits.max_prompt_tokens = min(limits.max_prompt_tokens or max_model_len - 1, max_model_len - 1)
        limits.max_tokens = limits.max_tokens or max_model_len
        for f in fields(limits):
            if getattr(limits, f.name) <= 0:
                raise ValueError(f"--{f.name.replace('_', '-')}: must be positive, got {getattr(limits, f.name)}")
        return limits

    def to_params(self) -> dict[str, str]:
        return {k: str(v) for k, v in asdict(self).items()}
