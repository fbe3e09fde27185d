"""The Qwen2-VL family: geometry from both config layouts, placeholder expansion, M-RoPE positions vs HF."""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from helpers import QWEN_PROMPTS, rng_pil

from triton_vlm.families import family_for, qwen2_vl
from triton_vlm.geometry import ModelGeometry


def test_geometry_from_either_layout(qwen_checkpoint):
    g = ModelGeometry.from_checkpoint(qwen_checkpoint)
    cfg = json.loads((qwen_checkpoint / "config.json").read_text())
    text = cfg.get("text_config") or cfg  # flat (Hub) or nested (transformers 5)
    assert g.family == "qwen2_vl"
    assert (g.text.hidden_size, g.text.num_layers, g.text.num_kv_heads) == (64, 2, 2)
    assert g.text.mrope_section == (2, 3, 3) and g.text.attention_bias
    assert g.image_token_id == cfg["image_token_id"] and g.video_token_id == cfg["video_token_id"]
    assert g.eos_token_ids == (text["eos_token_id"],)
    assert g.vision.patch_dim == 3 * 2 * 4 * 4
    assert g.vision.version == ("2.5" if cfg["model_type"] == "qwen2_5_vl" else "2")


def test_unsupported_model_type_is_named_with_the_supported_ones(qwen_checkpoint, tmp_path):
    cfg = json.loads((qwen_checkpoint / "config.json").read_text())
    cfg["model_type"] = "idefics3"
    with pytest.raises(ValueError, match=r"model_type 'idefics3' is not supported; supported: llava, qwen2_5_vl, "
                                         r"qwen2_vl"):
        family_for(tmp_path, cfg)


def test_expansion_and_positions_match_hf(qwen_checkpoint, hf_qwen):
    """Two images of different sizes and aspect ratios, text between and after them."""
    g = ModelGeometry.from_checkpoint(qwen_checkpoint)
    images = [rng_pil(0, 90, 40), rng_pil(1, 50, 120)]  # portrait, landscape
    vi = qwen2_vl.vision_inputs(qwen2_vl.image_processor(qwen_checkpoint), images, g.vision.merge_size)
    assert vi.tokens[0] != vi.tokens[1]
    ref = hf_qwen.inputs(QWEN_PROMPTS[2], images)
    assert np.array_equal(vi.pixel_values, ref["pixel_values"].numpy())
    ids = hf_qwen.tokenizer(qwen2_vl.expand_placeholders(QWEN_PROMPTS[2], g.image_token, vi.tokens))["input_ids"]
    assert ids == ref["input_ids"][0].tolist()
    starts = qwen2_vl.span_starts(ids, (g.image_token_id,), vi.tokens)
    ours = qwen2_vl.positions(ids, [(s, tuple(grid), 1) for s, grid in zip(starts, vi.grid_thw.tolist())],
                              g.vision.merge_size)
    expected, delta = hf_qwen.model.model.get_rope_index(ref["input_ids"], ref["mm_token_type_ids"],
                                                         image_grid_thw=torch.tensor(vi.grid_thw))
    assert np.array_equal(ours, expected[:, 0].numpy())
    assert ours.max() + 1 - len(ids) == int(delta)


def test_placeholder_count_must_match():
    with pytest.raises(ValueError, match="2 <|image_pad|> placeholder"):
        qwen2_vl.expand_placeholders("<|image_pad|><|image_pad|>", "<|image_pad|>", [4])
