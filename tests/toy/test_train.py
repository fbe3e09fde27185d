"""The toy trainer: patch labels match the drawing, and a run is deterministic under its seed."""
from __future__ import annotations

import torch

from triton_vlm.toy.scenes import COLOURS, SHAPES, Scene, Shape
from triton_vlm.toy.train import PatchLabels, Trainer, TrainConfig, fresh_model

SHORT = dict(batch=4, steps_vision=3, steps_language=3, steps_bridge=3, steps_joint=3)


def test_patch_labels_mark_the_cells_each_shape_covers():
    scene = Scene([Shape("triangle", "purple", 0.5, 0.83, 0.14), Shape("star", "green", 0.17, 0.17, 0.12)],
                  (250, 250, 250), 0.0, 0)
    labels = PatchLabels(48, 16)(scene)  # 3 x 3 patches, row-major
    expected = {7: ("triangle", "purple"), 0: ("star", "green")}
    for cell in range(9):
        kind, colour = expected.get(cell, (None, None))
        assert labels[cell, 0] == (SHAPES.index(kind) + 1 if kind else 0)
        assert labels[cell, 1] == (list(COLOURS).index(colour) + 1 if colour else 0)
        assert labels[cell, 2] == (cell in expected)  # the centre flag
        assert (labels[cell, 3], labels[cell, 4]) == divmod(cell, 3)


def train(seed: int) -> dict[str, torch.Tensor]:
    torch.set_num_threads(1)
    model, processor = fresh_model(seed)
    Trainer(model, processor, TrainConfig(seed=seed, **SHORT), log=lambda _: None).train()
    return {k: v.clone() for k, v in model.state_dict().items()}


def test_a_run_is_deterministic_under_its_seed():
    first, again, other = train(0), train(0), train(1)
    assert first.keys() == again.keys()
    assert all(torch.equal(first[k], again[k]) for k in first)
    assert not all(torch.equal(first[k], other[k]) for k in first)


def test_every_stage_moves_the_weights_it_trains():
    model, processor = fresh_model(0)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    Trainer(model, processor, TrainConfig(**SHORT), log=lambda _: None).train()
    for part in ("vision_tower", "multi_modal_projector", "language_model", "lm_head"):
        changed = [k for k in before if part in k and not torch.equal(before[k], model.state_dict()[k])]
        assert changed, f"{part} was not trained"
