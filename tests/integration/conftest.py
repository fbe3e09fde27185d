"""Real tritonserver fixtures: build a repository for a checkpoint and serve it on free ports."""
from __future__ import annotations

import pytest
from helpers import TOY_CHECKPOINT

from triton_vlm.repository import BuildOptions, build_repository
from triton_vlm.server import TritonServer

# A small pool keeps the servers light; 512 blocks of 16 tokens is ample for these prompts.
LLM_PARAMS = {"num_kv_blocks": "512", "block_size": "16", "torch_threads": "1"}


def serve(checkpoint, tmp_path_factory, name):
    repo = build_repository(checkpoint, tmp_path_factory.mktemp(name) / "repo", BuildOptions(llm=LLM_PARAMS))
    server = TritonServer(repo, log_path=repo.parent / "server.log")
    server.start()
    return server


@pytest.fixture(scope="session")
def tiny_server(tiny_checkpoint, tmp_path_factory):
    server = serve(tiny_checkpoint, tmp_path_factory, "tiny")
    yield server
    server.stop()


@pytest.fixture(scope="session")
def second_server(second_checkpoint, tmp_path_factory):
    server = serve(second_checkpoint, tmp_path_factory, "second")
    yield server
    server.stop()


@pytest.fixture(scope="session")
def toy_server(tmp_path_factory):
    server = serve(TOY_CHECKPOINT, tmp_path_factory, "toy")
    yield server
    server.stop()
