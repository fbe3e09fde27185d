"""Write small random Qwen2-VL / Qwen2.5-VL checkpoints in Hugging Face format: tokenizer (ChatML specials),
image processor with small min/max pixels, chat template, config in either layout, weights.

The processor is built from Qwen2VLImageProcessor (PIL path) and the tokenizer only: in transformers 5,
AutoProcessor would also build the video processor, which needs torchvision (never installed here).
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Iterable

from .checkpoint import DEFAULT_CORPUS, train_bpe

SPECIAL_TOKENS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|vision_start|>", "<|vision_end|>",
                  "<|image_pad|>", "<|video_pad|>"]
IMAGE_TOKEN, VIDEO_TOKEN = "<|image_pad|>", "<|video_pad|>"

# ChatML, as Qwen2-VL's own template renders it: each image or video is one vision_start/pad/vision_end run.
CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{% if loop.first and message['role'] != 'system' %}<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n"
    "{% endif %}<|im_start|>{{ message['role'] }}\n"
    "{% if message['content'] is string %}{{ message['content'] }}"
    "{% else %}{% for part in message['content'] %}"
    "{% if part['type'] == 'image' %}<|vision_start|><|image_pad|><|vision_end|>"
    "{% elif part['type'] == 'video' %}<|vision_start|><|video_pad|><|vision_end|>"
    "{% elif part['type'] == 'text' %}{{ part['text'] }}{% endif %}"
    "{% endfor %}{% endif %}<|im_end|>\n"
    "{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
QWEN_CORPUS = [*DEFAULT_CORPUS, "<|im_start|>user\nWhat is this?<|im_end|>\n<|im_start|>assistant\nA cat.<|im_end|>"]


def train_tokenizer(corpus: Iterable[str], vocab_size: int = 512):
    """A byte-level BPE tokenizer with Qwen's special tokens (no BOS, as Qwen2)."""
    from transformers import PreTrainedTokenizerFast

    return PreTrainedTokenizerFast(
        tokenizer_object=train_bpe(corpus, vocab_size, SPECIAL_TOKENS), eos_token="<|im_end|>", pad_token="<|endoftext|>", clean_up_tokenization_spaces=False,
        extra_special_tokens={"image_token": IMAGE_TOKEN, "video_token": VIDEO_TOKEN}, model_max_length=4096)


def make_image_processor(patch_size: int, merge_size: int, min_pixels: int, max_pixels: int,
                         temporal_patch_size: int = 2):
    from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil

    return Qwen2VLImageProcessorPil(size={"shortest_edge": min_pixels, "longest_edge": max_pixels},
                                    patch_size=patch_size, merge_size=merge_size,
                                    temporal_patch_size=temporal_patch_size)


def make_config(tokenizer, version: str = "2", *, patch_size=4, merge_size=2, temporal_patch_size=2,
                vision_hidden=32, vision_layers=2, vision_heads=2, hidden=64, layers=2, heads=4, kv_heads=2,
                intermediate=128, mrope_section=(2, 3, 3), max_positions=4096, window_size=16,
                fullatt_block_indexes=(1,), init_range=0.2):
    """mrope_section sums to head_dim / 2 (hidden / heads / 2)."""
    ids = {t: tokenizer.convert_tokens_to_ids(t) for t in SPECIAL_TOKENS}
    text = dict(vocab_size=len(tokenizer), hidden_size=hidden, intermediate_size=intermediate,
                num_hidden_layers=layers, num_attention_heads=heads, num_key_value_heads=kv_heads,
                max_position_embeddings=max_positions, rms_norm_eps=1e-6, initializer_range=init_range,
                rope_parameters={"rope_type": "default", "mrope_section": list(mrope_section), "rope_theta": 10000.0},
                bos_token_id=ids["<|endoftext|>"], eos_token_id=ids["<|im_end|>"], pad_token_id=ids["<|endoftext|>"])
    tokens = dict(image_token_id=ids[IMAGE_TOKEN], video_token_id=ids[VIDEO_TOKEN],
                  vision_start_token_id=ids["<|vision_start|>"], vision_end_token_id=ids["<|vision_end|>"])
    if version == "2":
        from transformers import Qwen2VLConfig

        vision = dict(depth=vision_layers, embed_dim=vision_hidden, hidden_size=hidden, num_heads=vision_heads,
                      patch_size=patch_size, spatial_merge_size=merge_size, temporal_patch_size=temporal_patch_size,
                      initializer_range=init_range)
        return Qwen2VLConfig(text_config=text, vision_config=vision, **tokens)
    if version == "2.5":
        from transformers import Qwen2_5_VLConfig

        vision = dict(depth=vision_layers, hidden_size=vision_hidden, intermediate_size=vision_hidden * 2,
                      num_heads=vision_heads, out_hidden_size=hidden, patch_size=patch_size,
                      spatial_merge_size=merge_size, temporal_patch_size=temporal_patch_size,
                      window_size=window_size, fullatt_block_indexes=list(fullatt_block_indexes),
                      initializer_range=init_range)
        return Qwen2_5_VLConfig(text_config=text, vision_config=vision, **tokens)
    raise ValueError(f"version: '2' or '2.5', got {version!r}")


def flatten_config(out: Path) -> None:
    """Rewrite config.json in the Hub's flat layout (text fields at the top, rope_scaling with type mrope)."""
    path = out / "config.json"
    cfg = json.loads(path.read_text())
    text = cfg.pop("text_config")
    rope = dict(text.pop("rope_parameters"))
    rope_theta = rope.pop("rope_theta")
    rope.pop("rope_type", None)
    flat = {**{k: v for k, v in text.items() if k not in ("model_type", "architectures")}, **cfg,
            "rope_theta": rope_theta, "rope_scaling": {"type": "mrope", **rope}}
    path.write_text(json.dumps(flat, indent=2))


def hub_preprocessor_config(out: Path) -> None:
    """preprocessor_config.json as the Hub's Qwen2-VL checkpoints write it: min_pixels/max_pixels, not size."""
    path = out / "preprocessor_config.json"
    cfg = json.loads(path.read_text())
    size = cfg.pop("size")
    path.write_text(json.dumps({**cfg, "min_pixels": size["shortest_edge"], "max_pixels": size["longest_edge"]},
                               indent=2))


def make_tiny_qwen(out_dir: str | Path, version: str = "2", seed: int = 0, layout: str = "nested",
                   min_pixels: int = 8 * 8 * 4, max_pixels: int = 32 * 32 * 4, **geometry) -> Path:
    """A random Qwen2-VL (version "2") or Qwen2.5-VL ("2.5") with 2 decoder layers and a tiny tower.

    Patches of 4 px merged 2x2: one image token per 8x8 px, so images of different sizes (within
    min/max_pixels) give different token counts. layout "flat" writes config.json as older Hub checkpoints do.
    """
    import torch
    from transformers import AutoModelForImageTextToText, GenerationConfig

    if layout not in ("nested", "flat"):
        raise ValueError(f"layout: 'nested' or 'flat', got {layout!r}")
    torch.manual_seed(seed)
    tokenizer = train_tokenizer(QWEN_CORPUS, vocab_size=geometry.pop("vocab_size", 512))
    config = make_config(tokenizer, version, **geometry)
    vc = config.vision_config
    image_processor = make_image_processor(vc.patch_size, vc.spatial_merge_size, min_pixels, max_pixels,
                                           vc.temporal_patch_size)
    model = AutoModelForImageTextToText.from_config(config).eval()
    text = config.text_config
    model.generation_config = GenerationConfig(bos_token_id=text.bos_token_id, eos_token_id=text.eos_token_id,
                                               pad_token_id=text.pad_token_id, max_new_tokens=64)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out, safe_serialization=True)
    image_processor.save_pretrained(out)
    tokenizer.save_pretrained(out)
    if layout == "flat":  # the Hub's older layout: chat_template.json, flat config.json, min/max_pixels
        (out / "chat_template.json").write_text(json.dumps({"chat_template": CHAT_TEMPLATE}))
        flatten_config(out)
        hub_preprocessor_config(out)
    else:
        (out / "chat_template.jinja").write_text(CHAT_TEMPLATE)
    return out
