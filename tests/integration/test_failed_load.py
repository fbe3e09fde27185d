"""A missing or corrupt checkpoint or ONNX file fails the start with an error naming the file, and
nothing of the server survives the failure."""
from __future__ import annotations

import shutil
import time
from pathlib import Path
from typing import Callable, NamedTuple

import psutil
import pytest
from helpers import LLM_PARAMS

from triton_vlm.repository import BuildOptions, build_repository
from triton_vlm.server import TritonServer


@pytest.fixture(scope="module")
def built(tiny_checkpoint, tmp_path_factory) -> tuple[Path, Path]:
    repo = build_repository(tiny_checkpoint, tmp_path_factory.mktemp("failed_load") / "repo",
                            BuildOptions(llm=LLM_PARAMS))
    return tiny_checkpoint, repo


def copy_of(built, tmp_path: Path, models: tuple[str, ...]) -> tuple[Path, Path]:
    """A private checkpoint, free to break, and a repository of `models` that points at it."""
    ckpt, repo = built
    new_ckpt = shutil.copytree(ckpt, tmp_path / "ckpt")
    for model in models:
        shutil.copytree(repo / model, tmp_path / "repo" / model)
        config = tmp_path / "repo" / model / "config.pbtxt"
        config.write_text(config.read_text().replace(str(ckpt), str(new_ckpt)))
    return new_ckpt, tmp_path / "repo"


def survivors(repo: Path) -> list[psutil.Process]:
    """Processes of this repository's server: tritonserver names it, each stub names its model.py in it."""
    found = []
    for p in psutil.process_iter():
        try:
            if any(str(repo) in arg for arg in p.cmdline()):
                found.append(p)
        except psutil.Error:
            pass
    return found


def truncate(f: Path) -> None:
    f.write_bytes(f.read_bytes()[: f.stat().st_size // 2])


def garbage(f: Path) -> None:
    f.write_bytes(b"\x00\x01 this is not what you think it is \xff" * 64)


def pickle_only(f: Path) -> None:
    # Never unpickled, so its content does not matter: the name alone must be refused.
    f.unlink()
    (f.parent / "pytorch_model.bin").write_bytes(b"pretend pickle")


class Case(NamedTuple):
    models: tuple[str, ...]  # the repository holds only these, to keep each start light
    root: str  # the broken file lives in the checkpoint ("ckpt") or the repository ("repo")
    file: str
    damage: Callable[[Path], None]
    message: str


ALL = ("llm", "vision_encoder", "vlm")
CASES = {
    "config_missing": Case(("llm",), "ckpt", "config.json", Path.unlink, "config.json: missing"),
    "config_garbage": Case(("llm",), "ckpt", "config.json", garbage, "config.json: not a readable JSON file"),
    # The whole repository once: vlm and vision_encoder load fine and must be torn down with the server.
    "weights_truncated": Case(ALL, "ckpt", "model.safetensors", truncate,
                              "model.safetensors: not a readable safetensors file"),
    "weights_garbage": Case(("llm",), "ckpt", "model.safetensors", garbage,
                            "model.safetensors: not a readable safetensors file"),
    "weights_pickle_only": Case(("llm",), "ckpt", "model.safetensors", pickle_only,
                                "weights only in pytorch_model.bin; triton-vlm loads *.safetensors only"),
    "onnx_missing": Case(("vision_encoder",), "repo", "vision_encoder/1/model.onnx", Path.unlink,
                         "model.onnx: missing"),
    "onnx_garbage": Case(("vision_encoder",), "repo", "vision_encoder/1/model.onnx", garbage,
                         "model.onnx: not a loadable ONNX model"),
}


@pytest.mark.parametrize("name", CASES)
def test_a_broken_file_fails_the_start_naming_it(name, built, tmp_path):
    case = CASES[name]
    ckpt, repo = copy_of(built, tmp_path, case.models)
    path = (ckpt if case.root == "ckpt" else repo) / case.file
    case.damage(path)
    server = TritonServer(repo, log_path=tmp_path / "server.log")
    started = time.monotonic()
    with pytest.raises(RuntimeError, match="tritonserver exited") as failure:
        server.start(timeout=120)
    assert time.monotonic() - started < 60, "a failed load should end the start promptly"
    text = str(failure.value)
    assert case.message in text and str(path.parent) in text, text
    assert server.proc is None
    assert survivors(repo) == [], "the failed server or its stubs outlived the failure"
