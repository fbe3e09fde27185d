#!/usr/bin/env python3
"""Ask the `vlm` model a question about zero or more images.

  python clients/ask.py "What is in this picture?" photo.jpg            # gRPC, streamed as it arrives
  python clients/ask.py --protocol http "Describe both." a.png b.png     # HTTP generate endpoint
  python clients/ask.py --chat "What shape is red?" scene.png            # then follow-ups at the > prompt
  python clients/ask.py --video clip.mp4 "What colour is the circle?"    # 8 frames sampled (--frames N)

The question is wrapped in the checkpoint's chat format ("USER: <image>\\n...\\nASSISTANT:") unless
--raw is given, in which case it is sent verbatim and must hold one <image> per image. --chat and --video
send OpenAI-style messages through triton_vlm.client (gRPC) and the server applies the checkpoint's own
chat template; a chat resends its history each turn (the server keeps no session).
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
    p.add_argument("question", nargs="?", help="(with --chat: the first question; asked for if left out)")
    p.add_argument("images", nargs="*", type=Path)
    p.add_argument("--url", help="server address (default 127.0.0.1:8001 for gRPC, 127.0.0.1:8000 for HTTP)")
    p.add_argument("--protocol", choices=["grpc", "http"], default="grpc")
    p.add_argument("--no-stream", action="store_true", help="wait for the whole answer")
    p.add_argument("--raw", action="store_true", help="send the question verbatim as text_input")
    p.add_argument("--max-tokens", type=int, default=64)
    p.add_argument("--temperature", type=float, default=0.0)
    p.add_argument("--sampling", default="{}", help="extra sampling_parameters as JSON, e.g. '{\"top_p\": 0.9}'")
    p.add_argument("--chat", action="store_true", help="an interactive multi-turn chat about the images")
    p.add_argument("--video", help="a video file (or URL) to ask about")
    p.add_argument("--frames", type=int, default=8, help="frames sampled from --video")
    args = p.parse_args(argv)
    if args.chat or args.video:
        return converse(args)
    if args.question is None:
        p.error("a question is needed (or --chat)")

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


def converse(args) -> int:
    """--chat / --video through the client library: messages rendered by the server's template."""
    if args.protocol != "grpc" or args.raw:
        print("error: --chat and --video use gRPC messages (no --protocol http, no --raw)", file=sys.stderr)
        return 2
    config = client.GenerationConfig(max_new_tokens=args.max_tokens, do_sample=args.temperature > 0,
                                      temperature=args.temperature)
    pipe = client.pipeline(args.url or "127.0.0.1:8001", gen_config=config, num_frames=args.frames)
    if json.loads(args.sampling):
        print("error: --sampling is for single questions; --chat and --video take --max-tokens and --temperature",
              file=sys.stderr)
        return 2
    media = [{"type": "image_url", "image_url": {"url": str(path)}} for path in args.images]
    if args.video:
        media.append({"type": "video_url", "video_url": {"url": args.video}})
    session, question = None, args.question
    while True:
        question = question or _read("> ")
        if question is None:
            return 0
        text = [{"type": "text", "text": question}]
        prompt = [{"role": "user", "content": media + text}] if session is None else question
        try:
            session = pipe.chat(prompt, session=session)
        except (client.VLMError, ValueError) as e:  # the turn is not kept: ask again
            print(f"error: {e}", file=sys.stderr)
            if not args.chat:
                return 1
        else:
            print(("ASSISTANT: " if args.chat else "") + session.response.text, flush=True)
        if not args.chat:
            return 0
        question = None


def _read(prompt: str) -> str | None:
    """The next question; None at end of input or on an empty line."""
    try:
        line = input(prompt).strip()
    except (EOFError, KeyboardInterrupt):
        print()
        return None
    return line or None


if __name__ == "__main__":
    sys.exit(main())
