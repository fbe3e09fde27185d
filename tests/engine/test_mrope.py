"""M-RoPE through the engine: greedy outputs equal HF generate for Qwen2-VL and Qwen2.5-VL with 0, 1 and 2
images of different sizes (portrait and landscape), also under chunked prefill, preemption and n > 1."""
from __future__ import annotations

import pytest
import torch
from helpers import QWEN_PROMPTS, rng_pil

from triton_vlm.engine.config import EngineConfig
from triton_vlm.engine.llm_engine import LLMEngine
from triton_vlm.engine.sampling_params import SamplingParams
from triton_vlm.families import qwen2_vl

IMAGES = [rng_pil(0, 90, 40), rng_pil(1, 50, 120)]
MAX_TOKENS = 24


def engine_inputs(hf, geometry, prompt: str, images: list):
    """input_ids and image rows from HF's processor and tower; positions from our family module."""
    inputs = hf.inputs(prompt, images)
    ids = inputs["input_ids"][0].tolist()
    if not images:
        return ids, None, None
    grids = inputs["image_grid_thw"].tolist()
    counts = [t * h * w // geometry.vision.merge_size ** 2 for t, h, w in grids]
    starts = qwen2_vl.span_starts(ids, (geometry.image_token_id,), counts)
    positions = qwen2_vl.positions(ids, [(s, tuple(g), 1) for s, g in zip(starts, grids)], geometry.vision.merge_size)
    return ids, hf.image_embeds(inputs), torch.tensor(positions)


@pytest.mark.parametrize("config", [
    dict(num_kv_blocks=128, block_size=16),
    dict(num_kv_blocks=128, block_size=8, max_num_batched_tokens=16),  # chunked prefill
    dict(num_kv_blocks=22, block_size=8, max_num_batched_tokens=32),  # preemption (164 tokens fit in 22 x 8)
], ids=["plain", "chunked", "preempted"])
def test_greedy_equals_hf(qwen_checkpoint, hf_qwen, config):
    engine = LLMEngine(str(qwen_checkpoint), EngineConfig(**config))
    cases = [(QWEN_PROMPTS[n], IMAGES[:n]) for n in (0, 1, 2)] + [(QWEN_PROMPTS[1], IMAGES[1:])]
    inputs = [engine_inputs(hf_qwen, engine.geometry, p, imgs) for p, imgs in cases]
    params = SamplingParams(max_tokens=MAX_TOKENS, temperature=0)
    got = engine.generate([i[0] for i in inputs], params, [i[1] for i in inputs], [i[2] for i in inputs])
    expected = [hf_qwen.generate_ids(p, imgs, MAX_TOKENS) for p, imgs in cases]
    assert got == expected
    if "max_num_batched_tokens" in config and config["num_kv_blocks"] < 64:
        assert engine.scheduler.num_preemptions > 0
    engine.check()
    assert engine.pool.num_free == engine.pool.num_blocks


def test_n_completions_share_the_prompts_positions(qwen_checkpoint, hf_qwen):
    """n = 3 greedy completions each equal HF's output: the forked ones carry the prompt's positions too."""
    engine = LLMEngine(str(qwen_checkpoint), EngineConfig(num_kv_blocks=128, block_size=8))
    ids, embeds, positions = engine_inputs(hf_qwen, engine.geometry, QWEN_PROMPTS[2], IMAGES)
    outs = engine.generate_outputs([ids], SamplingParams(n=3, max_tokens=MAX_TOKENS, temperature=0), [embeds],
                                   [positions])
    (outputs,) = outs.values()
    per_index = [[t for o in outputs if o.index == i for t in o.new_token_ids] for i in range(3)]
    expected = hf_qwen.generate_ids(QWEN_PROMPTS[2], IMAGES, MAX_TOKENS)
    assert per_index == [expected] * 3
    engine.check()


def test_positions_of_the_wrong_shape_are_refused_by_name(qwen_checkpoint):
    engine = LLMEngine(str(qwen_checkpoint), EngineConfig(num_kv_blocks=16, block_size=8))
    with pytest.raises(ValueError, match=r"^position_ids: expected \[3, 4\]"):
        engine.make_sequence("r", [1, 2, 3, 4], SamplingParams(), positions=torch.zeros(1, 4, dtype=torch.long))


def test_positions_for_a_model_without_mrope_are_refused(tiny_checkpoint):
    engine = LLMEngine(str(tiny_checkpoint), EngineConfig(num_kv_blocks=16, block_size=8))
    with pytest.raises(ValueError, match=r"^position_ids: this model takes none"):
        engine.make_sequence("r", [1, 2, 3], SamplingParams(), positions=torch.zeros(1, 3, dtype=torch.long))


def test_prefix_cache_hits_keep_positions_and_tell_images_apart(qwen_checkpoint, hf_qwen):
    """A repeated prompt with its image reuses cached blocks (positions continue from the cached prefix); the
    same text with another image of another size must not hit past the text before the image."""
    engine = LLMEngine(str(qwen_checkpoint), EngineConfig(num_kv_blocks=128, block_size=8))
    params = SamplingParams(max_tokens=MAX_TOKENS, temperature=0)
    expected = {i: hf_qwen.generate_ids(QWEN_PROMPTS[1], [IMAGES[i]], MAX_TOKENS) for i in (0, 1)}
    for i, hit in ((0, False), (0, True), (1, False)):
        ids, embeds, positions = engine_inputs(hf_qwen, engine.geometry, QWEN_PROMPTS[1], [IMAGES[i]])
        before = engine.scheduler.prefix_hits
        assert engine.generate([ids], params, [embeds], [positions]) == [expected[i]]
        gained = engine.scheduler.prefix_hits - before
        first_image = ids.index(engine.geometry.image_token_id)
        if hit:  # every whole block but the one holding the last prompt token
            assert gained == (len(ids) - 1) // 8 * 8
        else:  # at most the blocks before the image
            assert gained <= first_image // 8 * 8
        engine.check()
