"""`triton-vlm bench serve`: the served path against the in-process engine, on the same requests, in one run.

Both sides get the same requests (a prompt and an image each) and the same torch threads:
- served: a real tritonserver over a built repository; `concurrency` client threads, each with its own gRPC
  stream, send streamed requests one after another (a closed loop), as perf_analyzer --streaming does;
- in process: `LLMEngine` on its own loop thread, fed by `concurrency` threads in the same closed loop, with
  the input ids and image embeddings the served path computes (the repository's ONNX vision encoder).

Every request generates exactly --max-tokens greedy tokens (EOS ignored), so both sides do the same work.
A preset's vocabulary (32000) is larger than its stand-in tokenizer's (512): generation is then limited to the
tokenizer's ordinary tokens (`allowed_token_ids`, both sides), so that every token has text to stream.
TTFT is from sending (adding) a request to its first token; inter-token latency is per request,
(last token - first token) / (tokens - 1), as genai-perf computes it; both as p50/p99 over requests.
Timings on a shared machine are noisy: the two sides alternate per concurrency level, --repeats times, and
each side's fastest run counts; compare within one run.
"""
from __future__ import annotations

import io
import json
import os
import queue
import random
import sys
import tempfile
import threading
import time
import uuid
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable, NamedTuple

import numpy as np

IMAGE_SIZES = ((96, 64), (320, 240), (640, 480))  # (width, height): the processor resizes each


@dataclass
class ServeWorkload:
    min_requests: int = 8  # per concurrency level: max(min_requests, 2 x concurrency)
    min_prompt: int = 20  # words of text besides the image
    max_prompt: int = 200
    max_tokens: int = 32
    seed: int = 0

    def requests(self, concurrency: int) -> int:
        return max(self.min_requests, 2 * concurrency)


class Case(NamedTuple):
    prompt: str
    image: bytes


class Timing(NamedTuple):
    """One request as its caller saw it."""
    ttft: float
    itl: float | None  # None for a single token
    tokens: int
    text: str
    responses: int  # that carried tokens: several tokens each when the server merged them


class Level(NamedTuple):
    seconds: float
    timings: list[Timing]


def make_cases(w: ServeWorkload, n: int) -> list[Case]:
    from PIL import Image

    from .checkpoint import DEFAULT_CORPUS

    rng = random.Random(w.seed)
    words = sorted({word for line in DEFAULT_CORPUS for word in line.replace("<image>", " ").split()})
    cases = []
    for i in range(n):
        text = " ".join(rng.choices(words, k=rng.randint(w.min_prompt, w.max_prompt)))
        width, height = IMAGE_SIZES[i % len(IMAGE_SIZES)]
        pixels = np.random.default_rng(w.seed + i).integers(0, 256, (height, width, 3), dtype=np.uint8)
        buf = io.BytesIO()
        Image.fromarray(pixels).save(buf, "PNG")
        cases.append(Case(f"USER: <image>\n{text}\nASSISTANT:", buf.getvalue()))
    return cases


def closed_loop(cases: list, concurrency: int, one: Callable[[int, object], Timing], setup=None) -> Level:
    """Run `one(worker, case)` over the cases from `concurrency` threads, each starting its next case when its
    last one ends; `setup(worker)` runs first in each thread (not timed)."""
    jobs: queue.SimpleQueue = queue.SimpleQueue()
    for i, case in enumerate(cases):
        jobs.put((i, case))
    timings: list[Timing | None] = [None] * len(cases)
    errors: list[BaseException] = []
    ready = threading.Barrier(concurrency + 1)

    def worker(k: int):
        state = setup(k) if setup else None
        ready.wait()
        try:
            while True:
                try:
                    i, case = jobs.get_nowait()
                except queue.Empty:
                    return
                timings[i] = one(state, case)
        except BaseException as e:  # noqa: BLE001  (reported below, in the caller's thread)
            errors.append(e)

    threads = [threading.Thread(target=worker, args=(k,), daemon=True) for k in range(concurrency)]
    for t in threads:
        t.start()
    ready.wait()
    start = time.perf_counter()
    for t in threads:
        t.join()
    seconds = time.perf_counter() - start
    if errors:
        raise errors[0]
    return Level(seconds, timings)


def _timing(sent: float, arrivals: list[tuple[float, int]], text: str) -> Timing:
    """arrivals: (time, tokens) of each response or output that carried tokens."""
    arrivals = [(t, n) for t, n in arrivals if n]
    if not arrivals:
        raise RuntimeError("a request produced no tokens")
    tokens = sum(n for _, n in arrivals)
    first, last = arrivals[0][0], arrivals[-1][0]
    return Timing(first - sent, (last - first) / (tokens - 1) if tokens > 1 else None, tokens, text, len(arrivals))


# ---- served -----------------------------------------------------------------------------------------------
class Stream(NamedTuple):
    client: object
    responses: queue.SimpleQueue


def open_stream(url: str) -> Stream:
    import tritonclient.grpc as grpcclient

    responses: queue.SimpleQueue = queue.SimpleQueue()
    client = grpcclient.InferenceServerClient(url)
    client.start_stream(callback=lambda result, error: responses.put((time.perf_counter(), result, error)))
    return Stream(client, responses)


def served_request(stream: Stream, case: Case, sampling: dict) -> Timing:
    from .client.protocol import MODEL, grpc_inputs

    inputs = grpc_inputs(case.prompt, [case.image], True, sampling, returns=("num_output_tokens",))
    sent = time.perf_counter()
    stream.client.async_stream_infer(MODEL, inputs, request_id=uuid.uuid4().hex, enable_empty_final_response=True)
    arrivals, pieces = [], []
    while True:
        at, result, error = stream.responses.get(timeout=600)
        if error is not None:
            raise RuntimeError(f"served request failed: {error}")
        counts = result.as_numpy("num_output_tokens")
        if counts is not None:
            arrivals.append((at, int(counts.sum())))
            pieces.append(b"".join(result.as_numpy("text_output").reshape(-1)).decode())
        if result.get_response().parameters["triton_final_response"].bool_param:
            return _timing(sent, arrivals, "".join(pieces))


def run_served(url: str, cases: list[Case], sampling: dict, concurrency: int) -> Level:
    streams: list[Stream] = []

    def setup(_k):
        stream = open_stream(url)
        streams.append(stream)
        return stream
    try:
        return closed_loop(cases, concurrency, lambda s, case: served_request(s, case, sampling), setup)
    finally:
        for s in streams:
            s.client.stop_stream()
            s.client.close()


# ---- in process -------------------------------------------------------------------------------------------
class EngineRequest(NamedTuple):
    input_ids: list[int]
    image_embeds: object  # torch.Tensor [rows, hidden]


def engine_requests(checkpoint: Path, onnx_path: Path, cases: list[Case]) -> list[EngineRequest]:
    """What vlm sends llm for each case: its expanded input ids and the ONNX vision encoder's embeddings."""
    import onnxruntime as ort
    import torch

    from .export.vision import INPUT_NAME, OUTPUT_NAME
    from .preprocess import Preprocessor, as_image

    pre = Preprocessor(checkpoint)
    session = ort.InferenceSession(str(onnx_path), providers=["CPUExecutionProvider"])
    out = []
    for case in cases:
        pixels = pre.pixel_values([as_image(case.image, "image[0]")])
        (embeds,) = session.run([OUTPUT_NAME], {INPUT_NAME: pixels})
        out.append(EngineRequest(pre.input_ids(case.prompt), torch.from_numpy(embeds.reshape(-1, embeds.shape[-1]))))
    return out


def engine_request(engine, req: EngineRequest, params) -> Timing:
    done = threading.Event()
    arrivals, pieces = [], []

    def on_output(out):
        if out.index == 0:
            arrivals.append((time.perf_counter(), len(out.new_token_ids)))
            pieces.append(out.text)
        if out.error:
            pieces.append(f"<error: {out.error}>")
        if out.finished:
            done.set()

    seq = engine.make_sequence(engine.new_request_id(), req.input_ids, params, req.image_embeds)
    sent = time.perf_counter()
    engine.add(seq, on_output)
    if not done.wait(600):
        raise RuntimeError("in-process request did not finish in 600 s")
    return _timing(sent, arrivals, "".join(pieces))


def run_in_process(engine, requests: list[EngineRequest], params, concurrency: int) -> Level:
    level = closed_loop(requests, concurrency, lambda _s, req: engine_request(engine, req, params))
    engine.check()
    return level


# ---- the run ----------------------------------------------------------------------------------------------
def summarize(level: Level) -> dict:
    ttft = [t.ttft for t in level.timings]
    itl = [t.itl for t in level.timings if t.itl is not None]
    tokens = sum(t.tokens for t in level.timings)
    return {"seconds": level.seconds, "requests": len(level.timings), "tokens": tokens,
            "tokens_per_s": tokens / level.seconds,
            "tokens_per_response": tokens / sum(t.responses for t in level.timings),
            "ttft_p50_ms": _pct(ttft, 50) * 1e3, "ttft_p99_ms": _pct(ttft, 99) * 1e3,
            "itl_p50_ms": _pct(itl, 50) * 1e3 if itl else None, "itl_p99_ms": _pct(itl, 99) * 1e3 if itl else None}


def _pct(values: list[float], p: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, max(0, round(p / 100 * len(ordered) + 0.5) - 1))]


def text_tokens_only(checkpoint: Path) -> dict:
    """allowed_token_ids when the model's vocabulary has ids its tokenizer cannot turn into text."""
    from transformers import AutoTokenizer

    from .geometry import ModelGeometry

    tokenizer = AutoTokenizer.from_pretrained(checkpoint)
    if ModelGeometry.from_checkpoint(checkpoint).text.vocab_size <= len(tokenizer):
        return {}
    special = set(tokenizer.all_special_ids) | set(tokenizer.added_tokens_decoder)
    return {"allowed_token_ids": [t for t in range(len(tokenizer)) if t not in special]}


def bench_serve(preset: str, w: ServeWorkload, concurrencies: list[int], threads: int,
                checkpoint: Path | None = None, llm_params: dict[str, str] | None = None, repeats: int = 1) -> dict:
    import torch

    from .bench import write_checkpoint
    from .engine.config import EngineConfig
    from .engine.llm_engine import LLMEngine
    from .engine.sampling_params import SamplingParams
    from .repository import BuildOptions, build_repository
    from .server import TritonServer

    torch.set_num_threads(threads)
    llm = {"torch_threads": str(threads), **(llm_params or {})}
    cases = make_cases(w, max(w.requests(c) for c in concurrencies))
    levels = []
    with tempfile.TemporaryDirectory() as tmp:
        ckpt = checkpoint or write_checkpoint(preset, Path(tmp) / preset)
        sampling = {"max_tokens": w.max_tokens, "temperature": 0, "ignore_eos": True, **text_tokens_only(ckpt)}
        params = SamplingParams(**sampling)
        repo = build_repository(ckpt, Path(tmp) / "repo", BuildOptions(llm=llm))
        requests = engine_requests(ckpt, repo / "vision_encoder" / "1" / "model.onnx", cases)
        engine = LLMEngine(str(ckpt), EngineConfig(**{k: type(getattr(EngineConfig(), k))(v)
                                                      for k, v in llm.items() if k != "torch_threads"}))
        engine.start()
        try:
            with TritonServer(repo, log_path=Path(tmp) / "server.log") as server:
                run_served(server.grpc_url, cases[:2], sampling, 2)  # warm-up, both sides
                run_in_process(engine, requests[:2], params, 2)
                for c in concurrencies:
                    n = w.requests(c)
                    print(f"  concurrency {c}: {n} requests", file=sys.stderr, flush=True)
                    runs = [(run_served(server.grpc_url, cases[:n], sampling, c),
                             run_in_process(engine, requests[:n], params, c)) for _ in range(repeats)]
                    served, local = (min((r[side] for r in runs), key=lambda lv: lv.seconds) for side in (0, 1))
                    levels.append(_compare(c, served, local))
        finally:
            engine.stop()
    return {"preset": None if checkpoint else preset, "checkpoint": str(checkpoint) if checkpoint else None,
            "workload": asdict(w), "repeats": repeats, "threads": threads, "llm_params": llm, "cpus": os.cpu_count(),
            "load_average": os.getloadavg()[0], "levels": levels}


def _compare(concurrency: int, served: Level, local: Level) -> dict:
    s, e = summarize(served), summarize(local)
    same = sum(a.text == b.text and a.tokens == b.tokens for a, b in zip(served.timings, local.timings))
    return {"concurrency": concurrency, "served": s, "in_process": e, "ratio": s["tokens_per_s"] / e["tokens_per_s"],
            "outputs_equal": same}


def print_serve(result: dict) -> None:
    w = result["workload"]
    source = result["checkpoint"] or f"preset {result['preset']}"
    print(f"{source}; prompts of {w['min_prompt']}-{w['max_prompt']} words + 1 image, {w['max_tokens']} greedy "
          f"tokens each; best of {result['repeats']}; {result['threads']} torch thread(s), {result['cpus']} CPUs, load average "
          f"{result['load_average']:.1f} at the end")
    print(f"{'conc':>4} {'reqs':>5} {'system':<11} {'tok/s':>8} {'TTFT p50':>9} {'p99':>8} {'ITL p50':>8} "
          f"{'p99':>8} {'tok/resp':>8}  {'served/in-process':>17} {'equal':>6}")
    for lv in result["levels"]:
        for name, key in (("served", "served"), ("in-process", "in_process")):
            r = lv[key]
            tail = f"{lv['ratio']:>16.2f}x {lv['outputs_equal']:>3}/{r['requests']}" if key == "served" else ""
            print(f"{lv['concurrency']:>4} {r['requests']:>5} {name:<11} {r['tokens_per_s']:>8.1f} "
                  f"{r['ttft_p50_ms']:>7.0f}ms {r['ttft_p99_ms']:>6.0f}ms {_ms(r['itl_p50_ms'])} {_ms(r['itl_p99_ms'])}"
                  f" {r['tokens_per_response']:>8.2f}  {tail}")
    print("(TTFT: send to first token; ITL: per request, (last - first token) / (tokens - 1); tok/resp: tokens per "
          "response (served) or engine output (in process) that carried any)")


def _ms(value: float | None) -> str:
    return f"{'-':>8}" if value is None else f"{value:>6.1f}ms"


def main(args) -> None:
    w = ServeWorkload(args.min_requests, args.min_prompt, args.max_prompt, args.max_tokens, args.seed)
    llm = dict(args.llm_param or [])
    result = bench_serve(args.preset, w, args.concurrency, args.threads or 1, args.checkpoint, llm, args.repeats)
    print_serve(result)
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=2))
