"""ModelGeometry reads every size from config.json; image-token counts match what HF LLaVA produces."""
import json

import pytest
import torch

from triton_vlm.geometry import ModelGeometry


def hf_image_rows(checkpoint) -> int:
    from transformers import AutoModelForImageTextToText

    model = AutoModelForImageTextToText.from_pretrained(checkpoint).eval()
    size = model.config.vision_config.image_size
    with torch.no_grad():
        feats = model.model.get_image_features(pixel_values=torch.zeros(1, 3, size, size)).pooler_output
    return feats[0].shape[0]


def test_clip_default_and_full(tiny_checkpoint, second_checkpoint):
    tiny, second = ModelGeometry.from_checkpoint(tiny_checkpoint), ModelGeometry.from_checkpoint(second_checkpoint)
    assert tiny.image_seq_len == hf_image_rows(tiny_checkpoint) == 16  # 4x4 patches, CLS dropped
    assert second.image_seq_len == hf_image_rows(second_checkpoint) == 10  # 3x3 patches + CLS kept
    assert (second.text.num_heads, second.text.num_kv_heads, second.text.head_dim) == (8, 2, 12)
    assert second.vision_feature_layer == -1 and tiny.vision_feature_layer == -2


def test_siglip_tower_has_no_cls(tmp_path):
    from transformers import LlamaConfig, LlavaConfig, LlavaForConditionalGeneration, SiglipVisionConfig

    vision = SiglipVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
                                image_size=32, patch_size=8)
    text = LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                       num_attention_heads=2, num_key_value_heads=1)
    config = LlavaConfig(vision_config=vision, text_config=text, image_token_index=63,
                         vision_feature_select_strategy="full", vision_feature_layer=-1)
    LlavaForConditionalGeneration(config).save_pretrained(tmp_path)
    g = ModelGeometry.from_checkpoint(tmp_path)
    assert g.image_seq_len == hf_image_rows(tmp_path) == 16


def test_unsupported_models_are_named(tiny_checkpoint, tmp_path):
    cfg = json.loads((tiny_checkpoint / "config.json").read_text())
    cfg["text_config"]["model_type"] = "gpt2"
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ValueError, match="unsupported language model 'gpt2'"):
        ModelGeometry.from_checkpoint(tmp_path)
    cfg["text_config"]["model_type"] = "llama"
    cfg["text_config"]["rope_parameters"] = {"rope_type": "yarn", "factor": 4.0}
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ValueError, match="rope type 'yarn' is not supported"):
        ModelGeometry.from_checkpoint(tmp_path)
