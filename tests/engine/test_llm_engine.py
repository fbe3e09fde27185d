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
