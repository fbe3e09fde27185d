"""Train the toy VLM in four short stages, each easy on its own.

Learning to see and learning to answer at once is slow from scratch on a CPU, so the work is split:
  A. vision: the CLIP tower learns, per patch, which shape and colour cover it, its row and
     column, and whether a shape's centre lies in it (labels come free with the synthetic scene);
  B. language: the decoder learns to answer from *symbolic* patch embeddings (a sum of learned
     shape/colour/position vectors), which is fast because no image is rendered or encoded;
  C. bridge: the projector learns to map the tower's features onto those symbolic embeddings;
  D. end to end: the whole LLaVA is fine-tuned on rendered images with the answer loss.
The result is an ordinary LlavaForConditionalGeneration; the symbolic tables and heads are dropped.
"""
from __future__ import annotations

import itertools
import math
import time
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image, ImageDraw
from torch import nn

from ..checkpoint import make_llava_config, make_processor, train_tokenizer
from .scenes import (COLOURS, SHAPES, Scene, Shape, all_answer_words, all_questions, caption, follow_up_questions,
                     outline, render, sample_chat, sample_scene, training_rng)

CLIP_MEAN = np.array([0.48145466, 0.4578275, 0.40821073], np.float32)
CLIP_STD = np.array([0.26862954, 0.26130258, 0.27577711], np.float32)

# 48 px images in 16 px patches: 9 image tokens, one per cell of the scenes' 3 x 3 layout; 1.1M parameters.
GEOMETRY = dict(image_size=48, patch_size=16, vision_hidden=96, vision_layers=3, vision_heads=4, hidden=128,
                layers=3, heads=4, kv_heads=2, intermediate=384,
                vision_feature_layer=-1,  # the tower is small: its last layer is the one to read
                max_positions=256,
                # At the usual 0.02 the decoder sits on the yes/no prior for spatial questions indefinitely
                # (two look-ups that must be told apart by position); 0.06 breaks that symmetry in ~1k steps.
                init_range=0.06)


def tokenizer_corpus() -> list[str]:
    """Every question and answer in chat form, so each word ends up a single token."""
    answers = all_answer_words()
    captions = [caption(Scene([Shape(k, c, 0.5, 0.5, 0.1)], (255, 255, 255), 0.0, 0))
                for k, c in itertools.product(SHAPES, COLOURS)]
    lines = [f"USER: <image>\n{q}\nASSISTANT: {a}" for q, a in zip(all_questions(), itertools.cycle(answers))]
    lines += [f"ASSISTANT: {w}" for w in answers] + [f"ASSISTANT: {c}, {c} and {c}" for c in captions]
    # A later turn follows the previous answer's </s> (a special token, so the text restarts at "\n").
    lines += [f"\nUSER: {q}\nASSISTANT: {a}" for q, a in zip(follow_up_questions(), itertools.cycle(answers))]
    return lines * 4


def fresh_model(seed: int):
    """(untrained LlavaForConditionalGeneration, processor) in the toy geometry; weights drawn under `seed`."""
    from transformers import LlavaForConditionalGeneration

    torch.manual_seed(seed)
    tokenizer = train_tokenizer(tokenizer_corpus(), vocab_size=384)
    processor = make_processor(tokenizer, GEOMETRY["image_size"], GEOMETRY["patch_size"])
    return LlavaForConditionalGeneration(make_llava_config(tokenizer, **GEOMETRY)), processor


@dataclass
class TrainConfig:
    seed: int = 0
    batch: int = 32
    steps_vision: int = 300
    steps_language: int = 4000  # chats of up to three turns: more to learn than single questions
    steps_bridge: int = 300
    steps_joint: int = 800
    lr_vision: float = 2e-3
    lr_language: float = 1e-3
    lr_bridge: float = 1e-3
    lr_joint: float = 2e-4
    # Question mix: spatial is the hardest, captions are long and easy.
    qtype_weights: tuple[float, ...] = (1.0, 1.0, 1.0, 1.5, 0.5)
    # Chats of one, two and three turns about the same image (every answer is trained on).
    turn_weights: tuple[float, ...] = (0.5, 0.3, 0.2)


class PatchLabels:
    """Per-patch targets for a scene: shape, colour (0 = background), centre flag, row, column."""

    def __init__(self, image_size: int, patch_size: int):
        self.size, self.patch, self.grid = image_size, patch_size, image_size // patch_size

    def __call__(self, scene: Scene) -> np.ndarray:
        g, p = self.grid, self.patch
        mask = Image.new("L", (self.size, self.size), 0)
        draw = ImageDraw.Draw(mask)
        for i, s in enumerate(scene.shapes):
            if s.kind == "circle":
                cx, cy, r = s.x * self.size, s.y * self.size, 0.85 * s.r * self.size
                draw.ellipse([cx - r, cy - r, cx + r, cy + r], fill=i + 1)
            else:
                draw.polygon(outline(s, self.size), fill=i + 1)
        cells = np.asarray(mask).reshape(g, p, g, p).transpose(0, 2, 1, 3).reshape(g * g, p * p)
        out = np.zeros((g * g, 5), np.int64)  # shape, colour, centre, row, column
        out[:, 3] = np.arange(g * g) // g
        out[:, 4] = np.arange(g * g) % g
        for i, s in enumerate(scene.shapes):
            covered = (cells == i + 1).mean(1) > 0.25
            centre = min(g - 1, int(s.y * g)) * g + min(g - 1, int(s.x * g))
            covered[centre] = True  # a star may fill under a quarter of a large patch yet is there
            out[covered, 0] = SHAPES.index(s.kind) + 1
            out[covered, 1] = list(COLOURS).index(s.colour) + 1
            out[centre, 2] = 1
        return out


class SymbolicPatches(nn.Module):
    """What a perfect vision path would hand the decoder: a sum of learned per-attribute vectors."""

    def __init__(self, grid: int, hidden: int):
        super().__init__()
        sizes = (len(SHAPES) + 1, len(COLOURS) + 1, 2, grid, grid)
        self.tables = nn.ModuleList(nn.Embedding(n, hidden) for n in sizes)
        for t in self.tables:
            nn.init.normal_(t.weight, std=0.5)

    def forward(self, labels: torch.Tensor) -> torch.Tensor:  # [..., 5] -> [..., hidden]
        return sum(t(labels[..., i]) for i, t in enumerate(self.tables))


class VisionHeads(nn.Module):
    def __init__(self, width: int, grid: int):
        super().__init__()
        self.sizes = (len(SHAPES) + 1, len(COLOURS) + 1, 2, grid, grid)
        self.proj = nn.Linear(width, sum(self.sizes))

    def loss(self, features: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        logits = self.proj(features).split(self.sizes, dim=-1)
        return sum(F.cross_entropy(lg.reshape(-1, lg.shape[-1]), labels[..., i].reshape(-1))
                   for i, lg in enumerate(logits))


def pixels(images: list[Image.Image]) -> torch.Tensor:
    """CLIP normalisation of images already at the model's size (what the processor does to them)."""
    arr = np.stack([np.asarray(im, np.float32) / 255.0 for im in images])
    return torch.from_numpy(((arr - CLIP_MEAN) / CLIP_STD).transpose(0, 3, 1, 2).copy())


def lr_at(step: int, steps: int, peak: float, warmup: int = 50) -> float:
    if step < warmup:
        return peak * (step + 1) / warmup
    t = (step - warmup) / max(1, steps - warmup)
    return peak * (0.05 + 0.95 * 0.5 * (1 + math.cos(math.pi * t)))


class Trainer:
    def __init__(self, model, processor, config: TrainConfig, log=print):
        self.model, self.processor, self.cfg, self.log = model, processor, config, log
        self.tok = processor.tokenizer
        vc = model.config.vision_config
        self.size, self.grid = vc.image_size, vc.image_size // vc.patch_size
        self.labels = PatchLabels(self.size, vc.patch_size)
        self.symbolic = SymbolicPatches(self.grid, model.config.text_config.hidden_size)
        self.heads = VisionHeads(vc.hidden_size, self.grid)
        self.rng = training_rng(config.seed)
        self.image_token = model.config.image_token_index
        self._ids: dict[str, list[int]] = {}  # token ids of prompt and answer pieces, by text
        self.start = time.monotonic()

    # ---- data -------------------------------------------------------------------
    def sample(self, n: int):
        """n (scene, chat) pairs with the configured question and turn mix."""
        out = []
        for _ in range(n):
            turns = self.rng.choices(range(1, len(self.cfg.turn_weights) + 1), weights=self.cfg.turn_weights)[0]
            out.append(sample_chat(self.rng, turns, weights=self.cfg.qtype_weights))
        return out

    def cached(self, key: str, encode) -> list[int]:
        if key not in self._ids:
            self._ids[key] = encode()
        return self._ids[key]

    def first_prompt(self, question: str) -> list[int]:
        """<s>, the image tokens and the first question, as the processor builds them."""
        from .evaluate import chat_prompt

        blank = Image.new("RGB", (self.size, self.size))
        return self.cached("first:" + question, lambda: self.processor(
            images=blank, text=chat_prompt(self.processor, question))["input_ids"][0])

    def later_prompt(self, question: str) -> list[int]:
        """What the chat template puts between an answer's </s> and the next answer."""
        return self.cached("later:" + question, lambda: self.text_ids(f"\nUSER: {question}\nASSISTANT:"))

    def answer(self, answer: str) -> list[int]:
        return self.cached("answer:" + answer, lambda: self.text_ids(" " + answer) + [self.tok.eos_token_id])

    def text_ids(self, text: str) -> list[int]:
        return self.tok(text, add_special_tokens=False)["input_ids"]

    def chat_ids(self, chat) -> tuple[list[int], list[bool]]:
        """The chat's token ids as the template renders it, and which of them are answer tokens (</s> included).

        Pieces are tokenized apart and joined: the same ids as the whole rendered text, because </s> is a
        special token (tokenization restarts after it) and the byte-level pre-tokenizer splits before " answer"
        (tests/toy/test_train.py checks this against the template)."""
        ids, is_answer = [], []
        for i, turn in enumerate(chat):
            prompt = self.first_prompt(turn.question) if i == 0 else self.later_prompt(turn.question)
            ans = self.answer(turn.answer)
            ids += prompt + ans
            is_answer += [False] * len(prompt) + [True] * len(ans)
        return ids, is_answer

    def tokens(self, samples):
        """Padded ids, attention mask and answer labels (the loss sees the answers and their </s> only)."""
        seqs = [self.chat_ids(chat) for _, chat in samples]
        width = max(len(ids) for ids, _ in seqs)
        ids = torch.full((len(seqs), width), self.tok.pad_token_id)
        labels = torch.full((len(seqs), width), -100)
        mask = torch.zeros((len(seqs), width), dtype=torch.long)
        for i, (seq, is_answer) in enumerate(seqs):
            ids[i, :len(seq)] = torch.tensor(seq)
            labels[i, :len(seq)] = torch.where(torch.tensor(is_answer), torch.tensor(seq), -100)
            mask[i, :len(seq)] = 1
        return ids, mask, labels

    def patch_labels(self, scenes) -> torch.Tensor:
        return torch.from_numpy(np.stack([self.labels(s) for s in scenes]))

    # ---- losses -------------------------------------------------------------------
    def vision_features(self, pix: torch.Tensor) -> torch.Tensor:
        """The tower's output as LLaVA selects it (last layer, CLS dropped: see make_llava_config)."""
        return self.model.model.vision_tower(pix).last_hidden_state[:, 1:]

    def answer_loss(self, logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """Mean over samples of each answer's mean token loss: short answers weigh as much as captions."""
        logits, labels = logits[:, :-1], labels[:, 1:]
        ce = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), labels.reshape(-1), reduction="none",
                             ignore_index=-100).view(labels.shape)
        keep = (labels != -100).float()
        return ((ce * keep).sum(1) / keep.sum(1)).mean()

    def language_logits(self, ids, mask, image_rows: torch.Tensor) -> torch.Tensor:
        embeds = self.model.get_input_embeddings()(ids)
        embeds = embeds.masked_scatter((ids == self.image_token)[..., None], image_rows.to(embeds.dtype))
        hidden = self.model.model.language_model(inputs_embeds=embeds, attention_mask=mask).last_hidden_state
        return self.model.lm_head(hidden)

    # ---- stages -------------------------------------------------------------------
    def _run(self, name: str, steps: int, lr: float, params, step_fn) -> None:
        opt = torch.optim.AdamW(params, lr=lr, betas=(0.9, 0.98), weight_decay=0.01)
        smooth = None
        for step in range(steps):
            for group in opt.param_groups:
                group["lr"] = lr_at(step, steps, lr)
            loss = step_fn()
            opt.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(params, 1.0)
            opt.step()
            smooth = loss.item() if smooth is None else 0.95 * smooth + 0.05 * loss.item()
            if step % 100 == 0 or step == steps - 1:
                self.log(f"{name:9s} step {step:5d}  loss {smooth:.4f}  {(time.monotonic() - self.start) / 60:5.1f} min")

    def vision_step(self):
        scenes = [sample_scene(self.rng) for _ in range(self.cfg.batch)]
        pix = pixels([render(s, self.size) for s in scenes])
        return self.heads.loss(self.vision_features(pix), self.patch_labels(scenes))

    def language_step(self):
        samples = self.sample(self.cfg.batch)
        ids, mask, labels = self.tokens(samples)
        rows = self.symbolic(self.patch_labels([s for s, _ in samples])).flatten(0, 1)
        return self.answer_loss(self.language_logits(ids, mask, rows), labels)

    def bridge_step(self):
        scenes = [sample_scene(self.rng) for _ in range(self.cfg.batch)]
        pix = pixels([render(s, self.size) for s in scenes])
        with torch.no_grad():
            target = self.symbolic(self.patch_labels(scenes))
        projected = self.model.model.multi_modal_projector(self.vision_features(pix))
        return F.mse_loss(projected, target)

    def joint_step(self):
        samples = self.sample(self.cfg.batch)
        ids, mask, labels = self.tokens(samples)
        pix = pixels([render(s, self.size) for s, _ in samples])
        logits = self.model(input_ids=ids, attention_mask=mask, pixel_values=pix).logits
        return self.answer_loss(logits, labels)

    def train(self) -> None:
        m, c = self.model, self.cfg
        tower, projector, lm = m.model.vision_tower, m.model.multi_modal_projector, m.model.language_model
        m.train()
        self._run("vision", c.steps_vision, c.lr_vision, list(tower.parameters()) + list(self.heads.parameters()),
                  self.vision_step)
        self._run("language", c.steps_language, c.lr_language,
                  list(lm.parameters()) + list(m.lm_head.parameters()) + list(self.symbolic.parameters()),
                  self.language_step)
        self._run("bridge", c.steps_bridge, c.lr_bridge, list(projector.parameters()) + list(tower.parameters()),
                  self.bridge_step)
        self._run("joint", c.steps_joint, c.lr_joint, list(m.parameters()), self.joint_step)
        m.eval()
