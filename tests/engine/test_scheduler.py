import pytest

from triton_vlm.engine.block_pool import BlockPool
from triton_vlm.engine.sampling_params import SamplingParams
from triton_vlm.engine.scheduler import Scheduler, SchedulerConfig
from triton_vlm.engine.sequence import Sequence, Status


def make(num_blocks=8, block_size=4, budget=64, max_seqs=8, max_len=1024, caching=True):
    pool = BlockPool(num_blocks)
    return Scheduler(SchedulerConfig(block_size, max_seqs, budget, max_len, caching), pool), pool


def seq(name, n, first=1):
    return Sequence(name, list(range(first, first + n)), SamplingParams(max_tokens=100))


def run_step(sched, token=7):
    """What the engine does after the model ran: mark computed, append a token when a sequence caught up."""
    batch = sched.schedule()
    for s, n in zip(batch.seqs, batch.num_new_tokens):
        s.num_computed += n
        sched.cache_computed(s)
        if s.num_computed == s.num_tokens:
            s.token_ids.append(token)
    sched.pool.check(sched.block_tables())
    return batch


def test_prefill_then_decode_one_token_each():
    sched, pool = make()
    a, b = seq("a", 5), seq("b", 3)
    sched.add(a)
    sched.add(b)
    batch = run_step(sched)
    assert [s.request_id for s in batch.seqs] == ["a", "b"] and batch.num_new_tokens == [5, 3]
    assert len(a.block_table) == 2 and len(b.block_table) == 1
    batch = run_step(sched)
    assert batch.num_new_tokens == [1, 1]
    sched.finish(a, "stop")
    sched.finish(b, "stop")
    pool.check([])
    assert pool.num_free == 8 and len(sched) == 0


def test_token_budget_chunks_a_long_prefill():
    sched, pool = make(num_blocks=16, budget=6)
    long = seq("long", 14)
    sched.add(long)
    assert run_step(sched).num_new_tokens == [6]
    assert run_step(sched).num_new_tokens == [6]
    assert run_step(sched).num_new_tokens == [2]  # last chunk, then a token is sampled
    assert long.num_tokens == 15 and long.num_computed == 14
    assert run_step(sched).num_new_tokens == [1]


def test_running_decodes_go_before_new_prefills():
    sched, _ = make(num_blocks=16, budget=4)
    a = seq("a", 3)
    sched.add(a)
    run_step(sched)
    sched.add(seq("b", 8))
    batch = run_step(sched)
    assert [s.request_id for s in batch.seqs] == ["a", "b"] and batch.num_new_tokens == [1, 3]


def test_max_num_seqs_caps_the_running_set():
    sched, _ = make(max_seqs=2)
    for name in "abc":
        sched.add(seq(name, 2))
    batch = run_step(sched)
    assert [s.request_id for s in batch.seqs] == ["a", "b"] and [s.request_id for s in sched.waiting] == ["c"]


def test_out_of_blocks_preempts_the_newest_and_recomputes_it_later():
    sched, pool = make(num_blocks=4, block_size=4, caching=False)
    a, b = seq("a", 4), seq("b", 4)
    sched.add(a)
    sched.add(b)
    run_step(sched)  # both prefilled: 2 blocks used, each sequence now holds 5 tokens
    batch = run_step(sched)  # each needs a second block: 4 used
    assert batch.num_new_tokens == [1, 1] and pool.num_free == 0
    for _ in range(3):
        run_step(sched)  # fill both second blocks
    batch = run_step(sched)  # 'a' needs a third block: 'b' (newest) is preempted
    assert [s.request_id for s in batch.seqs] == ["a"]
    assert b.status is Status.WAITING and b.num_computed == 0 and b.block_table == []
    assert sched.num_preemptions == 1
    sched.finish(a, "stop")
    batch = run_step(sched)  # 'b' comes back and recomputes all its tokens at once
    assert [s.request_id for s in batch.seqs] == ["b"] and batch.num_new_tokens == [9]
    sched.finish(b, "stop")
    pool.check([])
    assert pool.num_free == 4


def test_a_lone_sequence_that_fills_the_pool_preempts_itself_not_others():
    sched, pool = make(num_blocks=2, block_size=4)
    a = seq("a", 7)
    sched.add(a)
    run_step(sched)
    assert sched.max_seq_len == 8 and a.num_tokens == 8
    batch = run_step(sched)  # fits exactly in two blocks
    assert batch.num_new_tokens == [1]
    pool.check(sched.block_tables())


def test_prompts_that_can_never_fit_are_refused_up_front():
    sched, _ = make(num_blocks=2, block_size=4, max_len=1024)
    with pytest.raises(ValueError, match="input_ids: prompt has 8 tokens"):
        sched.add(seq("big", 8))
    sched2, _ = make(num_blocks=100, max_len=10)
    with pytest.raises(ValueError, match="max_model_len 10"):
        sched2.add(seq("big", 10))


def test_finish_of_waiting_and_running_sequences_frees_everything():
    sched, pool = make(max_seqs=1)
    a, b = seq("a", 5), seq("b", 5)
    sched.add(a)
    sched.add(b)
    run_step(sched)
    sched.finish(b, "abort")  # still waiting
    sched.finish(a, "abort")  # running
    sched.finish(a, "abort")  # idempotent
    pool.check([])
    assert pool.num_free == 8 and len(sched) == 0


# ---- prefix caching ---------------------------------------------------------------------------------------
def test_admission_reuses_the_longest_cached_prefix_of_whole_blocks():
    sched, pool = make(num_blocks=16)
    a = seq("a", 10)
    sched.add(a)
    run_step(sched)
    sched.finish(a, "stop")
    b = Sequence("b", list(range(1, 9)) + [50, 51, 52], SamplingParams(max_tokens=100))  # shares 2 blocks
    sched.add(b)
    assert run_step(sched).num_new_tokens == [3]
    assert b.num_cached_tokens == 8 and b.block_hashes[:2] == a.block_hashes[:2]
    assert (sched.prefix_queries, sched.prefix_hits) == (10 + 11, 8)
    sched.finish(b, "stop")
    pool.check([])


def test_a_fully_cached_prompt_still_computes_its_last_token():
    sched, pool = make(num_blocks=16)
    a = seq("a", 8)
    sched.add(a)
    run_step(sched)
    b = seq("b", 8)  # the same 8 tokens: 2 full blocks cached, but the last token's logits are needed
    sched.add(b)
    batch = run_step(sched)
    assert batch.num_new_tokens == [1, 4] and b.num_cached_tokens == 4
    assert b.block_table[0] == a.block_table[0] and pool.ref_counts[a.block_table[0]] == 2
    sched.finish(a, "stop")
    sched.finish(b, "stop")
    pool.check([])


def test_different_tokens_or_caching_off_never_hit():
    for caching, first in ((True, 2), (False, 1)):
        sched, pool = make(num_blocks=16, caching=caching)
        a = seq("a", 9)
        sched.add(a)
        run_step(sched)
        b = seq("b", 9, first=first)
        sched.add(b)
        assert run_step(sched).num_new_tokens == [1, 9] and b.num_cached_tokens == 0
        assert sched.prefix_hits == 0 and pool.num_cached == (4 if caching else 0)


def test_a_preempted_sequence_finds_its_own_blocks_again():
    sched, pool = make(num_blocks=4, block_size=4)
    a, b = seq("a", 4), seq("b", 4, first=20)
    sched.add(a)
    sched.add(b)
    for _ in range(5):
        run_step(sched)  # both hold two full, cached blocks and one token more
    b_blocks = list(b.block_table)
    batch = run_step(sched)  # 'a' needs a third block: 'b' is preempted, its blocks freed cached
    assert [s.request_id for s in batch.seqs] == ["a"] and b.status is Status.WAITING
    assert len(b.block_hashes) == 2  # hashes outlive preemption
    # 'a' took the least recently used cached block: b's tail, freed first; its head survives.
    assert a.block_table[2] == b_blocks[1] and pool.lookup(b.block_hashes) == b_blocks[:1]
    sched.finish(a, "stop")
    batch = run_step(sched)
    assert [s.request_id for s in batch.seqs] == ["b"] and batch.num_new_tokens == [9 - 4]
    assert b.block_table[0] == b_blocks[0]
    sched.finish(b, "stop")
    pool.check([])
