"""Write small LLaVA checkpoints in Hugging Face format: tokenizer, processor, config, weights.

`make_tiny` makes the random checkpoints the tests use (and the quickstart, for want of models/toy-vlm);
the toy trainer (toy/train.py) builds its model from the same config, tokenizer and processor builders.
"""
from __future__ import annotations

from pathlib import Path
from typing import Iterable

IMAGE_TOKEN = "<image>"
SPECIAL_TOKENS = ["<unk>", "<s>", "</s>", "<pad>", IMAGE_TOKEN]

# A chat template in the LLaVA-1.5 style: images first, then the text of each user turn.
CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{% if message['role'] == 'user' %}USER: "
    "{% if message['content'] is string %}{{ message['content'] }}"
    "{% else %}{% for part in message['content'] %}"
    "{% if part['type'] == 'image' %}<image>\n{% endif %}"
    "{% endfor %}{% for part in message['content'] %}"
    "{% if part['type'] == 'text' %}{{ part['text'] }}{% endif %}"
    "{% endfor %}{% endif %}{{ '\\n' }}"
    "{% elif message['role'] == 'assistant' %}ASSISTANT: "
    "{% if message['content'] is string %}{{ message['content'] }}"
    "{% else %}{% for part in message['content'] %}{{ part['text'] }}{% endfor %}{% endif %}</s>{{ '\\n' }}"
    "{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}ASSISTANT:{% endif %}"
)

DEFAULT_CORPUS = [
    "USER: <image>\nWhat is in this picture?\nASSISTANT: A cat sitting on a chair.",
    "USER: Describe the image in detail.\nASSISTANT: There is a red circle left of a blue square.",
    "The quick brown fox jumps over the lazy dog. A photo of an astronaut, a cup of coffee and a cat.",
    "How many shapes are there? What colour is the triangle? Is the star left of the circle? Yes. No.",
    "red green blue yellow orange purple white black grey pink one two three four five",
]


def train_bpe(corpus: Iterable[str], vocab_size: int, special_tokens: list[str]):
    """A byte-level BPE `tokenizers.Tokenizer` trained on corpus, special tokens first in the vocabulary."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE(unk_token=None))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=special_tokens,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(list(corpus), trainer=trainer)
    return tok


def train_tokenizer(corpus: Iterable[str], vocab_size: int = 512):
    """A byte-level BPE tokenizer that prepends <s>, with <image> as a special token."""
    from tokenizers import processors
    from transformers import PreTrainedTokenizerFast

    tok = train_bpe(corpus, vocab_size, SPECIAL_TOKENS)
    bos = tok.token_to_id("<s>")
    tok.post_processor = processors.TemplateProcessing(single="<s> $A", pair="<s> $A <s> $B", special_tokens=[("<s>", bos)])
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token="<s>", eos_token="</s>", unk_token="<unk>", pad_token="<pad>",
        extra_special_tokens={"image_token": IMAGE_TOKEN}, clean_up_tokenization_spaces=False,
        model_max_length=4096,
    )


def make_processor(tokenizer, image_size: int, patch_size: int, strategy: str = "default"):
    from transformers import CLIPImageProcessor, LlavaProcessor

    crop = {"height": image_size, "width": image_size}
    image_processor = CLIPImageProcessor(size={"shortest_edge": image_size}, crop_size=crop)
    return LlavaProcessor(image_processor=image_processor, tokenizer=tokenizer, patch_size=patch_size,
                          vision_feature_select_strategy=strategy, chat_template=CHAT_TEMPLATE,
                          image_token=IMAGE_TOKEN, num_additional_image_tokens=1)


def make_llava_config(tokenizer, *, image_size=32, patch_size=8, vision_hidden=32, vision_layers=2, vision_heads=2,
                      hidden=64, layers=2, heads=4, kv_heads=2, head_dim=None, intermediate=128,
                      vision_feature_layer=-2, strategy="default", max_positions=2048, tie=False, init_range=0.02,
                      text_model_type="llama"):
    from transformers import CLIPVisionConfig, LlavaConfig
    from transformers.models.auto.configuration_auto import CONFIG_MAPPING

    special = {t: tokenizer.convert_tokens_to_ids(t) for t in SPECIAL_TOKENS}
    vision = CLIPVisionConfig(hidden_size=vision_hidden, intermediate_size=vision_hidden * 4,
                              num_hidden_layers=vision_layers, num_attention_heads=vision_heads,
                              image_size=image_size, patch_size=patch_size, projection_dim=vision_hidden,
                              initializer_range=init_range)
    text = CONFIG_MAPPING[text_model_type](vocab_size=len(tokenizer), hidden_size=hidden, intermediate_size=intermediate,
                       num_hidden_layers=layers, num_attention_heads=heads, num_key_value_heads=kv_heads,
                       head_dim=head_dim or hidden // heads, max_position_embeddings=max_positions,
                       bos_token_id=special["<s>"], eos_token_id=special["</s>"], pad_token_id=special["<pad>"],
                       tie_word_embeddings=tie, initializer_range=init_range, rms_norm_eps=1e-5)
    n_patches = (image_size // patch_size) ** 2
    return LlavaConfig(vision_config=vision, text_config=text, image_token_index=special[IMAGE_TOKEN],
                       image_seq_length=n_patches + (0 if strategy == "default" else 1),
                       vision_feature_layer=vision_feature_layer, vision_feature_select_strategy=strategy,
                       tie_word_embeddings=tie)


def save_checkpoint(model, processor, out_dir: str | Path) -> Path:
    from transformers import GenerationConfig

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    text = model.config.text_config
    model.generation_config = GenerationConfig(bos_token_id=text.bos_token_id, eos_token_id=text.eos_token_id,
                                               pad_token_id=text.pad_token_id, max_new_tokens=64)
    model.save_pretrained(out, safe_serialization=True)
    processor.save_pretrained(out)
    return out


def make_tiny(out_dir: str | Path, seed: int = 0, corpus: Iterable[str] | None = None, init_range: float = 0.2,
              **geometry) -> Path:
    """A random LLaVA (CLIP tower + Llama decoder) small enough to run anywhere.

    The wide init makes logits peaked, so greedy outputs are far from ties and comparable exactly.
    """
    import torch
    from transformers import LlavaForConditionalGeneration

    torch.manual_seed(seed)
    tokenizer = train_tokenizer(corpus or DEFAULT_CORPUS, vocab_size=geometry.pop("vocab_size", 512))
    config = make_llava_config(tokenizer, init_range=init_range, **geometry)
    processor = make_processor(tokenizer, config.vision_config.image_size, config.vision_config.patch_size,
                               config.vision_feature_select_strategy)
    model = LlavaForConditionalGeneration(config).eval()
    return save_checkpoint(model, processor, out_dir)
