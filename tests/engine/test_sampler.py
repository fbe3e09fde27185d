"""The batched sampler against a plain per-row reference on fixed logits, one parameter at a time and mixed."""
import math

import pytest
import torch

from triton_vlm.engine import sampler
from triton_vlm.engine.sampling_params import SamplingParams
from triton_vlm.engine.sequence import Sequence

VOCAB = 40
EOS = frozenset({2})
PROMPT = [1, 5, 6, 7, 5]
OUTPUT = [9, 9, 11, 5, 13]  # generated so far


def seq(params: SamplingParams, output=OUTPUT, bad_word_ids=()) -> Sequence:
    s = Sequence("r", PROMPT + list(output), params, prompt_len=len(PROMPT))
    s.bad_word_ids = [list(w) for w in bad_word_ids]
    return s


def reference(logits: torch.Tensor, s: Sequence) -> torch.Tensor:
    """The distribution vLLM's definitions give, row by row, in float64 with plain loops."""
    p = s.params
    x = logits.double().clone()
    out = s.generated_ids
    if p.allowed_token_ids:
        x[[t for t in range(VOCAB) if t not in p.allowed_token_ids]] = -math.inf
    for word in s.bad_word_ids:
        if len(out) >= len(word) - 1 and out[len(out) - len(word) + 1:] == word[:-1]:
            x[word[-1]] = -math.inf
    if len(out) < p.min_tokens:
        for t in list(p.stop_token_ids) + ([] if p.ignore_eos else list(EOS)):
            x[t] = -math.inf
    for t, b in (p.logit_bias or {}).items():
        x[t] += b
    for t in set(s.token_ids):
        if p.repetition_penalty != 1.0:
            x[t] = x[t] / p.repetition_penalty if x[t] > 0 else x[t] * p.repetition_penalty
    for t in set(out):
        x[t] -= p.frequency_penalty * out.count(t) + p.presence_penalty
    if p.greedy:
        return torch.nn.functional.one_hot(x.argmax(), VOCAB).double()
    x = x / p.temperature
    if 0 < p.top_k < VOCAB:
        kth = x.sort(descending=True).values[p.top_k - 1]
        x[x < kth] = -math.inf
    probs = x.softmax(-1)
    if p.top_p < 1:
        order = probs.argsort(descending=True)
        mass, keep = 0.0, []
        for t in order.tolist():
            keep.append(t)
            mass += probs[t].item()
            if mass >= p.top_p:
                break
        probs[[t for t in range(VOCAB) if t not in keep]] = 0
        probs /= probs.sum()
    if p.min_p > 0:
        probs[probs < p.min_p * probs.max()] = 0
        probs /= probs.sum()
    return probs


CASES = {
    "plain": SamplingParams(),
    "temperature": SamplingParams(temperature=0.3),
    "hot": SamplingParams(temperature=4.0),
    "greedy": SamplingParams(temperature=0),
    "top_k": SamplingParams(top_k=5),
    "top_p": SamplingParams(top_p=0.6),
    "min_p": SamplingParams(min_p=0.2),
    "repetition": SamplingParams(repetition_penalty=1.8),
    "repetition-below-1": SamplingParams(repetition_penalty=0.5),
    "presence": SamplingParams(presence_penalty=1.5),
    "frequency": SamplingParams(frequency_penalty=-0.7),
    "logit_bias": SamplingParams(logit_bias={3: 5.0, 9: -100.0, 30: 2.5}),
    "allowed": SamplingParams(allowed_token_ids=[3, 4, 17, 30]),
    "bad_words": SamplingParams(),  # with bad_word_ids below
    "min_tokens": SamplingParams(min_tokens=8, stop_token_ids=[7, 8]),
    "min_tokens-ignore-eos": SamplingParams(min_tokens=8, ignore_eos=True),
    "greedy-penalised": SamplingParams(temperature=0, repetition_penalty=3.0, frequency_penalty=2.0),
    "mixed": SamplingParams(temperature=0.7, top_k=12, top_p=0.8, min_p=0.05, presence_penalty=0.5,
                            logit_bias={4: 3.0}),
}


def make_seqs() -> list[Sequence]:
    seqs = []
    for name, params in CASES.items():
        params.validate()
        bad = [(4,), (13, 21), (9, 22)] if name == "bad_words" else ()  # (13, 21): out ends with 13; (9, 22) not
        seqs.append(seq(params, bad_word_ids=bad))
    return seqs


@pytest.fixture
def logits() -> torch.Tensor:
    g = torch.Generator().manual_seed(0)
    x = torch.randn(len(CASES), VOCAB, generator=g) * 3
    x[:, 2] += 4.0  # make EOS likely, so min_tokens has something to do
    return x


def distributions(logits, seqs):
    rows = [sampler._row(s, VOCAB, EOS) for s in seqs]
    shaped = sampler.shape_logits(logits, seqs, rows)
    probs = sampler.probabilities(shaped, rows)
    greedy = torch.tensor([r.greedy for r in rows])
    onehot = torch.nn.functional.one_hot(shaped.argmax(-1), VOCAB).double()
    return torch.where(greedy[:, None], onehot, probs.double())


def test_every_parameter_matches_the_reference_in_one_batch(logits):
    seqs = make_seqs()
    got = distributions(logits, seqs)
    for i, (name, s) in enumerate(zip(CASES, seqs)):
        want = reference(logits[i], s)
        assert torch.allclose(got[i], want, atol=1e-6), (name, got[i], want)
    # and each parameter really changed something compared with plain sampling of the same logits
    plain = [reference(logits[i], seq(SamplingParams())) for i in range(len(CASES))]
    for i, name in enumerate(CASES):
        if name not in ("plain", "min_tokens-ignore-eos"):  # the latter bans nothing: the control
            assert not torch.allclose(got[i], plain[i], atol=1e-4), name


def test_bad_words_and_min_tokens_ban_what_they_say(logits):
    seqs = make_seqs()
    got = distributions(logits, seqs)
    names = list(CASES)
    bad = got[names.index("bad_words")]
    assert bad[4] == 0 and bad[21] == 0 and bad[22] > 0
    assert got[names.index("min_tokens")][[2, 7, 8]].sum() == 0
    ignore = got[names.index("min_tokens-ignore-eos")]
    assert ignore[2] > 0
    allowed = got[names.index("allowed")]
    assert set(allowed.nonzero().flatten().tolist()) <= {3, 4, 17, 30}


def test_draws_follow_the_distribution(logits):
    """4000 unseeded rows of one sequence in one batch: the frequencies match the probabilities."""
    params = CASES["mixed"]
    rows = 4000
    seqs = [seq(params) for _ in range(rows)]
    out = sampler.sample(logits[-1:].expand(rows, VOCAB), seqs, EOS)
    counts = torch.bincount(torch.tensor(out.tokens), minlength=VOCAB).double() / rows
    want = reference(logits[-1], seqs[0])
    assert (counts - want).abs().max() < 0.03, (counts, want)
    assert counts[want == 0].sum() == 0


def test_logprobs_are_raw_log_softmax_with_ranks(logits):
    seqs = [seq(SamplingParams(temperature=0, logprobs=3)), seq(SamplingParams(temperature=0.5, seed=4)),
            seq(SamplingParams(temperature=0.5, logprobs=0, top_k=3))]
    out = sampler.sample(logits[:3], seqs, EOS)
    raw = torch.log_softmax(logits[:3].double(), -1)
    for i, token in enumerate(out.tokens):
        assert abs(out.logprobs[i] - raw[i, token].item()) < 1e-5
    assert out.ranks[0] == 1 and out.ranks[1] is None and out.top[1] is None
    assert [t for t, _ in out.top[0]] == raw[0].topk(3).indices.tolist()
    assert out.ranks[2] == 1 + int((raw[2] > raw[2, out.tokens[2]]).sum()) and out.top[2] == []


def test_seeded_rows_do_not_depend_on_their_batch(logits):
    params = SamplingParams(temperature=1.0, seed=1234)
    alone = [sampler.sample(logits[:1], [s], EOS).tokens[0] for s in [seq(params)] for _ in range(5)]
    # The same seeded sequence, five steps, each time at another place in a batch of other rows.
    s = seq(params)
    mixed = []
    for step in range(5):
        others = [seq(SamplingParams(temperature=1.0)) for _ in range(step + 1)]
        batch = others[:step] + [s] + others[step:]
        x = torch.cat([logits[1:1 + step], logits[:1], logits[1 + step:2 + step]])
        mixed.append(sampler.sample(x, batch, EOS).tokens[step])
    assert mixed == alone


def test_broken_rows_fail_alone(logits):
    seqs = [seq(SamplingParams(temperature=float("nan"))), seq(SamplingParams(temperature=0)),
            seq(SamplingParams(allowed_token_ids=[3]), ), seq(SamplingParams(seed=2**64))]
    seqs[2].bad_word_ids = [[3]]  # allowed nothing but 3, and 3 is banned
    out = sampler.sample(logits[:4], seqs, EOS)
    assert "probabilities are not finite" in str(out.tokens[0])
    assert out.tokens[1] == int(logits[1].argmax())
    assert "every token is masked" in str(out.tokens[2])
    assert isinstance(out.tokens[3], Exception)
