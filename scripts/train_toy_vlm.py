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
import os
import time
from dataclasses import fields

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import torch  # noqa: E402

from triton_vlm.checkpoint import save_checkpoint  # noqa: E402
from triton_vlm.toy import evaluate as ev  # noqa: E402
from triton_vlm.toy.train import Trainer, TrainConfig, fresh_model  # noqa: E402


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
    model, processor = fresh_model(config.seed)
    print(f"{sum(p.numel() for p in model.parameters()) / 1e6:.2f}M parameters, {config}", flush=True)
    start = time.monotonic()
    Trainer(model, processor, config, log=lambda line: print(line, flush=True)).train()
    print(f"trained in {(time.monotonic() - start) / 60:.1f} min", flush=True)
    print(f"saved {save_checkpoint(model, processor, args.out)}")
    predict = ev.hf_predictor(model, processor)
    results = ev.evaluate(predict, processor, n=args.eval_n, seed=config.seed + 1)
    results += ev.evaluate_chats(predict, processor, n=args.eval_n // 5, seed=config.seed + 1)
    print(ev.table(results, f"held-out accuracy ({args.eval_n} pairs, {args.eval_n // 5} chats, greedy, in process)"))


if __name__ == "__main__":
    main()
