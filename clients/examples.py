#!/usr/bin/env python3
"""Every form of the client library against a running server with the toy model, on freshly drawn scenes;
each answer is printed beside what the scene was drawn with (the README quotes this output).

  python clients/examples.py [--url 127.0.0.1:8001] [--seed 7]
"""
from __future__ import annotations

import argparse
import random
import tempfile
from dataclasses import replace
from pathlib import Path

import numpy as np

from triton_vlm.client import LLM, SamplingParams, pipeline
from triton_vlm.toy.scenes import caption, render, sample_scene


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--url", default="127.0.0.1:8001")
    ap.add_argument("--seed", type=int, default=7)
    args = ap.parse_args()
    rng = random.Random(args.seed)
    scenes = [sample_scene(rng, 3) for _ in range(3)]
    images = [render(s, 48) for s in scenes]  # the toy model's 48 px scenes

    print("== vLLM style: LLM.generate on a batch")
    llm = LLM(args.url)
    prompts = [{"prompt": "USER: <image>\nDescribe the image.\nASSISTANT:", "multi_modal_data": {"image": img}}
               for img in images]
    for out, scene in zip(llm.generate(prompts, SamplingParams(temperature=0, max_tokens=32)), scenes):
        print(f"{out.outputs[0].text!r} {out.outputs[0].finish_reason}   drawn: {caption(scene)!r}")

    print("== LMDeploy style: a tuple, a batch of tuples, a chat")
    pipe = pipeline(args.url)
    first, second, _ = scenes[0].shapes
    print(pipe((f"What colour is the {first.kind}?", images[0])).text, "  drawn:", first.colour)
    other = scenes[2].shapes[0]
    batch = pipe([("How many shapes are there?", images[1]), (images[2], f"What shape is {other.colour}?")])
    print([r.text for r in batch], "  drawn:", ["three", other.kind])
    sess = pipe.chat((f"What colour is the {first.kind}?", images[0]))
    sess = pipe.chat(f"And the {second.kind}?", session=sess)
    print(sess.history, "  drawn:", [first.colour, second.colour])

    print("== a video: 8 frames sampled with PyAV, one <image> each")
    shape = scenes[1].shapes[1]
    with tempfile.TemporaryDirectory() as tmp:
        clip = write_clip(Path(tmp) / "clip.mp4", scenes[1])
        (out,) = llm.generate({"prompt": f"USER: <video>\nWhat colour is the {shape.kind}?\nASSISTANT:",
                               "multi_modal_data": {"video": str(clip)}}, SamplingParams(temperature=0))
    print(repr(out.outputs[0].text), out.num_prompt_tokens, "prompt tokens   drawn:", shape.colour)


def write_clip(path: Path, scene, frames: int = 24) -> Path:
    """An MP4 of the scene under fresh background noise each frame."""
    import av

    with av.open(str(path), mode="w") as container:
        stream = container.add_stream("mpeg4", rate=12)
        stream.width = stream.height = 48
        stream.pix_fmt = "yuv420p"
        for k in range(frames):
            img = render(replace(scene, noise=4.0, noise_seed=k), 48)
            for packet in stream.encode(av.VideoFrame.from_ndarray(np.asarray(img), format="rgb24")):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)
    return path


if __name__ == "__main__":
    main()
