"""The model runner reorders a step (decodes first) but returns logits in batch order."""
from __future__ import annotations

import torch

from triton_vlm.engine.config import EngineConfig
from triton_vlm.engine.llm_engine import LLMEngine
from triton_vlm.engine.sampling_params import SamplingParams
from triton_vlm.engine.scheduler import Batch


def test_logits_come_back_in_batch_order_with_all_rows_after(tiny_checkpoint):
    engine = LLMEngine(str(tiny_checkpoint), EngineConfig(num_kv_blocks=32, block_size=4))
    params = SamplingParams(max_tokens=4, temperature=0)
    decoding = engine.make_sequence("d", [1, 20, 21, 22, 23], params)
    engine.scheduler.add(decoding)
    engine.runner.run(engine.scheduler.schedule())  # its prompt is in the cache now
    decoding.num_computed = decoding.num_tokens
    decoding.token_ids.append(30)  # one token to decode
    prefill = engine.make_sequence("p", [1, 40, 41, 42, 43, 44], params)
    engine.scheduler.add(prefill)
    batch = engine.scheduler.schedule()
    assert batch.seqs == [decoding, prefill] and batch.num_new_tokens == [1, 6]
    swapped = Batch([prefill, decoding], [6, 1])  # the prefill first in batch order
    logits = engine.runner.run(swapped, all_rows_of=frozenset({0}))
    assert logits.shape[0] == 2 + 6
    # Row 0 is the prefill's last token, row 1 the decode; then all six prefill rows, the last equal to row 0.
    torch.testing.assert_close(logits[7], logits[0])
    assert not torch.allclose(logits[0], logits[1])
    for seq in (decoding, prefill):
        engine.scheduler.finish(seq, "abort")
    engine.check()
