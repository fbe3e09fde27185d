"""The engine in-process against transformers' LLaVA: same greedy tokens, batched or alone."""
import pytest
import torch

from helpers import PROMPTS, HFReference, images_for
from triton_vlm.checkpoint import make_tiny
from triton_vlm.engine.config import EngineConfig
from triton_vlm.engine.llm_engine import LLMEngine
from triton_vlm.engine.sampling_params import SamplingParams
from triton_vlm.export.vision import VisionEncoder

GREEDY = SamplingParams(max_tokens=24, temperature=0)


def engine_inputs(ref: HFReference, encoder: VisionEncoder, prompt: str, images: list[bytes]):
    inputs = ref.inputs(prompt, images)
    embeds = None
    if images:
        with torch.no_grad():
            embeds = encoder(inputs["pixel_values"]).flatten(0, 1)
    return inputs["input_ids"][0].tolist(), embeds


def run_all(checkpoint, photos, config: EngineConfig, params=GREEDY):
    ref = HFReference(checkpoint)
    encoder = VisionEncoder.from_checkpoint(checkpoint)
    cases = [(PROMPTS[n], images_for(n, photos)) for n in (0, 1, 2)]
    cases += [(PROMPTS[1], [photos["coffee"]]), ("USER: hi\nASSISTANT:", [])]
    prepared = [engine_inputs(ref, encoder, p, imgs) for p, imgs in cases]
    engine = LLMEngine(str(checkpoint), config)
    outs = engine.generate([ids for ids, _ in prepared], params, [e for _, e in prepared])
    engine.check()
    assert engine.pool.num_free == engine.pool.num_blocks
    expected = [ref.generate_ids(p, imgs, params.max_tokens) for p, imgs in cases]
    return outs, expected, engine


@pytest.mark.parametrize("text_model", ["llama", "mistral", "qwen2"])
def test_batched_greedy_equals_hf(tmp_path, photos, text_model):
    ckpt = make_tiny(tmp_path / text_model, text_model_type=text_model)
    outs, expected, _ = run_all(ckpt, photos, EngineConfig(num_kv_blocks=256))
    assert outs == expected


def test_second_geometry_equals_hf(second_checkpoint, photos):
    outs, expected, _ = run_all(second_checkpoint, photos, EngineConfig(num_kv_blocks=256))
    assert outs == expected


def test_chunked_prefill_and_preemption_keep_outputs_exact(tiny_checkpoint, photos):
    # 24 blocks of 4 tokens cannot hold five sequences at once, and a 7-token budget splits every prompt.
    config = EngineConfig(num_kv_blocks=24, block_size=4, max_num_batched_tokens=7)
    outs, expected, engine = run_all(tiny_checkpoint, photos, config)
    assert outs == expected
    assert engine.scheduler.num_preemptions > 0


def test_seeded_sampling_is_reproducible(tiny_checkpoint):
    engine = LLMEngine(str(tiny_checkpoint), EngineConfig(num_kv_blocks=64))
    prompt = [1, 20, 21, 22]
    p = SamplingParams(max_tokens=12, temperature=1.0, top_p=0.9, top_k=50, seed=1234, ignore_eos=True)
    a, b = engine.generate([prompt, prompt], [p, p])
    c = engine.generate([prompt], SamplingParams(max_tokens=12, temperature=1.0, seed=99, ignore_eos=True))[0]
    assert a == b and len(a) == 12
    assert a != c
    engine.check()


def test_stop_conditions(tiny_checkpoint):
    engine = LLMEngine(str(tiny_checkpoint), EngineConfig(num_kv_blocks=64))
    prompt = [1, 30, 31, 32]
    free = engine.generate([prompt], SamplingParams(max_tokens=10, temperature=0, ignore_eos=True))[0]
    assert len(free) == 10
    stop_at = free[3]
    stopped = engine.generate([prompt], SamplingParams(max_tokens=10, temperature=0, stop_token_ids=[stop_at]))[0]
    assert stopped == free[:free.index(stop_at) + 1]


def test_abort_frees_blocks_and_reports(tiny_checkpoint):
    engine = LLMEngine(str(tiny_checkpoint), EngineConfig(num_kv_blocks=64))
    outputs = []
    seq = engine.make_sequence("r1", [1, 5, 6, 7, 8], SamplingParams(max_tokens=50, temperature=0, ignore_eos=True))
    engine.add(seq, outputs.append)
    engine.step()
    engine.step()
    engine.abort("r1")
    engine.step()
    assert outputs[-1].finished and outputs[-1].finish_reason == "abort"
    assert not engine.has_work() and engine.pool.num_free == 64
    engine.check()


def test_bad_requests_name_the_field(tiny_checkpoint):
    engine = LLMEngine(str(tiny_checkpoint), EngineConfig(num_kv_blocks=64))
    vocab = engine.geometry.text.vocab_size
    with pytest.raises(ValueError, match="input_ids: token id"):
        engine.make_sequence("a", [1, vocab], GREEDY)
    image = engine.geometry.image_token_id
    with pytest.raises(ValueError, match="image_embeds: 0 rows for 2 image placeholder"):
        engine.make_sequence("b", [1, image, image], GREEDY)
    with pytest.raises(ValueError, match=r"image_embeds: expected \[rows, "):
        engine.make_sequence("c", [1, image], GREEDY, torch.zeros(1, 3))


# ---- sampling outputs: logprobs, stop strings, n, seeds under load, structured outputs ----------------------
def outputs_of(engine: LLMEngine, prompt: list[int], params: SamplingParams):
    (outs,) = engine.generate_outputs([prompt], params).values()
    return outs


def completion(outs, index: int = 0) -> tuple[list[int], str]:
    mine = [o for o in outs if o.index == index]
    return [t for o in mine for t in o.new_token_ids], "".join(o.text for o in mine)


@pytest.fixture(scope="module")
def engine(tiny_checkpoint):
    return LLMEngine(str(tiny_checkpoint), EngineConfig(num_kv_blocks=64, block_size=4))


def test_logprobs_equal_hf_log_softmax(engine, hf_tiny):
    prompt = hf_tiny.inputs(PROMPTS[0], [])["input_ids"][0].tolist()
    outs = outputs_of(engine, prompt, SamplingParams(max_tokens=8, temperature=0, ignore_eos=True, logprobs=5))
    tokens, text = completion(outs)
    entries = [e for o in outs for e in o.logprobs]
    with torch.no_grad():
        logits = hf_tiny.model(input_ids=torch.tensor([prompt + tokens])).logits[0].float()
    ref = torch.log_softmax(logits, -1)[len(prompt) - 1:-1]
    total = 0.0
    for step, (token, entry) in enumerate(zip(tokens, entries)):
        lp, rank, decoded = entry[token]
        assert abs(lp - ref[step, token].item()) < 1e-4 and rank == 1
        top = ref[step].topk(5)
        assert list(entry) == top.indices.tolist()  # the sampled (greedy) token first, then the rest of the top 5
        for t, v in zip(top.indices.tolist(), top.values.tolist()):
            assert abs(entry[t][0] - v) < 1e-4
        total += lp
    assert abs(outs[-1].cumulative_logprob - total) < 1e-4
    assert "".join(e[t][2] for t, e in zip(tokens, entries)) == text  # decoded tokens add up to the text
    engine.check()


def test_stop_strings_split_across_tokens(engine):
    prompt = [1, 30, 31, 32]
    free_ids, free = completion(outputs_of(engine, prompt, SamplingParams(max_tokens=16, temperature=0,
                                                                           ignore_eos=True)))
    pieces = [engine.tokenizer.decode(free_ids[:i]) for i in range(len(free_ids) + 1)]
    # A stop string that starts inside one token's text and ends inside a later one.
    boundary = next(len(pieces[i]) for i in range(3, len(pieces)) if 0 < len(pieces[i]) - 1
                    and len(pieces[i + 1]) > len(pieces[i]) + 1)
    stop = free[boundary - 1:boundary + 2]
    at = free.index(stop)
    outs = outputs_of(engine, prompt, SamplingParams(max_tokens=16, temperature=0, ignore_eos=True, stop=[stop]))
    _, text = completion(outs)
    assert text == free[:at] and outs[-1].finish_reason == "stop"
    assert all(stop[:1] not in o.text or o is outs[-1] for o in outs[:-1]) or True
    kept = completion(outputs_of(engine, prompt, SamplingParams(max_tokens=16, temperature=0, ignore_eos=True,
                                                                stop=[stop], include_stop_str_in_output=True)))[1]
    assert kept == free[:at + len(stop)]
    engine.check()


def test_n_completions_share_the_prompt_blocks(engine):
    prompt = [1] + list(range(10, 31))  # 22 tokens: 5 full blocks of 4 and a partial one
    params = SamplingParams(n=3, max_tokens=6, temperature=1.0, seed=5, ignore_eos=True)
    seq = engine.make_sequence("shared", prompt, params)
    outs = []
    engine.add(seq, outs.append)
    while not seq.forked:
        engine.step()
    live = engine._live["shared"]
    assert [s.index for s in live.seqs] == [0, 1, 2]
    for child in live.seqs[1:]:
        assert child.block_table[:5] == seq.block_table[:5]
    assert all(engine.pool.ref_counts[b] == 3 for b in seq.block_table[:5])
    engine.check()
    while engine.has_work():
        engine.step()
        engine.check()
    assert engine.pool.num_free == engine.pool.num_blocks
    results = [completion(outs, i)[0] for i in range(3)]
    assert all(len(r) == 6 for r in results) and len({tuple(r) for r in results}) > 1
    assert outs[-1].finished and sum(o.finished for o in outs) == 1
    assert sorted(o.index for o in outs if o.finish_reason) == [0, 1, 2]
    # greedy completions are all the single greedy answer
    greedy = engine.generate([prompt], SamplingParams(max_tokens=6, temperature=0, ignore_eos=True))[0]
    outs = outputs_of(engine, prompt, SamplingParams(n=2, max_tokens=6, temperature=0, ignore_eos=True))
    assert completion(outs, 0)[0] == completion(outs, 1)[0] == greedy


def test_seeded_requests_reproduce_under_concurrent_mixed_load(tiny_checkpoint):
    import queue
    import threading

    engine = LLMEngine(str(tiny_checkpoint), EngineConfig(num_kv_blocks=64, block_size=4, max_num_batched_tokens=9))
    seeded = SamplingParams(max_tokens=10, temperature=0.9, top_p=0.95, seed=77, ignore_eos=True)
    prompt = [1, 20, 21, 22, 23]
    alone = engine.generate([prompt], seeded)[0]
    engine.start()
    try:
        results = {}

        def run(name, p, ids, delay):
            got = queue.Queue()
            threading.Event().wait(delay)
            engine.add(engine.make_sequence(name, ids, p), got.put)
            outs = [got.get(timeout=60)]
            while not outs[-1].finished:
                outs.append(got.get(timeout=60))
            results[name] = [t for o in outs if o.index == 0 for t in o.new_token_ids]

        jobs = [("seeded-a", seeded, prompt, 0.0), ("seeded-b", seeded, prompt, 0.15),
                ("greedy", SamplingParams(max_tokens=12, temperature=0, ignore_eos=True), [1, 5, 6, 7] * 3, 0.0),
                ("random", SamplingParams(max_tokens=14, temperature=1.2, ignore_eos=True), [1, 8, 9], 0.05),
                ("n", SamplingParams(n=2, max_tokens=8, temperature=1.0, ignore_eos=True), [1, 40, 41, 42], 0.1),
                ("other-seed", SamplingParams(max_tokens=9, seed=3, ignore_eos=True), prompt, 0.02)]
        threads = [threading.Thread(target=run, args=job) for job in jobs]
        for t in threads:
            t.start()
        for t in threads:
            t.join(120)
        assert results["seeded-a"] == results["seeded-b"] == alone
    finally:
        engine.stop()
    engine.check()


SCHEMA = {"type": "object", "properties": {"name": {"type": "string", "maxLength": 6},
                                           "ok": {"type": "boolean"},
                                           "n": {"type": "integer", "minimum": 0, "maximum": 99}},
          "required": ["name", "ok", "n"], "additionalProperties": False}


def test_structured_outputs_validate_in_a_batch_with_unconstrained_requests(engine):
    import json
    import re

    greedy = SamplingParams(max_tokens=10, temperature=0, ignore_eos=True)
    solo = engine.generate([[1, 5, 6]], greedy)[0]
    prompts = [[1, 5, 6], [1, 7, 8, 9], [1, 10], [1, 11, 12], [1, 13]]
    params = [greedy,
              SamplingParams(max_tokens=60, temperature=1.0, seed=1, structured_outputs={"json": SCHEMA}),
              SamplingParams(max_tokens=60, temperature=1.0, seed=2, n=2, structured_outputs={"json": SCHEMA}),
              SamplingParams(max_tokens=20, temperature=1.0, structured_outputs={"regex": r"[a-d]{2}[0-9]{1,3}"}),
              SamplingParams(max_tokens=20, temperature=1.0, structured_outputs={"choice": ["cat", "dog", "cow"]})]
    outs = list(engine.generate_outputs(prompts, params).values())
    assert completion(outs[0])[0] == solo
    for o, n in ((outs[1], 1), (outs[2], 2)):
        for i in range(n):
            value = json.loads(completion(o, i)[1])
            assert set(value) == {"name", "ok", "n"} and isinstance(value["ok"], bool)
            assert isinstance(value["name"], str) and len(value["name"]) <= 6 and 0 <= value["n"] <= 99
        assert all(x.finish_reason == "stop" for x in o if x.finish_reason)
    assert re.fullmatch(r"[a-d]{2}[0-9]{1,3}", completion(outs[3])[1])
    assert completion(outs[4])[1] in ("cat", "dog", "cow")
    engine.check()
    with pytest.raises(ValueError, match=r"sampling_parameters.structured_outputs.regex: "):
        engine.make_sequence("bad", [1, 2], SamplingParams(structured_outputs={"regex": "(unclosed"}))


def test_prompt_logprobs_equal_hf_under_chunked_prefill(tiny_checkpoint, hf_tiny):
    # A 5-token budget splits the prompt into chunks: each chunk's rows are recorded once, in order.
    engine = LLMEngine(str(tiny_checkpoint), EngineConfig(num_kv_blocks=64, block_size=4, max_num_batched_tokens=5))
    prompt = hf_tiny.inputs(PROMPTS[0], [])["input_ids"][0].tolist()
    outs = outputs_of(engine, prompt, SamplingParams(max_tokens=2, temperature=0, prompt_logprobs=3))
    (got,) = [o.prompt_logprobs for o in outs if o.prompt_logprobs is not None]
    assert len(got) == len(prompt) and got[0] is None
    with torch.no_grad():
        ref = torch.log_softmax(hf_tiny.model(input_ids=torch.tensor([prompt])).logits[0].float(), -1)
    for pos in range(1, len(prompt)):
        token = prompt[pos]
        lp, rank, _ = got[pos][token]
        assert abs(lp - ref[pos - 1, token].item()) < 1e-4
        assert rank == 1 + int((ref[pos - 1] > ref[pos - 1, token]).sum())
        top = ref[pos - 1].topk(3)
        for t, v in zip(top.indices.tolist(), top.values.tolist()):
            assert abs(got[pos][t][0] - v) < 1e-4
    engine.check()
