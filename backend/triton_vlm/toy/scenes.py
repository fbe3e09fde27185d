"""Synthetic scenes of coloured shapes and questions about them, for the toy VLM.

Everything is drawn from a caller-supplied `random.Random`, so a seed fixes the stream.
Each shape type and each colour occurs at most once per image, which keeps every question
unambiguous, and shapes sit in distinct columns so "left of" is never a close call.
"""
from __future__ import annotations

import math
import random
from dataclasses import dataclass, field, replace
from typing import NamedTuple

import numpy as np
from PIL import Image, ImageDraw

SHAPES = ("circle", "square", "triangle", "star")
COLOURS = {
    "red": (220, 30, 30),
    "green": (30, 150, 40),
    "blue": (30, 60, 225),
    "yellow": (240, 200, 0),
    "purple": (135, 40, 175),
    "orange": (250, 125, 0),
}
NUMBERS = ("zero", "one", "two", "three")
QTYPES = ("colour", "shape", "count", "spatial", "caption")

MAX_SHAPES = 3
GRID = 3
SUPERSAMPLE = 4  # draw large, then downsample: antialiased edges without a raster library


@dataclass
class Shape:
    kind: str
    colour: str
    x: float  # centre, as a fraction of the image side
    y: float
    r: float  # outer radius, as a fraction of the image side


@dataclass
class Scene:
    shapes: list[Shape]
    background: tuple[int, int, int]
    noise: float  # std of the background noise, in 0..255 units
    noise_seed: int
    jitter: list[tuple[int, int, int]] = field(default_factory=list)  # per-shape colour offsets

    def with_colour(self, kind: str, colour: str) -> "Scene":
        """The same scene with one shape recoloured (everything else, noise included, kept)."""
        return replace(self, shapes=[replace(s, colour=colour) if s.kind == kind else s for s in self.shapes])


def sample_scene(rng: random.Random, n: int | None = None) -> Scene:
    """Shapes sit in distinct columns of a GRID x GRID layout, jittered inside their cell.

    The grid matches the toy model's patches (48 px images, 16 px patches), so each shape lies within
    one patch; distinct columns keep every "left of" at least ~12 px clear.
    """
    n = n or rng.randint(1, MAX_SHAPES)
    kinds = rng.sample(SHAPES, n)
    colours = rng.sample(list(COLOURS), n)
    cell = 1.0 / GRID
    shapes = []
    for kind, colour, col in zip(kinds, colours, rng.sample(range(GRID), n)):
        row = rng.randrange(GRID)
        r = rng.uniform(0.32, 0.44) * cell
        lo, hi = r + 0.02, cell - r - 0.02
        shapes.append(Shape(kind, colour, col * cell + rng.uniform(lo, hi), row * cell + rng.uniform(lo, hi), r))
    background = tuple(rng.randint(200, 255) for _ in range(3))
    noise = rng.choice([0.0, rng.uniform(2.0, 8.0)])
    jitter = [tuple(rng.randint(-15, 15) for _ in range(3)) for _ in shapes]
    return Scene(shapes, background, noise, rng.getrandbits(32), jitter)


def outline(s: Shape, side: float) -> list[tuple[float, float]]:
    cx, cy, r = s.x * side, s.y * side, s.r * side
    if s.kind == "square":
        h = 0.8 * r
        return [(cx - h, cy - h), (cx + h, cy - h), (cx + h, cy + h), (cx - h, cy + h)]
    if s.kind == "triangle":
        return [(cx + r * math.cos(a), cy + 0.15 * r - r * math.sin(a))
                for a in (math.pi / 2, math.pi / 2 + 2 * math.pi / 3, math.pi / 2 + 4 * math.pi / 3)]
    if s.kind == "star":
        pts = []
        for i in range(10):
            rad = r if i % 2 == 0 else 0.45 * r
            a = math.pi / 2 + i * math.pi / 5
            pts.append((cx + rad * math.cos(a), cy - rad * math.sin(a)))
        return pts
    raise ValueError(s.kind)


def render(scene: Scene, size: int) -> Image.Image:
    big = size * SUPERSAMPLE
    img = Image.new("RGB", (big, big), scene.background)
    draw = ImageDraw.Draw(img)
    for s, jit in zip(scene.shapes, scene.jitter or [(0, 0, 0)] * len(scene.shapes)):
        fill = tuple(min(255, max(0, c + j)) for c, j in zip(COLOURS[s.colour], jit))
        if s.kind == "circle":
            cx, cy, r = s.x * big, s.y * big, 0.9 * s.r * big
            draw.ellipse([cx - r, cy - r, cx + r, cy + r], fill=fill)
        else:
            draw.polygon(outline(s, big), fill=fill)
    img = img.resize((size, size), Image.BOX)
    if scene.noise > 0:
        arr = np.asarray(img, dtype=np.float32)
        arr += np.random.default_rng(scene.noise_seed).normal(0.0, scene.noise, arr.shape)
        img = Image.fromarray(np.clip(arr + 0.5, 0, 255).astype(np.uint8))
    return img


def caption(scene: Scene) -> str:
    """Shapes from left to right: "a red circle, an orange star and a blue square"."""
    parts = [f"{'an' if s.colour[0] in 'aeiou' else 'a'} {s.colour} {s.kind}"
             for s in sorted(scene.shapes, key=lambda s: s.x)]
    return parts[0] if len(parts) == 1 else ", ".join(parts[:-1]) + " and " + parts[-1]


class Turn(NamedTuple):
    """One question and its answer; `subject` is the shape asked about, which "And the ...?" refers back to."""
    question: str
    answer: str
    qtype: str
    subject: Shape | None = None


def ask_turn(scene: Scene, qtype: str, rng: random.Random) -> Turn:
    """One question of the given type about the scene."""
    shapes = scene.shapes
    if qtype == "colour":
        s = rng.choice(shapes)
        return Turn(f"What colour is the {s.kind}?", s.colour, qtype, s)
    if qtype == "shape":
        s = rng.choice(shapes)
        if len(shapes) == 1 and rng.random() < 0.5:
            return Turn("What shape is in the image?", s.kind, qtype, s)
        return Turn(f"What shape is {s.colour}?", s.kind, qtype, s)
    if qtype == "count":
        return Turn("How many shapes are there?", NUMBERS[len(shapes)], qtype)
    if qtype == "spatial":
        a, b = rng.sample(shapes, 2)
        return Turn(f"Is the {a.kind} left of the {b.kind}?", "yes" if a.x < b.x else "no", qtype)
    if qtype == "caption":
        return Turn("Describe the image.", caption(scene), qtype)
    raise ValueError(f"unknown question type {qtype!r}")


def ask(scene: Scene, qtype: str, rng: random.Random) -> tuple[str, str]:
    """One (question, answer) pair of the given type about the scene."""
    return ask_turn(scene, qtype, rng)[:2]


def elliptic(scene: Scene, prev: Turn, rng: random.Random) -> Turn | None:
    """A follow-up that only makes sense after `prev` ("What colour is the circle?" -> "And the star?"), or None
    where `prev` allows none."""
    if prev.subject is None or prev.qtype not in ("colour", "shape"):
        return None
    if prev.question == "What shape is in the image?":
        return Turn("And its colour?", prev.subject.colour, "colour", prev.subject)
    others = [s for s in scene.shapes if s is not prev.subject]
    if not others:
        return None
    o = rng.choice(others)
    if prev.qtype == "colour":
        return Turn(f"And the {o.kind}?", o.colour, "colour", o)
    return Turn(f"And the {o.colour} one?", o.kind, "shape", o)


def follow_up(scene: Scene, prev: Turn, rng: random.Random, weights=None) -> Turn:
    """The next question in a chat about the same image: half the time elliptic where `prev` allows it,
    otherwise a fresh question of any type the scene supports (spatial needs two shapes)."""
    if rng.random() < 0.5 and (turn := elliptic(scene, prev, rng)) is not None:
        return turn
    qtypes = [q for q in QTYPES if q != "spatial" or len(scene.shapes) > 1]
    w = None if weights is None else [weights[QTYPES.index(q)] for q in qtypes]
    return ask_turn(scene, rng.choices(qtypes, weights=w)[0], rng)


def sample_chat(rng: random.Random, turns: int, qtype: str | None = None, weights=None) -> tuple[Scene, list[Turn]]:
    """A scene and a chat of `turns` questions about it, the first of type `qtype` (drawn by `weights` if None)."""
    qtype = qtype or rng.choices(QTYPES, weights=weights)[0]
    scene = scene_for(rng, qtype)
    chat = [ask_turn(scene, qtype, rng)]
    while len(chat) < turns:
        chat.append(follow_up(scene, chat[-1], rng, weights))
    return scene, chat


@dataclass
class Example:
    image: Image.Image
    question: str
    answer: str
    qtype: str
    scene: Scene


def scene_for(rng: random.Random, qtype: str) -> Scene:
    """A scene that question type can be asked about: spatial questions need two or more shapes."""
    return sample_scene(rng, rng.randint(2, MAX_SHAPES) if qtype == "spatial" else None)


def sample_example(rng: random.Random, image_size: int, qtype: str | None = None) -> Example:
    qtype = qtype or rng.choice(QTYPES)
    scene = scene_for(rng, qtype)
    question, answer = ask(scene, qtype, rng)
    return Example(render(scene, image_size), question, answer, qtype, scene)


def sample_pair(rng: random.Random, image_size: int, qtype: str | None = None) -> tuple[Image.Image, str, str, str]:
    """(image, question, answer, qtype)."""
    e = sample_example(rng, image_size, qtype)
    return e.image, e.question, e.answer, e.qtype


def cell_labels(scene: Scene) -> tuple[list[int], list[int], list[int]]:
    """Per grid cell, row-major: shape index + 1, colour index + 1 (0 where empty), and column."""
    kinds, colours = [0] * GRID * GRID, [0] * GRID * GRID
    for s in scene.shapes:
        cell = int(s.y * GRID) * GRID + int(s.x * GRID)
        kinds[cell] = SHAPES.index(s.kind) + 1
        colours[cell] = list(COLOURS).index(s.colour) + 1
    return kinds, colours, [c % GRID for c in range(GRID * GRID)]


def held_out(n: int, image_size: int, seed: int = 0):
    """`n` evaluation pairs, question types in turn; the stream is disjoint from training's."""
    rng = random.Random(f"eval-{seed}")
    for i in range(n):
        yield sample_pair(rng, image_size, QTYPES[i % len(QTYPES)])


def held_out_chats(n: int, image_size: int, seed: int = 0):
    """`n` (image, chat) pairs of two or three turns, first question types in turn; disjoint from held_out's."""
    rng = random.Random(f"eval-chat-{seed}")
    for i in range(n):
        scene, chat = sample_chat(rng, 2 + i % 2, QTYPES[i % len(QTYPES)])
        yield render(scene, image_size), chat


def training_rng(seed: int) -> random.Random:
    return random.Random(f"train-{seed}")


def all_questions() -> list[str]:
    qs = ["What shape is in the image?", "How many shapes are there?", "Describe the image."]
    qs += [f"What colour is the {k}?" for k in SHAPES]
    qs += [f"What shape is {c}?" for c in COLOURS]
    qs += [f"Is the {a} left of the {b}?" for a in SHAPES for b in SHAPES if a != b]
    return qs + follow_up_questions()


def follow_up_questions() -> list[str]:
    return ["And its colour?"] + [f"And the {k}?" for k in SHAPES] + [f"And the {c} one?" for c in COLOURS]


def all_answer_words() -> list[str]:
    return list(COLOURS) + list(SHAPES) + list(NUMBERS[1:]) + ["yes", "no", "a", "an", "and", ","]
