"""One bad request, a broken consumer, a failed step, even a dead loop: nobody else is hurt, nobody waits forever."""
import queue
import threading

import pytest

from triton_vlm.engine import sampler
from triton_vlm.engine.config import EngineConfig
from triton_vlm.engine.llm_engine import EngineBusy, EngineDead, LLMEngine, RequestOutput
from triton_vlm.engine.sampling_params import SamplingParams
from triton_vlm.engine.sequence import Sequence

TIMEOUT = 30  # seconds; a regression fails here instead of hanging
PROMPTS = {"a": [1, 5, 6, 7, 8], "b": [1, 20, 21, 22], "c": [1, 30, 31, 32, 33, 34]}
GREEDY = SamplingParams(max_tokens=8, temperature=0, ignore_eos=True)
LONG = SamplingParams(max_tokens=60, temperature=0, ignore_eos=True)


@pytest.fixture
def make_engine(tiny_checkpoint):
    engines = []

    def make(**config) -> LLMEngine:
        engines.append(LLMEngine(str(tiny_checkpoint), EngineConfig(**{"num_kv_blocks": 64, **config})))
        return engines[-1]

    yield make
    for engine in engines:
        engine.stop()


@pytest.fixture(scope="module")
def solo(tiny_checkpoint) -> dict[str, list[int]]:
    """Each good prompt's greedy output, generated alone."""
    engine = LLMEngine(str(tiny_checkpoint), EngineConfig(num_kv_blocks=64))
    return {name: engine.generate([prompt], GREEDY)[0] for name, prompt in PROMPTS.items()}


def submit(engine: LLMEngine, rid: str, params: SamplingParams = GREEDY, prompt: list[int] | None = None,
           on_output=None) -> queue.Queue:
    """Add a request; its Sequence is built directly, so params bypass validation as a buggy caller's would."""
    got = queue.Queue()
    seq = Sequence(rid, list(prompt or PROMPTS.get(rid, PROMPTS["a"])), params)
    engine.add(seq, on_output or got.put)
    return got


def collect(got: queue.Queue) -> list[RequestOutput]:
    outs = [got.get(timeout=TIMEOUT)]
    while not outs[-1].finished:
        outs.append(got.get(timeout=TIMEOUT))
    return outs


def tokens(outs: list[RequestOutput]) -> list[int]:
    return [t for o in outs for t in o.new_token_ids]


def assert_clean(engine: LLMEngine) -> None:
    engine.check()
    assert engine.pool.num_free == engine.pool.num_blocks


def assert_error(outs: list[RequestOutput], prefix: str) -> None:
    last = outs[-1]
    assert (last.finished, last.finish_reason) == (True, "error"), last
    assert last.error.startswith(prefix), last.error
    assert all(not o.finished for o in outs[:-1])


NOT_FINITE = "sampling failed: ValueError: probabilities are not finite"


@pytest.mark.parametrize("bad,error", [
    (SamplingParams(max_tokens=8, temperature=float("nan")), NOT_FINITE),
    (SamplingParams(max_tokens=8, temperature=1e-40), NOT_FINITE),
    (SamplingParams(max_tokens=8, seed=2**64), "sampling failed: ValueError"),
    (SamplingParams(max_tokens=8, temperature=0, stop_token_ids=None), "stop check failed: TypeError"),
    (SamplingParams(max_tokens=None, temperature=0), "stop check failed: TypeError"),
], ids=["nan-temperature", "tiny-temperature", "huge-seed", "stop-ids-none", "max-tokens-none"])
def test_bad_params_fail_only_their_own_request(make_engine, solo, bad, error):
    engine = make_engine()
    goods = {name: submit(engine, name) for name in PROMPTS}
    bad_request = submit(engine, "bad", bad, prompt=PROMPTS["b"])
    engine.start()  # all four are in the first step together
    assert_error(collect(bad_request), error)
    for name, got in goods.items():
        outs = collect(got)
        assert tokens(outs) == solo[name] and outs[-1].finish_reason == "length"
    assert tokens(collect(submit(engine, "c"))) == solo["c"]  # and the loop still serves
    assert engine.alive
    assert_clean(engine)


def test_raising_output_callback_fails_only_its_request(make_engine, solo):
    engine = make_engine()
    seen = []

    def flaky(out: RequestOutput) -> None:
        seen.append(out)
        if len(seen) == 2:
            raise ConnectionError("client went away")

    goods = {name: submit(engine, name) for name in ("a", "c")}
    submit(engine, "b", on_output=flaky)
    engine.start()
    for name, got in goods.items():
        assert tokens(collect(got)) == solo[name]
    assert len(seen) == 3  # two token outputs, then the error, still offered to the same callback
    assert_error(seen, "output callback failed: ConnectionError: client went away")
    assert_clean(engine)


def test_raising_cancellation_check_fails_only_its_request(make_engine, solo):
    engine = make_engine()
    good = submit(engine, "a")
    bad = queue.Queue()
    engine.add(Sequence("b", PROMPTS["b"], LONG), bad.put, is_cancelled=lambda: 1 / 0)
    engine.start()
    assert_error(collect(bad), "cancellation check failed: ZeroDivisionError")
    assert tokens(collect(good)) == solo["a"]
    assert_clean(engine)


def test_one_raising_sampler_row_fails_only_its_request(make_engine, solo, monkeypatch):
    real = sampler._row  # the per-row preparation; the tensor work after it is batched

    def broken_for_bad(seq, *args):
        if seq.request_id == "bad":
            raise RuntimeError("row broke")
        return real(seq, *args)

    monkeypatch.setattr(sampler, "_row", broken_for_bad)
    engine = make_engine()
    goods = {name: submit(engine, name) for name in PROMPTS}
    fine = submit(engine, "sampled", SamplingParams(max_tokens=8, temperature=1.0, seed=3, ignore_eos=True))
    bad = submit(engine, "bad", SamplingParams(max_tokens=8, temperature=1.0), prompt=PROMPTS["b"])
    engine.start()
    assert_error(collect(bad), "sampling failed: RuntimeError: row broke")
    assert len(tokens(collect(fine))) == 8
    for name, got in goods.items():
        assert tokens(collect(got)) == solo[name]
    assert_clean(engine)


def test_failing_to_start_n_completions_fails_only_that_request(make_engine, solo, monkeypatch):
    engine = make_engine()
    real = engine._prepare

    def broken_for_children(seq):
        if seq.index > 0:
            raise RuntimeError("no detokenizer")
        return real(seq)

    monkeypatch.setattr(engine, "_prepare", broken_for_children)
    goods = {name: submit(engine, name) for name in ("a", "c")}
    bad = queue.Queue()
    engine.add(engine.make_sequence("bad", PROMPTS["b"], SamplingParams(n=3, max_tokens=8, temperature=0)), bad.put)
    engine.start()
    assert_error(collect(bad), "starting its n completions failed: RuntimeError: no detokenizer")
    for name, got in goods.items():
        assert tokens(collect(got)) == solo[name]
    assert_clean(engine)  # no block was shared with children that never ran


def test_failed_model_step_fails_its_requests_and_the_loop_goes_on(make_engine, solo, monkeypatch):
    engine = make_engine()
    real, calls = engine.runner.run, []

    def fails_second_step(batch):
        calls.append(len(batch.seqs))
        if len(calls) == 2:
            raise RuntimeError("device lost")
        return real(batch)

    monkeypatch.setattr(engine.runner, "run", fails_second_step)
    first = [submit(engine, name) for name in ("a", "b")]
    engine.start()
    for got in first:
        outs = collect(got)
        assert_error(outs, "model step failed: RuntimeError: device lost")
        assert len(tokens(outs)) == 1  # the token of the first step, sent before the failure
    assert tokens(collect(submit(engine, "c"))) == solo["c"]
    assert engine.alive
    assert_clean(engine)


@pytest.mark.parametrize("where", ["scheduler", "sampler"])
def test_exception_escaping_a_step_fails_the_live_requests_and_the_loop_goes_on(make_engine, solo, monkeypatch,
                                                                                  where):
    from triton_vlm.engine import llm_engine

    engine = make_engine()
    calls = []

    def fails_third_call(real):
        def call(*args):
            calls.append(1)
            if len(calls) == 3:
                raise KeyError("lost track")
            return real(*args)
        return call

    if where == "scheduler":
        monkeypatch.setattr(engine.scheduler, "schedule", fails_third_call(engine.scheduler.schedule))
        error = "engine step failed: KeyError: 'lost track'"
    else:
        monkeypatch.setattr(llm_engine, "sample", fails_third_call(llm_engine.sample))
        error = "sampling failed: KeyError: 'lost track'"
    first = [submit(engine, name, LONG) for name in ("a", "b")]
    engine.start()
    for got in first:
        assert_error(collect(got), error)
    assert_clean(engine)  # their blocks came back
    assert tokens(collect(submit(engine, "c"))) == solo["c"]
    assert engine.alive
    assert_clean(engine)


class Fatal(BaseException):
    """What no `except Exception` catches."""


@pytest.mark.parametrize("how", ["base-exception", "failure-handling-raises"])
def test_dead_loop_answers_everyone_and_refuses_new_requests(make_engine, monkeypatch, how):
    engine = make_engine()
    deaths = []
    engine.on_death = deaths.append
    armed, inside, go = threading.Event(), threading.Event(), threading.Event()

    def trap(real):
        def call(*args):
            if armed.is_set():
                inside.set()
                go.wait(TIMEOUT)
                raise Fatal("out of luck") if how == "base-exception" else RuntimeError("step broke")
            return real(*args)
        return call

    if how == "base-exception":
        monkeypatch.setattr(engine.runner, "run", trap(engine.runner.run))
        cause = "Fatal: out of luck"
    else:
        monkeypatch.setattr(engine.scheduler, "schedule", trap(engine.scheduler.schedule))
        monkeypatch.setattr(engine, "_fail", lambda seq, error: 1 / 0)  # and handling that failure fails too
        cause = "ZeroDivisionError: division by zero"
    running = [submit(engine, name, LONG) for name in ("a", "b")]
    engine.start()
    firsts = [got.get(timeout=TIMEOUT) for got in running]
    assert not any(o.finished for o in firsts)
    armed.set()
    assert inside.wait(TIMEOUT)
    queued = submit(engine, "c", LONG)  # still in the inbox: the loop is stuck in the trap
    go.set()
    for got in running + [queued]:
        assert_error(collect(got), f"engine loop died: {cause}")
    engine._thread.join(TIMEOUT)
    assert not engine._thread.is_alive()
    assert not engine.alive and engine.dead_reason == f"engine loop died: {cause}"
    assert deaths == [engine.dead_reason]
    with pytest.raises(EngineDead, match=cause):
        submit(engine, "d")
    assert_clean(engine)


def test_stop_answers_in_flight_requests(make_engine):
    engine = make_engine()
    deaths = []
    engine.on_death = deaths.append
    got = submit(engine, "a", SamplingParams(max_tokens=10_000, temperature=0, ignore_eos=True))
    engine.start()
    got.get(timeout=TIMEOUT)
    engine.stop()
    outs = collect(got)
    assert_error(outs, "engine stopped")
    assert not engine.alive and deaths == []  # a stop is not a death
    with pytest.raises(EngineDead, match="engine stopped"):
        submit(engine, "b")
    assert_clean(engine)


def test_waiting_queue_is_bounded(make_engine, solo):
    engine = make_engine(max_num_waiting=2, max_num_seqs=1)
    a, b = submit(engine, "a"), submit(engine, "b")
    with pytest.raises(EngineBusy, match=r"^server busy: 2 requests already waiting \(max_num_waiting\); retry later$"):
        submit(engine, "c")
    engine.step()  # a runs now, b still waits
    c = submit(engine, "c")
    with pytest.raises(EngineBusy):
        submit(engine, "d")
    engine.abort("b")
    engine.step()
    assert b.get_nowait().finish_reason == "abort"
    too_long = submit(engine, "too-long", prompt=[1] * (engine.scheduler.max_seq_len + 1))
    engine.step()  # refused at admission: that frees its place too
    assert_error(collect(too_long), "admission failed: ValueError: input_ids: prompt has")
    dup = submit(engine, "a")
    engine.step()
    assert_error(collect(dup), "admission failed: ValueError: request id 'a' is already in flight")
    while engine.has_work():
        engine.step()
    assert tokens(collect(a)) == solo["a"] and tokens(collect(c)) == solo["c"]
    more = [submit(engine, name) for name in ("a", "b")]  # both places are free again
    with pytest.raises(EngineBusy):
        submit(engine, "c")
    while engine.has_work():
        engine.step()
    assert [tokens(collect(got)) for got in more] == [solo["a"], solo["b"]]
    assert_clean(engine)


def test_busy_is_raised_in_the_callers_thread_while_the_loop_runs(make_engine):
    engine = make_engine(max_num_waiting=1, max_num_seqs=1)
    engine.start()
    running = submit(engine, "a", LONG)
    running.get(timeout=TIMEOUT)  # a runs, the single running place is taken
    waiting = submit(engine, "b", LONG)
    with pytest.raises(EngineBusy):
        submit(engine, "c")
    engine.abort("a")
    engine.abort("b")
    assert collect(running)[-1].finish_reason == "abort" and collect(waiting)[-1].finish_reason == "abort"
    assert_clean(engine)


def test_generate_is_not_bounded(make_engine, solo):
    engine = make_engine(max_num_waiting=1)
    assert engine.generate(list(PROMPTS.values()), GREEDY) == list(solo.values())
    assert_clean(engine)
