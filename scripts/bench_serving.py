#!/usr/bin/env python3
"""Throughput of the served model against HF transformers generating the same requests one by one.

  .venv/bin/python scripts/bench_serving.py [--model CKPT] [--requests 32] [--concurrency 1 8 16]

Starts tritonserver on a freshly built repository, sends the same image questions at each
concurrency over gRPC streaming, and prints requests/s, generated tokens/s, time to first
token, and the ratio to HF `generate` (batch 1, greedy) run in the same process, same machine.
"""
from __future__ import annotations

import argparse
import os
import statistics
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# The same threading the served llm gets (see server.py and triton/llm.py), so HF is not handicapped.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")


def workload(n: int, image_size: int):
    import io

    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(0)
    cases = []
    for i in range(n):
        img = Image.fromarray((rng.random((image_size * 2, image_size * 3, 3)) * 255).astype("uint8"))
        buf = io.BytesIO()
        img.save(buf, "PNG")
        prompt = "USER: <image>\n" + "Describe this picture. " * (1 + i % 4) + "\nASSISTANT:"
        cases.append((prompt, buf.getvalue()))
    return cases


def run_server(url: str, cases, sampling: dict, concurrency: int):
    from triton_vlm import client

    def one(case):
        start = time.perf_counter()
        first, pieces = None, []
        for piece in client.stream_grpc(url, case[0], [case[1]], sampling):
            first = first or time.perf_counter() - start
            pieces.append(piece)
        return first, "".join(pieces)

    start = time.perf_counter()
    with ThreadPoolExecutor(concurrency) as pool:
        results = list(pool.map(one, cases))
    return time.perf_counter() - start, results


def run_hf(checkpoint: Path, cases, max_tokens: int):
    import torch
    from transformers import AutoModelForImageTextToText, AutoProcessor

    from triton_vlm.preprocess import decode_image

    torch.set_num_threads(max(1, (os.cpu_count() or 2) // 2))
    processor = AutoProcessor.from_pretrained(checkpoint)
    model = AutoModelForImageTextToText.from_pretrained(checkpoint).eval()
    start, tokens = time.perf_counter(), 0
    for prompt, image in cases:
        inputs = processor(text=prompt, images=[decode_image(image)], return_tensors="pt")
        with torch.no_grad():
            out = model.generate(**inputs, max_new_tokens=max_tokens, do_sample=False)
        tokens += out.shape[1] - inputs["input_ids"].shape[1]
    return time.perf_counter() - start, tokens


def main():
    from triton_vlm.checkpoint import make_tiny
    from triton_vlm.geometry import ModelGeometry
    from triton_vlm.repository import BuildOptions, build_repository
    from triton_vlm.server import TritonServer

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", type=Path, help="checkpoint (default: a random tiny one)")
    ap.add_argument("--requests", type=int, default=32)
    ap.add_argument("--max-tokens", type=int, default=64)
    ap.add_argument("--concurrency", type=int, nargs="+", default=[1, 8, 16])
    args = ap.parse_args()

    work = Path(tempfile.mkdtemp(prefix="bench-"))
    checkpoint = args.model or make_tiny(work / "tiny")
    cases = workload(args.requests, ModelGeometry.from_checkpoint(checkpoint).vision.image_size)
    sampling = {"max_tokens": args.max_tokens, "temperature": 0, "ignore_eos": True}

    hf_secs, hf_tokens = run_hf(checkpoint, cases, args.max_tokens)
    print(f"HF transformers generate, batch 1: {len(cases) / hf_secs:7.2f} req/s {hf_tokens / hf_secs:8.1f} tok/s")

    repo = build_repository(checkpoint, work / "repo", BuildOptions())
    with TritonServer(repo, log_path=work / "server.log") as server:
        run_server(server.grpc_url, cases[:2], sampling, 2)  # warm-up
        for c in args.concurrency:
            secs, results = run_server(server.grpc_url, cases, sampling, c)
            tokens = len(cases) * args.max_tokens
            ttft = statistics.median(r[0] for r in results) * 1000
            print(f"triton-vlm, concurrency {c:3d}:     {len(cases) / secs:7.2f} req/s {tokens / secs:8.1f} tok/s  "
                  f"TTFT p50 {ttft:6.1f} ms   x{hf_secs / secs:5.2f} vs HF")


if __name__ == "__main__":
    main()
