"""The trained toy VLM (models/toy-vlm) served by a real tritonserver really looks at the image."""
from __future__ import annotations

from pathlib import Path

import pytest

from triton_vlm.repository import BuildOptions, build_repository
from triton_vlm.server import TritonServer
from triton_vlm.toy import evaluate as ev
from triton_vlm.toy.scenes import Scene, Shape, render

CHECKPOINT = Path(__file__).resolve().parents[2] / "models" / "toy-vlm"
# A small KV pool is plenty for one short request at a time.
LLM_PARAMS = {"num_kv_blocks": "256", "block_size": "16", "torch_threads": "1"}


@pytest.fixture(scope="module")
def toy_server(tmp_path_factory):
    if not (CHECKPOINT / "model.safetensors").exists():
        pytest.skip(f"{CHECKPOINT} is not trained yet (issue 3): train it with scripts/train_toy_vlm.py")
    repo = build_repository(CHECKPOINT, tmp_path_factory.mktemp("toy") / "repo", BuildOptions(llm=LLM_PARAMS))
    with TritonServer(repo, log_path=repo.parent / "server.log") as server:
        yield server


@pytest.fixture(scope="module")
def processor():
    from transformers import AutoProcessor

    return AutoProcessor.from_pretrained(CHECKPOINT)


def test_held_out_accuracy(toy_server, processor):
    results = ev.evaluate(ev.triton_predictor(toy_server.grpc_url), processor, n=50, seed=123)
    correct = sum(r.correct for r in results)
    assert correct / len(results) >= 0.9, ev.table(results)


def test_answer_follows_the_pixels(toy_server, processor):
    red = Scene([Shape("circle", "red", 0.28, 0.55, 0.17), Shape("square", "green", 0.72, 0.35, 0.15)],
                background=(236, 232, 220), noise=0.0, noise_seed=0)
    blue = red.with_colour("circle", "blue")
    predict = ev.triton_predictor(toy_server.grpc_url)
    prompt = ev.chat_prompt(processor, "What colour is the circle?")
    size = ev.image_size(processor)
    assert predict(render(red, size), prompt) == "red"
    assert predict(render(blue, size), prompt) == "blue"
