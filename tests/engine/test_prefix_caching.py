"""Prefix caching in the engine against transformers' LLaVA: hits where the KV is the same, none where an
image differs, outputs always equal to HF; the pool's invariants hold after every scenario."""
from collections import Counter

import torch

from helpers import PROMPTS, HFReference
from triton_vlm.engine.config import EngineConfig
from triton_vlm.engine.llm_engine import LLMEngine
from triton_vlm.engine.sampling_params import SamplingParams
from triton_vlm.export.vision import VisionEncoder

GREEDY = SamplingParams(max_tokens=8, temperature=0)


class Computed:
    """Counts the tokens the model computes per request (prefill chunks and decodes)."""

    def __init__(self, engine: LLMEngine):
        self.tokens: Counter = Counter()
        run = engine.runner.run

        def counted(batch, *args):
            for seq, n in zip(batch.seqs, batch.num_new_tokens):
                self.tokens[seq.request_id] += n
            return run(batch, *args)
        engine.runner.run = counted

    def prompt_tokens(self, request_id: str, num_generated: int) -> int:
        """Prompt tokens computed: every generated token but the last was computed by one decode."""
        return self.tokens[request_id] - max(num_generated - 1, 0)


def encode(ref: HFReference, encoder: VisionEncoder, prompt: str, images: list[bytes]):
    inputs = ref.inputs(prompt, images)
    embeds = None
    if images:
        with torch.no_grad():
            embeds = encoder(inputs["pixel_values"]).flatten(0, 1)
    return inputs["input_ids"][0].tolist(), embeds, inputs.get("pixel_values")


def run_one(engine: LLMEngine, ids, embeds, params=GREEDY, hashes=None, rows=None):
    rid = engine.new_request_id()
    outs = []
    engine.add(engine.make_sequence(rid, ids, params, embeds, hashes, rows), outs.append)
    while engine.has_work():
        engine.step()
    engine.check()
    return rid, [t for o in outs for t in o.new_token_ids]


def hf_ids(ref: HFReference, ids: list[int], pixel_values, max_new_tokens: int) -> list[int]:
    with torch.no_grad():
        out = ref.model.generate(input_ids=torch.tensor([ids]), pixel_values=pixel_values,
                                 attention_mask=torch.ones(1, len(ids), dtype=torch.long),
                                 max_new_tokens=max_new_tokens, do_sample=False)
    return out[0, len(ids):].tolist()


def test_same_text_with_another_image_does_not_hit_and_equals_hf(tiny_checkpoint, hf_tiny, photos):
    encoder = VisionEncoder.from_checkpoint(tiny_checkpoint)
    engine = LLMEngine(str(tiny_checkpoint), EngineConfig(num_kv_blocks=64, block_size=4))
    computed = Computed(engine)
    cat_ids, cat, _ = encode(hf_tiny, encoder, PROMPTS[1], [photos["chelsea"]])
    coffee_ids, coffee, _ = encode(hf_tiny, encoder, PROMPTS[1], [photos["coffee"]])
    assert cat_ids == coffee_ids  # the placeholders share one token id: only the image hash tells them apart
    first_image_block = cat_ids.index(engine.geometry.image_token_id) // 4
    results = {}
    for name, embeds in (("cat", cat), ("coffee", coffee), ("cat again", cat)):
        rid, out = run_one(engine, cat_ids, embeds)
        results[name] = out, computed.prompt_tokens(rid, len(out))
    expected = {"cat": hf_tiny.generate_ids(PROMPTS[1], [photos["chelsea"]], 8),
                "coffee": hf_tiny.generate_ids(PROMPTS[1], [photos["coffee"]], 8)}
    assert expected["cat"] != expected["coffee"]  # the images matter to this model
    assert results["cat"][0] == results["cat again"][0] == expected["cat"]
    assert results["coffee"][0] == expected["coffee"]
    assert results["cat"][1] == len(cat_ids)  # cold
    assert results["coffee"][1] == len(cat_ids) - first_image_block * 4  # only the blocks before the image hit
    assert results["cat again"][1] == len(cat_ids) - (len(cat_ids) - 1) // 4 * 4  # all but the last token's block
    stats = engine.stats()
    assert stats.prefix_cache_queries == 3 * len(cat_ids)
    assert stats.prefix_cache_hits == first_image_block * 4 + (len(cat_ids) - 1) // 4 * 4


def test_image_hashes_key_each_image_by_its_own_rows(tiny_checkpoint, hf_tiny, photos):
    """Two images in one prompt, hashed by the caller: swapping the second image keeps the hits up to it."""
    encoder = VisionEncoder.from_checkpoint(tiny_checkpoint)
    engine = LLMEngine(str(tiny_checkpoint), EngineConfig(num_kv_blocks=64, block_size=4))
    computed = Computed(engine)
    ids, both, _ = encode(hf_tiny, encoder, PROMPTS[2], [photos["chelsea"], photos["astronaut"]])
    _, other, _ = encode(hf_tiny, encoder, PROMPTS[2], [photos["chelsea"], photos["coffee"]])
    rows = [both.shape[0] // 2] * 2
    run_one(engine, ids, both, hashes=[b"cat", b"astronaut"], rows=rows)
    rid, out = run_one(engine, ids, other, hashes=[b"cat", b"coffee"], rows=rows)
    image = engine.geometry.image_token_id
    second_image_at = [i for i, t in enumerate(ids) if t == image][rows[0]]
    assert computed.prompt_tokens(rid, len(out)) == len(ids) - second_image_at // 4 * 4
    assert out == hf_tiny.generate_ids(PROMPTS[2], [photos["chelsea"], photos["coffee"]], 8)


def test_four_turn_chat_computes_only_each_turns_new_tokens(tiny_checkpoint, hf_tiny, photos):
    """A stateless client resends the whole chat each turn (images in turns 1 and 3)."""
    encoder = VisionEncoder.from_checkpoint(tiny_checkpoint)
    bs = 4
    engine = LLMEngine(str(tiny_checkpoint), EngineConfig(num_kv_blocks=128, block_size=bs))
    computed = Computed(engine)
    turns = [("USER: <image>\nWhat is this?\nASSISTANT:", photos["chelsea"]), ("\nUSER: Tell me more.\nASSISTANT:", None),
             ("\nUSER: <image>\nAnd this one?\nASSISTANT:", photos["coffee"]), ("\nUSER: Compare them.\nASSISTANT:", None)]
    ids, embeds, pixels, images = [], [], [], []
    for n, (text, image) in enumerate(turns):
        new_ids, new_embeds, new_pixels = encode(hf_tiny, encoder, text, [image] if image else [])
        new_ids = new_ids[1:] if n else new_ids  # the BOS opens the chat only
        ids = ids + new_ids
        if image:
            embeds.append(new_embeds)
            pixels.append(new_pixels)
        rid, out = run_one(engine, ids, torch.cat(embeds), rows=[e.shape[0] for e in embeds],
                           hashes=[str(i).encode() for i in range(len(embeds))])
        assert out == hf_ids(hf_tiny, ids, torch.cat(pixels), GREEDY.max_tokens), f"turn {n + 1}"
        prompt_computed = computed.prompt_tokens(rid, len(out))
        if n == 0:
            assert prompt_computed == len(ids)
        else:
            # Its new tokens, the previous answer's last token (sampled, never computed), and what shares
            # the partial block where the cached prefix ends.
            assert len(new_ids) <= prompt_computed <= len(new_ids) + 1 + bs - 1, f"turn {n + 1}"
        ids = ids + out


def test_hits_under_preemption_and_chunked_prefill_equal_hf(tiny_checkpoint, hf_tiny, photos):
    encoder = VisionEncoder.from_checkpoint(tiny_checkpoint)
    cases = [(PROMPTS[1], [photos["chelsea"]]), (PROMPTS[1], [photos["coffee"]]), (PROMPTS[0], [])] * 2
    prepared = [encode(hf_tiny, encoder, p, imgs)[:2] for p, imgs in cases]
    # 20 blocks of 4 tokens cannot hold six sequences at once, and a 7-token budget splits every prompt.
    engine = LLMEngine(str(tiny_checkpoint), EngineConfig(num_kv_blocks=20, block_size=4, max_num_batched_tokens=7))
    params = SamplingParams(max_tokens=16, temperature=0)
    outs = engine.generate([ids for ids, _ in prepared], params, [e for _, e in prepared])
    engine.check()
    assert engine.scheduler.num_preemptions > 0 and engine.stats().prefix_cache_hits > 0
    expected = [hf_tiny.generate_ids(p, imgs, 16) for p, imgs in cases]
    assert outs == expected


def test_n_completions_of_a_cached_prompt(tiny_checkpoint):
    engine = LLMEngine(str(tiny_checkpoint), EngineConfig(num_kv_blocks=64, block_size=4))
    prompt = [1] + list(range(30, 45))
    params = SamplingParams(n=3, max_tokens=6, temperature=1.0, seed=5, ignore_eos=True)
    first = engine.generate_outputs([prompt], params)
    second = engine.generate_outputs([prompt], params)  # the prompt's blocks come from the cache now
    tokens = lambda outs, i: [t for o in outs for t in o.new_token_ids if o.index == i]  # noqa: E731
    (a,), (b,) = first.values(), second.values()
    assert [tokens(a, i) for i in range(3)] == [tokens(b, i) for i in range(3)]
    assert engine.stats().prefix_cache_hits == (len(prompt) - 1) // 4 * 4
    engine.check()
    assert engine.pool.num_free == engine.pool.num_blocks


def test_caching_off_computes_everything(tiny_checkpoint):
    engine = LLMEngine(str(tiny_checkpoint), EngineConfig(num_kv_blocks=64, block_size=4, enable_prefix_caching=0))
    computed = Computed(engine)
    prompt = [1] + list(range(30, 45))
    rid_a, a = run_one(engine, prompt, None)
    rid_b, b = run_one(engine, prompt, None)
    assert a == b and computed.tokens[rid_a] == computed.tokens[rid_b]
    assert engine.pool.num_cached == 0 and engine.stats().prefix_cache_queries == 0
