"""The trained toy VLM (models/toy-vlm) served by a real tritonserver really looks at the image."""
from __future__ import annotations

import pytest
from helpers import TOY_CHECKPOINT

from triton_vlm.toy import evaluate as ev
from triton_vlm.toy.scenes import Scene, Shape, render


@pytest.fixture(scope="module")
def processor():
    from transformers import AutoProcessor

    return AutoProcessor.from_pretrained(TOY_CHECKPOINT)


@pytest.fixture(scope="module")
def ask(toy_server, processor):
    """ask(question, *shapes, history=()): the served model's answer about a clean scene of those shapes,
    after the earlier (question, answer) turns of `history`."""
    predict = ev.triton_predictor(toy_server.grpc_url)

    def ask(question: str, *shapes: Shape, history=()) -> str:
        scene = Scene(list(shapes), background=(236, 232, 220), noise=0.0, noise_seed=0)
        return predict(render(scene, ev.image_size(processor)), ev.chat_prompt(processor, question, history))

    return ask


def test_held_out_accuracy(toy_server, processor):
    results = ev.evaluate(ev.triton_predictor(toy_server.grpc_url), processor, n=50, seed=123)
    correct = sum(r.correct for r in results)
    assert correct / len(results) >= 0.9, ev.table(results)


def test_held_out_follow_ups(toy_server, processor):
    """Second and third questions in chats about one image, the model's own answers as history."""
    results = ev.evaluate_chats(ev.triton_predictor(toy_server.grpc_url), processor, n=20, seed=123)
    correct = sum(r.correct for r in results)
    assert correct / len(results) >= 0.9, ev.table(results)


# Laid out as sample_scene would: each shape inside its own cell of the 3 x 3 grid.
def test_answer_follows_the_colour(ask):
    square = Shape("square", "green", 0.83, 0.18, 0.12)
    assert ask("What colour is the circle?", Shape("circle", "red", 0.17, 0.5, 0.13), square) == "red"
    assert ask("What colour is the circle?", Shape("circle", "blue", 0.17, 0.5, 0.13), square) == "blue"


def test_answer_follows_the_layout(ask):
    question = "Is the circle left of the square?"
    assert ask(question, Shape("circle", "red", 0.17, 0.5, 0.13), Shape("square", "green", 0.83, 0.18, 0.12)) == "yes"
    assert ask(question, Shape("circle", "red", 0.83, 0.5, 0.13), Shape("square", "green", 0.17, 0.18, 0.12)) == "no"


def test_follow_up_reads_the_previous_turn(ask):
    """The same image, an elliptic follow-up: what it asks for depends on the turn before."""
    circle, square = Shape("circle", "red", 0.17, 0.5, 0.13), Shape("square", "green", 0.83, 0.18, 0.12)
    assert ask("And the square?", circle, square, history=[("What colour is the circle?", "red")]) == "green"
    assert ask("And the green one?", circle, square, history=[("What shape is red?", "circle")]) == "square"
    assert ask("And the circle?", circle, square, history=[("What colour is the square?", "green")]) == "red"
