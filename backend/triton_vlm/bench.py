"""`triton-vlm bench`: the engine against HF transformers in one process, and against the machine's roofline.

bench engine    writes a random LLaVA checkpoint of a preset, runs the same token ids through HF `generate`
                one at a time, HF `generate` on one left-padded static batch, transformers' `generate_batch`
                (when installed) and `LLMEngine.generate`; checks greedy outputs are equal; prints tokens/s,
                ratios and decode-step efficiency at several batch sizes.
bench roofline  decode-step efficiency, KV waste at peak load and how many sequences a fixed KV budget holds.
bench cache     through a real tritonserver: time to first token cold, for a repeated image and prompt, the same
                image with a new question, and turn 4 of a chat against turn 1; the prefix and image cache hit rates.

Efficiency = max(weight bytes / bandwidth, FLOPs / peak) / measured step time, with bandwidth (GEMV) and
peak (SGEMM) measured in the same run. Timings on a shared machine are noisy: compare within one run.
"""
from __future__ import annotations

import json
import os
import random
import statistics
import sys
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable, NamedTuple

import torch

from .engine.config import EngineConfig


@dataclass
class Preset:
    hidden: int
    intermediate: int
    layers: int
    heads: int
    kv_heads: int
    vocab: int


PRESETS = {
    "58m": Preset(hidden=512, intermediate=1408, layers=8, heads=8, kv_heads=8, vocab=32000),  # issue 8's model
    "134m": Preset(hidden=768, intermediate=2048, layers=12, heads=12, kv_heads=4, vocab=32000),
    "tiny": Preset(hidden=64, intermediate=128, layers=2, heads=4, kv_heads=2, vocab=512),  # for tests
}


@dataclass
class Workload:
    requests: int = 16
    min_prompt: int = 20
    max_prompt: int = 200
    max_tokens: int = 64
    seed: int = 0


# A vision tower of LLaVA-1.5's shape in miniature: 224 px in 14-px patches, 256 image tokens per image.
BIG_VISION = dict(image_size=224, patch_size=14, vision_hidden=192, vision_layers=4, vision_heads=4)


def write_checkpoint(preset: str, out_dir: Path, seed: int = 0, vision: dict | None = None) -> Path:
    """A random LLaVA checkpoint whose decoder has the preset's geometry (the tokenizer is a small stand-in);
    `vision` overrides the tiny default vision tower (make_llava_config's image_size, patch_size, vision_*)."""
    from transformers import LlavaForConditionalGeneration

    from .checkpoint import DEFAULT_CORPUS, make_llava_config, make_processor, save_checkpoint, train_tokenizer

    p = PRESETS[preset]
    torch.manual_seed(seed)
    tokenizer = train_tokenizer(DEFAULT_CORPUS)
    # A wide init keeps greedy logits far from ties, so systems that add in different orders still agree.
    vision = {"image_size": 32, "patch_size": 8, **(vision or {})}
    config = make_llava_config(tokenizer, hidden=p.hidden, intermediate=p.intermediate, layers=p.layers, heads=p.heads,
                               kv_heads=p.kv_heads, init_range=0.05, **vision)
    config.text_config.vocab_size = p.vocab
    model = LlavaForConditionalGeneration(config).eval()
    return save_checkpoint(model, make_processor(tokenizer, vision["image_size"], vision["patch_size"]), out_dir)


def make_prompts(w: Workload, vocab: int, avoid: set[int]) -> list[list[int]]:
    rng = random.Random(w.seed)
    ids = [t for t in range(5, vocab) if t not in avoid]
    return [[1] + rng.choices(ids, k=rng.randint(w.min_prompt, w.max_prompt) - 1) for _ in range(w.requests)]


def hf_decoder(checkpoint: Path):
    """transformers' own Llama-family CausalLM with the checkpoint's decoder weights (text-only workload)."""
    from transformers import AutoConfig, AutoModelForCausalLM

    from .engine.weights import decoder_key, weight_files
    from safetensors.torch import load_file

    text_config = AutoConfig.from_pretrained(checkpoint).text_config
    model = AutoModelForCausalLM.from_config(text_config, attn_implementation="sdpa").eval()
    state = {}
    for f in weight_files(checkpoint):
        for key, tensor in load_file(f).items():
            name = decoder_key(key)
            if name is not None:
                state[name if name.startswith("lm_head.") else "model." + name] = tensor
    model.load_state_dict(state, strict=True)
    return model


def greedy_config(max_tokens: int, pad_id: int):
    from transformers import GenerationConfig

    # No EOS: every request generates exactly max_tokens, in every system.
    return GenerationConfig(max_new_tokens=max_tokens, min_new_tokens=max_tokens, do_sample=False, eos_token_id=None,
                            pad_token_id=pad_id, bos_token_id=1)


@torch.inference_mode()
def hf_one_at_a_time(model, prompts, max_tokens, pad_id):
    cfg = greedy_config(max_tokens, pad_id)
    return [model.generate(torch.tensor([p]), generation_config=cfg)[0, len(p):].tolist() for p in prompts]


@torch.inference_mode()
def hf_static_batch(model, prompts, max_tokens, pad_id):
    width = max(map(len, prompts))
    ids = torch.tensor([[pad_id] * (width - len(p)) + p for p in prompts])
    mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompts])
    out = model.generate(ids, attention_mask=mask, generation_config=greedy_config(max_tokens, pad_id))
    return out[:, width:].tolist()


@torch.no_grad()  # generate_batch updates its own static tensors in place: not under inference_mode
def hf_generate_batch(model, prompts, max_tokens, pad_id):
    from transformers import ContinuousBatchingConfig

    # Sized for the workload: by default it sizes (and zeroes) its cache from free memory, which costs seconds.
    longest = max(map(len, prompts)) + max_tokens
    cb = ContinuousBatchingConfig(page_size=16, num_blocks=len(prompts) * -(-longest // 16) + 8, max_batch_tokens=2048)
    out = model.generate_batch(prompts, generation_config=greedy_config(max_tokens, pad_id),
                               continuous_batching_config=cb, progress_bar=False)
    by_order = sorted(out.values(), key=lambda r: int(str(r.request_id).rsplit("_", 1)[-1]))
    return [list(r.generated_tokens) for r in by_order]


BLOCK_SIZE = EngineConfig.block_size  # the engine's default; bench --block-size changes it for every engine the run builds


def our_engine(checkpoint: Path, max_seqs: int, kv_blocks: int = 0):
    from .engine.llm_engine import LLMEngine

    return LLMEngine(str(checkpoint), EngineConfig(max_num_seqs=max(max_seqs, 1), num_kv_blocks=kv_blocks,
                                                   block_size=BLOCK_SIZE))


def engine_generate(engine, prompts, max_tokens):
    from .engine.sampling_params import SamplingParams

    out = engine.generate(prompts, SamplingParams(max_tokens=max_tokens, temperature=0, ignore_eos=True))
    engine.check()
    return out


class Run(NamedTuple):
    system: str
    seconds: float
    tokens: int
    outputs: list[list[int]]
    error: str | None = None


def timed(system: str, fn: Callable[[], list[list[int]]]) -> Run:
    start = time.perf_counter()
    try:
        outputs = fn()
    except Exception as e:  # noqa: BLE001  (a peer that breaks is reported, the others still run)
        run = Run(system, time.perf_counter() - start, 0, [], f"{type(e).__name__}: {e}")
    else:
        run = Run(system, time.perf_counter() - start, sum(map(len, outputs)), outputs)
    print(f"  {system}: {run.seconds:.1f} s", file=sys.stderr, flush=True)
    return run


# ---- the machine ------------------------------------------------------------------------------------
def measure_bandwidth(mib: int = 256, repeats: int = 8) -> float:
    """Bytes/s of a GEMV over a matrix far larger than any cache (what a batch-1 decode step does)."""
    n = int((mib * 2 ** 20 / 4) ** 0.5)
    a, x = torch.randn(n, n), torch.randn(n)
    best = min(_time(lambda: torch.mv(a, x)) for _ in range(repeats))
    return a.numel() * 4 / best


def measure_peak(n: int = 1536, repeats: int = 5) -> float:
    """FLOP/s of an fp32 SGEMM."""
    a, b = torch.randn(n, n), torch.randn(n, n)
    best = min(_time(lambda: a @ b) for _ in range(repeats))
    return 2 * n ** 3 / best


def _time(fn) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def decode_cost(geometry, batch: int, context: int) -> tuple[float, float]:
    """(bytes of weights, FLOPs) of one decode step at this batch size and mean context length."""
    g = geometry.text
    per_layer = (g.hidden_size * (g.num_heads + 2 * g.num_kv_heads) * g.head_dim + g.num_heads * g.head_dim * g.hidden_size
                 + 3 * g.hidden_size * g.intermediate_size)
    params = g.num_layers * per_layer + g.vocab_size * g.hidden_size  # + lm_head; embedding rows are a lookup
    attention = 4 * g.num_layers * g.num_heads * g.head_dim * context  # q.k and p.v per token
    return params * 4, batch * (2 * params + attention)


def step_times(engine, batch: int, context: int, steps: int) -> list[float]:
    """Seconds of each of `steps` decode steps with `batch` sequences of about `context` tokens."""
    from .engine.sampling_params import SamplingParams

    rng = random.Random(batch)
    vocab = engine.geometry.text.vocab_size
    params = SamplingParams(max_tokens=steps + 4, temperature=0, ignore_eos=True)
    for i in range(batch):
        seq = engine.make_sequence(f"eff-{batch}-{i}", [rng.randrange(5, vocab) for _ in range(context)], params)
        engine.add(seq, lambda out: None)
    while engine.scheduler.waiting or any(s.num_computed < s.num_tokens - 1 for s in engine.scheduler.running):
        engine.step()  # prefill, until every sequence decodes
    times = []
    for _ in range(steps):
        start = time.perf_counter()
        engine.step()
        times.append(time.perf_counter() - start)
    while engine.has_work():
        engine.step()
    engine.check()
    return times


def efficiency(engine, batches: list[int], context: int, steps: int) -> dict:
    bandwidth, peak = measure_bandwidth(), measure_peak()
    rows = []
    for b in batches:
        t = statistics.median(step_times(engine, b, context, steps))
        weight_bytes, flops = decode_cost(engine.geometry, b, context)
        bound = max(weight_bytes / bandwidth, flops / peak)
        rows.append({"batch": b, "step_ms": t * 1e3, "roofline_ms": bound * 1e3, "efficiency": bound / t,
                     "bound": "memory" if weight_bytes / bandwidth >= flops / peak else "compute"})
    return {"bandwidth_gbs": bandwidth / 1e9, "peak_gflops": peak / 1e9, "context": context, "steps": rows}


def print_efficiency(eff: dict) -> None:
    print(f"\nmachine: GEMV bandwidth {eff['bandwidth_gbs']:.1f} GB/s, SGEMM peak {eff['peak_gflops']:.0f} GFLOP/s "
          f"(measured now); decode context ~{eff['context']} tokens")
    print(f"{'batch':>5} {'step ms':>9} {'roofline ms':>12} {'bound':>8} {'efficiency':>11}")
    for r in eff["steps"]:
        print(f"{r['batch']:>5} {r['step_ms']:>9.2f} {r['roofline_ms']:>12.2f} {r['bound']:>8} {r['efficiency']:>11.2f}")


# ---- bench engine -------------------------------------------------------------------------------------
def bench_engine(preset: str, w: Workload, batches: list[int], steps: int, checkpoint: Path | None = None) -> dict:
    from transformers import GenerationMixin

    with tempfile.TemporaryDirectory() as tmp:
        ckpt = checkpoint or write_checkpoint(preset, Path(tmp) / preset)
        engine = our_engine(ckpt, max(w.requests, *batches))
        g = engine.geometry
        prompts = make_prompts(w, g.text.vocab_size, {g.image_token_id, *g.eos_token_ids})
        model = hf_decoder(ckpt)
        pad = g.text.vocab_size - 1
        systems = [("HF generate, one at a time", lambda: hf_one_at_a_time(model, prompts, w.max_tokens, pad)),
                   (f"HF generate, static batch of {w.requests}",
                    lambda: hf_static_batch(model, prompts, w.max_tokens, pad))]
        if hasattr(GenerationMixin, "generate_batch"):
            systems.append(("transformers generate_batch", lambda: hf_generate_batch(model, prompts, w.max_tokens, pad)))
        systems.append(("LLMEngine.generate", lambda: engine_generate(engine, prompts, w.max_tokens)))
        engine_generate(engine, prompts[:2], 2)  # warm-up, as HF's first call warms up below
        hf_one_at_a_time(model, prompts[:1], 2, pad)
        runs = [timed(name, fn) for name, fn in systems]
        eff = efficiency(engine, batches, (w.min_prompt + w.max_prompt) // 2 + w.max_tokens // 2, steps)
    base, ours = runs[0], runs[-1]
    result = {"preset": preset, "geometry": asdict(PRESETS[preset]), "workload": asdict(w),
              "threads": torch.get_num_threads(), "load_average": os.getloadavg()[0], "systems": [],
              "efficiency": eff}
    for r in runs:
        tps = r.tokens / r.seconds
        result["systems"].append({"system": r.system, "seconds": r.seconds, "tokens": r.tokens, "tokens_per_s": tps,
                                  "vs_hf_one_at_a_time": tps / (base.tokens / base.seconds),
                                  "engine_speedup": (ours.tokens / ours.seconds) / tps if tps else None,
                                  "outputs_equal_to_hf": sum(a == b for a, b in zip(r.outputs, base.outputs)),
                                  "error": r.error})
    result["all_equal"] = all(s["outputs_equal_to_hf"] == w.requests for s in result["systems"] if not s["error"])
    return result


def print_engine(result: dict) -> None:
    w = result["workload"]
    print(f"preset {result['preset']} {result['geometry']}; {w['requests']} requests, prompts "
          f"{w['min_prompt']}-{w['max_prompt']} tokens, {w['max_tokens']} greedy tokens each; "
          f"{result['threads']} torch threads; load average {result['load_average']:.1f} at the end")
    print(f"{'system':<38} {'tok/s':>8} {'vs HF 1-at-a-time':>18} {'engine is':>10} {'equal to HF':>12}")
    for s in result["systems"]:
        if s["error"]:
            print(f"{s['system']:<38} failed: {s['error']}")
            continue
        print(f"{s['system']:<38} {s['tokens_per_s']:>8.1f} {s['vs_hf_one_at_a_time']:>17.2f}x "
              f"{s['engine_speedup']:>9.2f}x {s['outputs_equal_to_hf']:>6}/{w['requests']}")
    print("greedy outputs: " + ("all equal" if result["all_equal"] else "DIFFER (the figures above are not comparable)"))
    print_efficiency(result["efficiency"])


# ---- bench roofline ------------------------------------------------------------------------------------
def kv_usage(engine, prompts: list[list[int]], max_tokens: int) -> dict:
    """Run the prompts; at the step with the most KV slots allocated, how many held live tokens."""
    from .engine.sampling_params import SamplingParams

    params = SamplingParams(max_tokens=max_tokens, temperature=0, ignore_eos=True)
    for i, p in enumerate(prompts):
        engine.add(engine.make_sequence(f"kv-{i}", p, params), lambda out: None)
    bs = engine.config.block_size
    peak = {"allocated_slots": 0, "live_tokens": 0, "running": 0}
    max_running = 0
    while engine.has_work():
        engine.step()
        running = engine.scheduler.running
        allocated = (engine.pool.num_blocks - engine.pool.num_free) * bs
        max_running = max(max_running, len(running))
        if allocated > peak["allocated_slots"]:
            peak = {"allocated_slots": allocated, "live_tokens": sum(s.num_computed for s in running),
                    "running": len(running)}
    engine.check()
    return {**peak, "waste": 1 - peak["live_tokens"] / max(peak["allocated_slots"], 1), "max_running": max_running,
            "preemptions": engine.scheduler.num_preemptions}


def bench_roofline(preset: str, w: Workload, batches: list[int], steps: int, kv_budget_tokens: int,
                   checkpoint: Path | None = None) -> dict:
    with tempfile.TemporaryDirectory() as tmp:
        ckpt = checkpoint or write_checkpoint(preset, Path(tmp) / preset)
        engine = our_engine(ckpt, max(w.requests, *batches))
        g = engine.geometry
        prompts = make_prompts(w, g.text.vocab_size, {g.image_token_id, *g.eos_token_ids})
        eff = efficiency(engine, batches, (w.min_prompt + w.max_prompt) // 2 + w.max_tokens // 2, steps)
        waste = kv_usage(engine, prompts, w.max_tokens)
        # A fixed budget: how many sequences run at once, paged, against one max_model_len slab each.
        bs = engine.config.block_size
        many = make_prompts(Workload(4 * w.requests, w.min_prompt, w.max_prompt, w.max_tokens, w.seed + 1),
                            g.text.vocab_size, {g.image_token_id, *g.eos_token_ids})
        budget = our_engine(ckpt, len(many), kv_blocks=kv_budget_tokens // bs)
        fit = kv_usage(budget, many, w.max_tokens)
        max_len = budget.scheduler.config.max_model_len
    contiguous = kv_budget_tokens // max_len
    return {"preset": preset, "workload": asdict(w), "block_size": bs, "efficiency": eff, "kv_waste_at_peak": waste,
            "kv_budget": {"tokens": kv_budget_tokens, "max_model_len": max_len, "paged_max_running": fit["max_running"],
                          "contiguous_fit": contiguous,
                          "ratio": fit["max_running"] / contiguous if contiguous else float("inf"),
                          "preemptions": fit["preemptions"]}}


def print_roofline(result: dict) -> None:
    print_efficiency(result["efficiency"])
    k = result["kv_waste_at_peak"]
    print(f"\nKV waste at peak load: {k['allocated_slots'] - k['live_tokens']} of {k['allocated_slots']} allocated "
          f"slots hold no live token ({k['waste']:.1%}; target <= 4%), {k['running']} sequences running, "
          f"block size {result['block_size']}")
    b = result["kv_budget"]
    print(f"KV budget of {b['tokens']} tokens: paged ran {b['paged_max_running']} sequences at once; contiguous "
          f"max-length ({b['max_model_len']} tokens each) preallocation fits {b['contiguous_fit']} "
          f"({b['ratio']:.1f}x; target >= 4x)")


# ---- bench cache ----------------------------------------------------------------------------------------------
def _words(rng: random.Random, n: int) -> str:
    from .checkpoint import DEFAULT_CORPUS

    words = [w for line in DEFAULT_CORPUS for w in line.replace("<image>", "").split()]
    return " ".join(rng.choice(words) for _ in range(n))


def _image(seed: int, size: int) -> bytes:
    import io

    import numpy as np
    from PIL import Image

    pixels = (np.random.default_rng(seed).random((size, size, 3)) * 255).astype("uint8")
    buf = io.BytesIO()
    Image.fromarray(pixels).save(buf, "PNG")
    return buf.getvalue()


def _ttft(url: str, prompt: str, images: list[bytes]) -> tuple[float, str]:
    """Seconds until the first generated token (max_tokens 1: the request ends with it), and its text."""
    from .client import protocol

    inputs = protocol.grpc_inputs(prompt, images, sampling={"max_tokens": 1, "temperature": 0})
    start = time.perf_counter()
    pieces = []
    for result in protocol.stream_grpc_results(url, inputs):
        out = result.as_numpy("text_output")
        pieces += [] if out is None else [p.decode() for p in out.reshape(-1)]
    return time.perf_counter() - start, "".join(pieces)


def _metric_total(url: str, name: str) -> float:
    import re
    import urllib.request

    text = urllib.request.urlopen(url).read().decode()
    return sum(float(v) for v in re.findall(rf"^{name}{{[^}}]*}} (\S+)$", text, re.M))


def bench_cache(preset: str, repeats: int, context_words: int, seed: int = 0, checkpoint: Path | None = None,
                prefix_caching: bool = True) -> dict:
    from .preprocess import Preprocessor
    from .repository import BuildOptions, build_repository
    from .server import TritonServer

    with tempfile.TemporaryDirectory() as tmp:
        ckpt = checkpoint or write_checkpoint(preset, Path(tmp) / preset, seed, vision=BIG_VISION)
        pre = Preprocessor(ckpt)
        llm = {"num_kv_blocks": "2048", "enable_prefix_caching": str(int(prefix_caching))}
        repo = build_repository(ckpt, Path(tmp) / "repo", BuildOptions(llm=llm))
        server = TritonServer(repo, log_path=Path(tmp) / "server.log").start()
        try:
            times, prompt = _cache_runs(server.grpc_url, pre.geometry.vision.image_size, repeats, context_words, seed)
            time.sleep(0.3)  # llm publishes its counters at most every 100 ms
            totals = {name: _metric_total(server.metrics_url, f"triton_vlm_{name}_total")
                      for name in ("prefix_cache_queries", "prefix_cache_hits", "image_cache_hits", "image_cache_misses")}
        finally:
            server.stop()
    return {"preset": preset, "repeats": repeats, "prompt_tokens": len(pre.input_ids(prompt)),
            "image_tokens": pre.geometry.image_seq_len, "image_size": pre.geometry.vision.image_size,
            "ttft_ms": {k: statistics.median(v) * 1e3 for k, v in times.items()},
            "prefix_cache": {"queries": totals["prefix_cache_queries"], "hits": totals["prefix_cache_hits"]},
            "image_cache": {"hits": totals["image_cache_hits"], "misses": totals["image_cache_misses"]},
            "load_average": os.getloadavg()[0]}


def _question(context: str, question: str) -> str:
    return f"USER: <image>\n{context}\n{question}\nASSISTANT:"


def _cache_runs(url: str, size: int, repeats: int, context_words: int, seed: int) -> tuple[dict, str]:
    """TTFT samples per case, and the first cold prompt."""
    rng = random.Random(seed)
    image = lambda n: _image(seed * 1000 + n, size)  # noqa: E731  (each n a new picture)
    _ttft(url, _question(_words(rng, context_words), "Warm up?"), [image(999)])
    times: dict[str, list[float]] = {k: [] for k in ("cold", "same", "new_question", "turn1", "turn4")}
    first = None
    for r in range(repeats):
        context = _words(rng, context_words)
        prompt = _question(context, "What is in this picture?")
        first = first or prompt
        times["cold"].append(_ttft(url, prompt, [image(r)])[0])
        times["same"].append(_ttft(url, prompt, [image(r)])[0])
        times["new_question"].append(_ttft(url, _question(context, "And what is left of it?"), [image(r)])[0])
        turns = _chat(url, rng, [image(500 + 10 * r + 1), image(500 + 10 * r + 3)], context_words)
        times["turn1"].append(turns[0])
        times["turn4"].append(turns[3])
    return times, first


def _chat(url: str, rng: random.Random, images: list[bytes], context_words: int) -> list[float]:
    """A stateless client's 4-turn chat, each turn resending the whole conversation; images in turns 1 and 3.
    TTFT per turn."""
    chat, sent, times = "", [], []
    for turn in range(1, 5):
        if turn in (1, 3):
            sent.append(images[turn // 2])
        words = _words(rng, context_words if turn == 1 else 12)
        chat += ("USER: <image>\n" if turn in (1, 3) else "USER: ") + words + "\nASSISTANT:"
        t, answer = _ttft(url, chat, sent)
        chat += f"{answer}</s>\n"
        times.append(t)
    return times


def print_cache(result: dict) -> None:
    t = result["ttft_ms"]
    print(f"preset {result['preset']} decoder, {result['image_size']}-px images ({result['image_tokens']} image tokens); prompts of "
          f"{result['prompt_tokens']} tokens (image included), first token only; median of {result['repeats']}; "
          f"load average {result['load_average']:.1f}")
    print(f"{'request':<44} {'TTFT ms':>9} {'vs cold':>8}")
    rows = [("cold: new image, new prompt", "cold"), ("same image, same prompt (target <= 20%)", "same"),
            ("same image, new question", "new_question"), ("chat turn 1 (new image)", "turn1"),
            ("chat turn 4 (images in turns 1 and 3)", "turn4")]
    for label, key in rows:
        print(f"{label:<44} {t[key]:>9.1f} {t[key] / t['cold']:>7.0%}")
    print(f"chat turn 4 vs turn 1: {t['turn4'] / t['turn1']:.0%}")
    p, i = result["prefix_cache"], result["image_cache"]
    print(f"prefix cache: {p['hits']:.0f} of {p['queries']:.0f} prompt tokens hit ({p['hits'] / max(p['queries'], 1):.0%}); "
          f"image cache: {i['hits']:.0f} of {i['hits'] + i['misses']:.0f} images hit "
          f"({i['hits'] / max(i['hits'] + i['misses'], 1):.0%})")


def main(args) -> None:
    global BLOCK_SIZE
    BLOCK_SIZE = args.block_size
    if args.threads:
        torch.set_num_threads(args.threads)
    w = Workload(args.requests, args.min_prompt, args.max_prompt, args.max_tokens, args.seed)
    if args.what == "engine":
        result = bench_engine(args.preset, w, args.batches, args.steps, args.checkpoint)
        print_engine(result)
    elif args.what == "cache":
        result = bench_cache(args.preset, args.repeats, args.context_words, args.seed, args.checkpoint,
                             args.prefix_caching)
        print_cache(result)
    else:
        result = bench_roofline(args.preset, w, args.batches, args.steps, args.kv_budget_tokens, args.checkpoint)
        print_roofline(result)
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=2))
