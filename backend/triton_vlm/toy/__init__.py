"""A toy vision-language task (coloured shapes) small enough to train on a CPU in minutes."""
from triton_vlm.toy.scenes import QTYPES, Scene, Shape, ask, caption, held_out, render, sample_pair, sample_scene

__all__ = ["QTYPES", "Scene", "Shape", "ask", "caption", "held_out", "render", "sample_pair", "sample_scene"]
