"""What the engine reports after each step (IterationStats), and how a slow consumer's outputs merge (coalesce)."""
import threading

from triton_vlm.engine.config import EngineConfig
from triton_vlm.engine.llm_engine import LLMEngine, RequestOutput, coalesce
from triton_vlm.engine.sampling_params import SamplingParams
from triton_vlm.engine.stats import IterationStats


def test_iteration_stats_count_a_known_workload(tiny_checkpoint):
    # A pool of 6 blocks of 4 tokens cannot hold all three at once: one waits.
    engine = LLMEngine(str(tiny_checkpoint), EngineConfig(num_kv_blocks=6, block_size=4))
    total = IterationStats()
    states = []

    def on_step(state, iteration):
        states.append(state)
        total.merge(iteration)

    engine.on_step = on_step
    prompts = [[1, 20, 21, 22, 23], [1, 30, 31], [1, 40, 41, 42, 43, 44, 45]]
    params = [SamplingParams(max_tokens=6, temperature=0, ignore_eos=True),
              SamplingParams(max_tokens=4, temperature=0, ignore_eos=True),
              SamplingParams(max_tokens=3, temperature=0.8, ignore_eos=True, n=2, seed=1)]
    done = threading.Event()
    finished = []

    def on_output(out):
        if out.finished:
            finished.append(out)
            if len(finished) == 3:
                done.set()

    engine.start()
    try:
        for i, (prompt, p) in enumerate(zip(prompts, params)):
            engine.add(engine.make_sequence(f"r{i}", prompt, p), on_output)
        assert done.wait(60)
        engine.stop()
    finally:
        engine.stop()
    engine.check()
    generated = 6 + 4 + 2 * 3
    assert total.prompt_tokens == sum(map(len, prompts))
    assert total.generation_tokens == generated
    assert len(total.ttft_s) == 3 and all(t > 0 for t in total.ttft_s)
    assert len(total.itl_s) == generated - 4  # every token but each completion's first
    by_prompt = sorted(total.finished, key=lambda r: r.prompt_tokens)
    assert [(r.prompt_tokens, r.generation_tokens, r.n, r.finish_reason) for r in by_prompt] == [
        (3, 4, 1, "length"), (5, 6, 1, "length"), (7, 6, 2, "length")]
    for r in total.finished:
        assert 0 <= r.queue_s <= r.e2e_s
    assert max(s.num_waiting for s in states) >= 1 and states[-1].num_running == 0
    assert states[-1].kv_blocks_used == 0


def out(index, ids, text, finished=False, reason=None, logprobs=None, prompt_logprobs=None, cumulative=0.0):
    return RequestOutput("r", ids, finished, reason, None, index, text, logprobs, cumulative, prompt_logprobs)


def test_coalesce_merges_each_completion_and_keeps_the_final_output_last():
    outputs = [out(0, [5], "a", prompt_logprobs=[None]), out(1, [7], "x", cumulative=-1.0),
               out(0, [6], "b", cumulative=-2.0), out(1, [8], "y", reason="stop", cumulative=-3.0),
               out(0, [9], "c", finished=True, reason="length", cumulative=-4.0)]
    merged = coalesce(outputs)
    assert [(o.index, o.new_token_ids, o.text, o.finish_reason, o.finished, o.cumulative_logprob) for o in merged] == [
        (1, [7, 8], "xy", "stop", False, -3.0), (0, [5, 6, 9], "abc", "length", True, -4.0)]
    assert merged[1].prompt_logprobs == [None]
    assert merged[1].logprobs is None


def test_coalesce_joins_logprobs_and_leaves_single_outputs_alone():
    a = out(0, [5], "a", logprobs=[{5: (-0.1, 1, "a")}])
    b = out(0, [6], "b", logprobs=[{6: (-0.2, 1, "b")}])
    assert coalesce([a, b])[0].logprobs == [{5: (-0.1, 1, "a")}, {6: (-0.2, 1, "b")}]
    assert coalesce([a]) == [a]
