#!/usr/bin/env python
"""Train the toy VLM from scratch on CPU: a small LlavaForConditionalGeneration (CLIP tower, projector,
Llama decoder) that answers questions about synthetic shape scenes.

  .venv/bin/python scripts/train_toy_vlm.py [--out models/toy-vlm] [--seed 0]

Data is generated on the fly and the run is deterministic under --seed; the stages are described in
backend/triton_vlm/toy/train.py. The result is an ordinary HF checkpoint (weights, tokenizer, processor,
chat template, generation config), then checked on held-out pairs in process.
"""
from __future__ import annotations

import argparse
import itertools
import os
import time
from dataclasses import fields

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import torch  # noqa: E402

from triton_vlm.checkpoint import make_llava_config, make_processor, save_checkpoint, train_tokenizer  # noqa: E402
from triton_vlm.toy import evaluate as ev  # noqa: E402
from triton_vlm.toy.scenes import COLOURS, SHAPES, Scene, Shape, all_answer_words, all_questions, caption  # noqa: E402
from triton_vlm.toy.train import Trainer, TrainConfig  # noqa: E402

# 48 px images in 8 px patches: 36 image tokens; about 1.9M parameters in all.
GEOMETRY = dict(image_size=48, patch_size=8, vision_hidden=96, vision_layers=3, vision_heads=4, hidden=128,
                layers=3, heads=4, kv_heads=2, intermediate=384,
                vision_feature_layer=-1,  # the tower is small: its last layer is the one to read
                max_positions=256)


def tokenizer_corpus() -> list[str]:
    """Every question and answer in chat form, so each word ends up a single token."""
    answers = all_answer_words()
    captions = [caption(Scene([Shape(k, c, 0.5, 0.5, 0.1)], (255, 255, 255), 0.0, 0))
                for k, c in itertools.product(SHAPES, COLOURS)]
    lines = [f"USER: <image>\n{q}\nASSISTANT: {a}" for q, a in zip(all_questions(), itertools.cycle(answers))]
    lines += [f"ASSISTANT: {w}" for w in answers] + [f"ASSISTANT: {c}, {c} and {c}" for c in captions]
    return lines * 4


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default="models/toy-vlm")
    ap.add_argument("--threads", type=int, default=os.cpu_count() or 2)
    ap.add_argument("--eval-n", type=int, default=250, help="held-out pairs for the closing in-process check")
    for f in fields(TrainConfig):
        kind = {"int": int, "float": float}.get(f.type)  # annotations are strings here
        if kind:
            ap.add_argument("--" + f.name.replace("_", "-"), type=kind, default=f.default)
    args = ap.parse_args()

    torch.set_num_threads(args.threads)
    config = TrainConfig(**{f.name: getattr(args, f.name) for f in fields(TrainConfig) if hasattr(args, f.name)})
    torch.manual_seed(config.seed)
    tokenizer = train_tokenizer(tokenizer_corpus(), vocab_size=384)
    llava_config = make_llava_config(tokenizer, **GEOMETRY)
    processor = make_processor(tokenizer, GEOMETRY["image_size"], GEOMETRY["patch_size"])
    from transformers import LlavaForConditionalGeneration

    model = LlavaForConditionalGeneration(llava_config)
    print(f"{sum(p.numel() for p in model.parameters()) / 1e6:.2f}M parameters, {config}", flush=True)
    start = time.monotonic()
    Trainer(model, processor, config, log=lambda line: print(line, flush=True)).train()
    print(f"trained in {(time.monotonic() - start) / 60:.1f} min", flush=True)
    print(f"saved {save_checkpoint(model, processor, args.out)}")
    results = ev.evaluate(ev.hf_predictor(model, processor), processor, n=args.eval_n, seed=config.seed + 1)
    print(ev.table(results, f"held-out accuracy ({args.eval_n} pairs, greedy, in process)"))


if __name__ == "__main__":
    main()
