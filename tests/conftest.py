"""Shared fixtures: small checkpoints made on the spot, real photos, HF references."""
from __future__ import annotations

import os
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

from helpers import SECOND_GEOMETRY, HFReference, photo  # noqa: E402


@pytest.fixture(scope="session")
def tiny_checkpoint(tmp_path_factory) -> Path:
    from triton_vlm.checkpoint import make_tiny

    return make_tiny(tmp_path_factory.mktemp("ckpt") / "tiny")


@pytest.fixture(scope="session")
def second_checkpoint(tmp_path_factory) -> Path:
    from triton_vlm.checkpoint import make_tiny

    return make_tiny(tmp_path_factory.mktemp("ckpt") / "second", seed=1, **SECOND_GEOMETRY)


@pytest.fixture(scope="session")
def photos() -> dict[str, bytes]:
    return {"chelsea": photo("chelsea"), "astronaut": photo("astronaut", "JPEG"), "coffee": photo("coffee")}


@pytest.fixture(scope="session")
def hf_tiny(tiny_checkpoint) -> HFReference:
    return HFReference(tiny_checkpoint)


@pytest.fixture(scope="session")
def hf_second(second_checkpoint) -> HFReference:
    return HFReference(second_checkpoint)


@pytest.fixture(scope="session", params=[("2", "nested"), ("2.5", "flat")], ids=["qwen2-vl", "qwen2.5-vl-flat"])
def qwen_checkpoint(request, tmp_path_factory) -> Path:
    """Tiny random Qwen2-VL (transformers 5's nested config) and Qwen2.5-VL (the Hub's flat config)."""
    from triton_vlm.checkpoint_qwen import make_tiny_qwen

    version, layout = request.param
    return make_tiny_qwen(tmp_path_factory.mktemp("ckpt") / f"qwen{version}-{layout}", version=version, layout=layout)


@pytest.fixture(scope="session")
def hf_qwen(qwen_checkpoint):
    from helpers import QwenReference

    return QwenReference(qwen_checkpoint)
