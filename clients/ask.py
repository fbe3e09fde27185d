#!/usr/bin/env python3
"""Ask the `vlm` model a question about zero or more images.

  python clients/ask.py "What is in this picture?" photo.jpg            # gRPC, streamed as it arrives
  python clients/ask.py --protocol http "Describe both." a.png b.png     # HTTP generate endpoint

The question is wrapped in the checkpoint's chat format ("USER: <image>\\n...\\nASSISTANT:") unless
--raw is given, in which case it is sent verbatim and must hold one <image> per image.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from triton_vlm import client


def llava_prompt(question: str, n_images: int, image_token: str = "<image>") -> str:
    return "USER: " + f"{image_token}\n" * n_images + f"{question}\nASSISTANT:"


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("question")
    p.add_argument("images", nargs="*", type=Path)
    p.add_argument("--url", help="server address (default 127.0.0.1:8001 for gRPC, 127.0.0.1:8000 for HTTP)")
    p.add_argument("--protocol", choices=["grpc", "http"], default="grpc")
    p.add_argument("--no-stream", action="store_true", help="wait for the whole answer")
    p.add_argument("--raw", action="store_true", help="send the question verbatim as text_input")
    p.add_argument("--max-tokens", type=int, default=64)
    p.add_argument("--temperature", type=float, default=0.0)
    p.add_argument("--sampling", default="{}", help="extra sampling_parameters as JSON, e.g. '{\"top_p\": 0.9}'")
    args = p.parse_args(argv)

    images = [path.read_bytes() for path in args.images]
    prompt = args.question if args.raw else llava_prompt(args.question, len(images))
    sampling = {"max_tokens": args.max_tokens, "temperature": args.temperature, **json.loads(args.sampling)}
    url = args.url or ("127.0.0.1:8001" if args.protocol == "grpc" else "127.0.0.1:8000")
    try:
        if args.protocol == "grpc":
            pieces = client.stream_grpc(url, prompt, images, sampling, stream=not args.no_stream)
        elif args.no_stream:
            pieces = [client.generate_http(url, prompt, images, sampling)]
        else:
            pieces = client.stream_http(url, prompt, images, sampling)
        for piece in pieces:
            print(piece, end="", flush=True)
        print()
    except client.VLMError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
