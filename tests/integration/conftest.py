"""Real tritonserver fixtures: build a repository for a checkpoint and serve it on free ports."""
from __future__ import annotations

import pytest
from helpers import TOY_CHECKPOINT, serve, start_openai


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


@pytest.fixture(scope="session")
def toy_api(toy_server):
    running, url = start_openai(toy_server.grpc_url)
    yield url
    running.stop()


@pytest.fixture(scope="session")
def sdk(toy_api):
    """The official openai client on the toy model's OpenAI API."""
    import openai

    return openai.OpenAI(base_url=toy_api + "/v1", api_key="unused", max_retries=0, timeout=120)
