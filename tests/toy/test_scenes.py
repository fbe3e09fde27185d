"""Synthetic scenes: seeded, unambiguous, and their answers agree with the geometry that is drawn."""
from __future__ import annotations

import random

import numpy as np
import pytest

from triton_vlm.toy.scenes import (COLOURS, GRID, NUMBERS, QTYPES, Scene, Shape, all_questions, ask, caption,
                                   held_out, render, sample_example, sample_scene, training_rng)


def scenes(n: int, seed: int = 0) -> list[Scene]:
    rng = random.Random(seed)
    return [sample_scene(rng) for _ in range(n)]


def test_a_seed_fixes_the_stream():
    assert scenes(20, seed=1) == scenes(20, seed=1)
    assert scenes(20, seed=1) != scenes(20, seed=2)


def test_every_question_is_unambiguous_and_shapes_stay_in_their_cell():
    for scene in scenes(300):
        assert 1 <= len(scene.shapes) <= 3
        assert len({s.kind for s in scene.shapes}) == len(scene.shapes)
        assert len({s.colour for s in scene.shapes}) == len(scene.shapes)
        columns = [int(s.x * GRID) for s in scene.shapes]
        assert len(set(columns)) == len(columns)
        for s in scene.shapes:
            for centre in (s.x, s.y):
                cell = int(centre * GRID) / GRID
                assert cell < centre - s.r and centre + s.r < cell + 1 / GRID


@pytest.mark.parametrize("qtype", ["colour", "shape", "count", "spatial"])
def test_answers_agree_with_the_scene(qtype):
    rng = random.Random(3)
    for _ in range(100):
        e = sample_example(rng, 48, qtype)
        shapes = {s.kind: s for s in e.scene.shapes}
        if qtype == "colour":
            assert e.answer == shapes[e.question.split()[-1].rstrip("?")].colour
        elif qtype == "shape":
            assert e.answer in shapes
        elif qtype == "count":
            assert e.answer == NUMBERS[len(e.scene.shapes)]
        else:
            words = e.question.rstrip("?").split()
            a, b = shapes[words[2]], shapes[words[-1]]
            assert e.answer == ("yes" if a.x < b.x else "no")
        assert e.question in all_questions() or qtype == "caption"


def test_caption_lists_shapes_left_to_right():
    scene = Scene([Shape("star", "orange", 0.8, 0.2, 0.1), Shape("circle", "red", 0.15, 0.5, 0.1),
                   Shape("square", "blue", 0.5, 0.8, 0.1)], (255, 255, 255), 0.0, 0)
    assert caption(scene) == "a red circle, a blue square and an orange star"
    assert ask(scene, "caption", random.Random(0)) == ("Describe the image.", caption(scene))


def test_render_draws_each_shape_in_its_colour_at_its_place():
    scene = Scene([Shape("square", "blue", 0.17, 0.5, 0.14), Shape("circle", "yellow", 0.83, 0.17, 0.14)],
                  (240, 240, 240), 0.0, 0)
    img = np.asarray(render(scene, 48))
    assert img.shape == (48, 48, 3)
    for s in scene.shapes:
        assert tuple(img[int(s.y * 48), int(s.x * 48)]) == COLOURS[s.colour]
    assert tuple(img[47, 24]) == (240, 240, 240)
    recoloured = np.asarray(render(scene.with_colour("square", "red"), 48))
    assert tuple(recoloured[24, 8]) == COLOURS["red"]
    assert (recoloured[:, 24:] == img[:, 24:]).all()  # the rest of the picture is untouched


def test_held_out_pairs_cycle_the_types_and_are_not_the_training_stream():
    pairs = list(held_out(10, 48, seed=0))
    assert [p[3] for p in pairs] == list(QTYPES) * 2
    assert [p[1:] for p in pairs] == [p[1:] for p in held_out(10, 48, seed=0)]
    # Drawn the same way from the training stream of the same seed, not one image repeats.
    train = training_rng(0)
    seen = {sample_example(train, 48, q).image.tobytes() for q in [p[3] for p in pairs]}
    assert not seen & {p[0].tobytes() for p in pairs}
