"""The Qwen2-VL family: geometry from both config layouts, placeholder expansion, M-RoPE positions vs HF."""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from helpers import QWEN_PROMPTS, rng_pil

from triton_vlm.families import family_for, qwen2_vl
from triton_vlm.geometry import ModelGeometry
from triton_vlm.preprocess import Preprocessor


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
    processor = json.loads((qwen_checkpoint / "preprocessor_config.json").read_text())
    assert ("max_pixels" in processor) == ("text_config" not in cfg)  # the Hub's flat layout spells it so
    assert qwen2_vl.load_image_processor(qwen_checkpoint).size["longest_edge"] == 4096


def test_unsupported_model_type_is_named_with_the_supported_ones(qwen_checkpoint, tmp_path):
    cfg = json.loads((qwen_checkpoint / "config.json").read_text())
    cfg["model_type"] = "idefics3"
    with pytest.raises(ValueError, match=r"model_type 'idefics3' is not supported; supported: llava, qwen2_5_vl, "
                                         r"qwen2_vl"):
        family_for(tmp_path, cfg)


def test_preprocessing_matches_hf(qwen_checkpoint, hf_qwen):
    """Two images of different sizes and aspect ratios, text between and after them: the server's patches,
    expanded input_ids and M-RoPE positions (and delta) equal transformers' own."""
    pre = Preprocessor(qwen_checkpoint)
    images = [rng_pil(0, 90, 40), rng_pil(1, 50, 120)]  # portrait, landscape
    request = pre.vision_request(images)
    assert request.tokens[0] != request.tokens[1]
    ref = hf_qwen.inputs(QWEN_PROMPTS[2], images)
    assert np.array_equal(request.inputs["pixel_values"], ref["pixel_values"].numpy())
    assert np.array_equal(request.inputs["image_grid_thw"], ref["image_grid_thw"].numpy())
    ids = pre.input_ids(QWEN_PROMPTS[2], request.tokens)
    assert ids == ref["input_ids"][0].tolist()
    ours = pre.positions(ids, request)
    expected, delta = hf_qwen.model.model.get_rope_index(ref["input_ids"], ref["mm_token_type_ids"],
                                                         image_grid_thw=ref["image_grid_thw"])
    assert np.array_equal(ours, expected[:, 0].numpy())
    assert ours.max() + 1 - len(ids) == int(delta)
    assert pre.positions(pre.input_ids(QWEN_PROMPTS[0], []), None) is None


def test_chat_template_renders_one_placeholder_per_image(qwen_checkpoint):
    pre = Preprocessor(qwen_checkpoint)
    prompt = pre.chat_prompt([{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "Hi?"}]}])
    assert prompt == ("<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n<|im_start|>user\n"
                      "<|vision_start|><|image_pad|><|vision_end|>Hi?<|im_end|>\n<|im_start|>assistant\n")


def test_vision_aux_matches_transformers(qwen_checkpoint):
    """Rotary positions, frame segments and (Qwen2.5-VL) window order as transformers computes them."""
    from transformers.vision_utils import get_vision_cu_seqlens, get_vision_position_ids, get_vision_window_index

    g = ModelGeometry.from_checkpoint(qwen_checkpoint)
    grids = torch.tensor([[1, 22, 10], [2, 10, 24], [1, 16, 16]])
    aux = qwen2_vl.vision_aux(grids.numpy(), g.vision)
    assert np.array_equal(aux["position_ids"], get_vision_position_ids(grids, g.vision.merge_size).numpy())
    cu = get_vision_cu_seqlens(grids).numpy()
    assert np.array_equal(aux["segment_ids"], np.repeat(np.arange(len(cu) - 1), np.diff(cu)))
    if g.vision.window_size:
        index, cu_windows = get_vision_window_index(grids, g.vision.merge_size, g.vision.window_size,
                                                    g.vision.patch_size)
        assert np.array_equal(aux["window_index"], index.numpy())
        cu_windows = cu_windows.numpy()
        assert np.array_equal(aux["window_segment_ids"], np.repeat(np.arange(len(cu_windows) - 1), np.diff(cu_windows)))
    else:
        assert "window_index" not in aux
