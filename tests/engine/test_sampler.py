"""Sampler: greedy, temperature, top-k/top-p/min-p, penalties, per-request seeds, logprobs."""

from __future__ import annotations

import math

import pytest
import torch

from lmstack.engine.sampler import Sampler, SampleResult, apply_penalties
from lmstack.engine.sampling_params import SamplingParams
from lmstack.engine.sequence import Sequence
from lmstack.errors import InputError


def seq(params: SamplingParams, prompt=(1, 2, 3), output=()) -> Sequence:
    s = Sequence("r", list(prompt), params)
    for t in output:
        s.append_token(t)
    return s


def batch(params: SamplingParams, n: int) -> list[Sequence]:
    return [seq(params) for _ in range(n)]


def logits_from_probs(probs: list[float], rows: int = 1) -> torch.Tensor:
    return torch.tensor(probs).log().repeat(rows, 1)


def draw_ids(sampler: Sampler, logits: torch.Tensor, params: SamplingParams, rounds: int) -> set:
    seen = set()
    for _ in range(rounds):
        seen.update(r.token_id for r in sampler(logits, batch(params, logits.shape[0])))
    return seen


def test_greedy_is_argmax():
    logits = torch.randn(8, 300, generator=torch.Generator().manual_seed(0))
    results = Sampler(300, seed=0)(logits, batch(SamplingParams(temperature=0), 8))
    assert [r.token_id for r in results] == logits.argmax(dim=-1).tolist()
    assert all(r.logprob is None and r.top_logprobs is None for r in results)


def test_top_k_1_equals_greedy():
    logits = torch.randn(16, 500, generator=torch.Generator().manual_seed(1))
    sampler = Sampler(500, seed=0)
    for _ in range(5):
        results = sampler(logits, batch(SamplingParams(temperature=1.5, top_k=1), 16))
        assert [r.token_id for r in results] == logits.argmax(dim=-1).tolist()


def test_top_p_keeps_only_the_nucleus():
    # 0.4 + 0.3 = 0.7 < 0.85, + 0.2 = 0.9 reaches it: the nucleus is {0, 1, 2}. The other
    # 0.1 is spread over 4997 tokens so the first candidate tier sees the whole nucleus.
    vocab = 5000
    probs = [0.4, 0.3, 0.2] + [0.1 / (vocab - 3)] * (vocab - 3)
    seen = draw_ids(
        Sampler(vocab, seed=0), logits_from_probs(probs, 64), SamplingParams(top_p=0.85), 10
    )
    assert seen == {0, 1, 2}


@pytest.mark.parametrize("top_p", [0.3, 0.6])
def test_top_p_wide_nucleus_matches_a_full_sort(top_p):
    # Flat distributions whose nucleus outgrows the first candidate tiers (0.6: a full sort).
    vocab = 49152
    gen = torch.Generator().manual_seed(3)
    logits = (torch.rand(vocab, generator=gen) * 0.5).repeat(32, 1)
    probs = torch.softmax(logits[0], dim=-1)
    sorted_probs, order = probs.sort(descending=True)
    nucleus = set(order[(sorted_probs.cumsum(0) - sorted_probs) < top_p].tolist())
    assert 5000 < len(nucleus) < vocab
    seen = draw_ids(Sampler(vocab, seed=0), logits, SamplingParams(top_p=top_p), 5)
    assert seen <= nucleus and len(seen) > 100


def test_top_p_after_top_k_renormalises():
    # top_k=3 leaves (0.5, 0.3, 0.15) / 0.95; top_p=0.8 then needs 0.5/0.95 + 0.3/0.95 = 0.84.
    probs = [0.5, 0.3, 0.15, 0.05]
    params = SamplingParams(top_k=3, top_p=0.8)
    assert draw_ids(Sampler(4, seed=0), logits_from_probs(probs, 64), params, 5) == {0, 1}


@pytest.mark.parametrize("min_p,expected", [(0.2, {0, 1, 2}), (0.5, {0, 1}), (0.9, {0})])
def test_min_p(min_p, expected):
    probs = [0.5, 0.3, 0.15, 0.05]  # min_p * 0.5 is the cut-off
    seen = draw_ids(
        Sampler(4, seed=0), logits_from_probs(probs, 64), SamplingParams(min_p=min_p), 5
    )
    assert seen == expected


def test_min_p_with_top_k_on_a_large_vocabulary():
    vocab = 1000
    probs = [0.3, 0.25, 0.02] + [0.43 / (vocab - 3)] * (vocab - 3)
    params = SamplingParams(top_k=50, min_p=0.5)
    assert draw_ids(Sampler(vocab, seed=0), logits_from_probs(probs, 64), params, 5) == {0, 1}


def empirical_entropy(tokens: list[int]) -> float:
    counts = torch.bincount(torch.tensor(tokens)).float()
    p = counts[counts > 0] / len(tokens)
    return float(-(p * p.log()).sum())


def test_temperature_changes_entropy():
    logits = torch.linspace(4, 0, 50).repeat(64, 1)
    sampler = Sampler(50, seed=0)
    entropy = {}
    for t in (0.3, 1.0, 3.0):
        tokens = []
        for _ in range(8):
            tokens += [
                r.token_id for r in sampler(logits, batch(SamplingParams(temperature=t), 64))
            ]
        entropy[t] = empirical_entropy(tokens)
    assert entropy[0.3] < entropy[1.0] < entropy[3.0]


def test_penalties_exact_values():
    logits = torch.tensor([[2.0, -1.0, 0.5, 3.0, 1.0]] * 4)
    original = logits.clone()
    both = SamplingParams(repetition_penalty=2.0, frequency_penalty=0.5, presence_penalty=0.1)
    seqs = [
        seq(both, prompt=[0, 4], output=[1, 1, 2]),
        seq(SamplingParams(), prompt=[0, 4], output=[1, 1, 2]),
        seq(SamplingParams(frequency_penalty=-1.0), prompt=[0], output=[3, 3, 3]),
        seq(
            SamplingParams(presence_penalty=2.0, repetition_penalty=0.5), prompt=[4], output=[1, 1]
        ),
    ]
    out = apply_penalties(logits, seqs)
    expected = torch.tensor(
        [
            # repetition on {0, 1, 2, 4}: 2/2, -1*2, 0.5/2, 1/2; then output counts 1:2, 2:1:
            # token 1: -2 - 2*0.5 - 0.1 = -3.1, token 2: 0.25 - 0.5 - 0.1 = -0.35
            [1.0, -3.1, -0.35, 3.0, 0.5],
            [2.0, -1.0, 0.5, 3.0, 1.0],  # no penalties: untouched
            [2.0, -1.0, 0.5, 6.0, 1.0],  # frequency only, output tokens only: 3 - 3*(-1)
            # repetition 0.5 on {4, 1}: 1/0.5 = 2, -1*0.5 = -0.5; presence once: -0.5 - 2
            [2.0, -2.5, 0.5, 3.0, 2.0],
        ]
    )
    torch.testing.assert_close(out, expected)
    assert torch.equal(logits, original)  # the caller's logits are not modified


def test_no_penalties_is_a_no_op():
    logits = torch.randn(3, 10)
    seqs = [seq(SamplingParams(), output=[1, 2]) for _ in range(3)]
    assert apply_penalties(logits, seqs) is logits


def test_repetition_penalty_changes_the_greedy_choice():
    logits = torch.tensor([[1.0, 3.0, 2.5]])
    sampler = Sampler(3)
    plain = seq(SamplingParams(temperature=0), prompt=[1])
    penalised = seq(SamplingParams(temperature=0, repetition_penalty=1.5), prompt=[1])
    assert sampler(logits, [plain])[0].token_id == 1
    assert sampler(logits, [penalised])[0].token_id == 2


def test_seeded_row_is_independent_of_its_batch():
    vocab = 2000
    gen = torch.Generator().manual_seed(5)
    row = torch.randn(vocab, generator=gen)
    others = torch.randn(6, vocab, generator=gen)
    params = SamplingParams(temperature=1.0, top_p=0.9, seed=1234)

    def run(position: int, neighbours: list[SamplingParams], shared_seed: int) -> list[int]:
        sampler = Sampler(vocab, seed=shared_seed)
        target = seq(params)
        seqs = [seq(p) for p in neighbours]
        seqs.insert(position, target)
        logits = torch.cat([others[: len(neighbours)], row[None]])
        # Put the target's row at `position`, the neighbours' rows around it.
        order = list(range(len(neighbours)))
        order.insert(position, len(neighbours))
        logits = logits[order]
        return [sampler(logits, seqs)[position].token_id for _ in range(20)]

    a = run(0, [SamplingParams(temperature=0.7), SamplingParams(seed=7, top_k=5)], 0)
    b = run(
        3,
        [
            SamplingParams(temperature=0),
            SamplingParams(top_k=40, min_p=0.1),
            SamplingParams(temperature=1.3, top_p=0.5),
            SamplingParams(seed=99),
            SamplingParams(repetition_penalty=1.3, logprobs=2),
        ],
        1,
    )
    assert a == b
    assert len(set(a)) > 1  # genuinely sampled, not collapsed to greedy
    other_seed = SamplingParams(temperature=1.0, top_p=0.9, seed=4321)
    sampler, s = Sampler(vocab, seed=0), seq(other_seed)
    c = [sampler(row[None], [s])[0].token_id for _ in range(20)]
    assert c != a


def test_seeded_generator_lives_in_sequence_state():
    s = seq(SamplingParams(seed=3))
    Sampler(10)(torch.zeros(1, 10), [s])
    assert isinstance(s.generator, torch.Generator)


def test_logprobs_are_raw():
    gen = torch.Generator().manual_seed(2)
    logits = torch.randn(3, 100, generator=gen)
    raw = torch.log_softmax(logits, dim=-1)
    allowed = torch.ones(3, 100, dtype=torch.bool)
    allowed[1, :50] = False
    seqs = [
        seq(SamplingParams(temperature=0.5, repetition_penalty=1.5, logprobs=5), output=[4, 9]),
        seq(SamplingParams(temperature=0, logprobs=3)),
        seq(SamplingParams(temperature=1.0, logprobs=0)),
    ]
    results = Sampler(100, seed=0)(logits, seqs, allowed)
    for i, (r, n) in enumerate(zip(results, (5, 3, 0), strict=True)):
        assert math.isclose(r.logprob, float(raw[i, r.token_id]), rel_tol=1e-5, abs_tol=1e-6)
        assert len(r.top_logprobs) == n
        values = [v for _, v in r.top_logprobs]
        assert values == sorted(values, reverse=True)
        expected = raw[i].topk(n) if n else None
        if n:
            assert [t for t, _ in r.top_logprobs] == expected.indices.tolist()
    assert results[1].token_id >= 50  # the mask applies even though logprobs ignore it


def test_allowed_mask_forces_the_choice():
    logits = torch.tensor([[5.0, 1.0, 0.0, 2.0, 0.5, 1.5, 0.0, -3.0]] * 4)
    allowed = torch.ones(4, 8, dtype=torch.bool)
    allowed[0] = False
    allowed[0, 7] = True  # the least likely token is the only one allowed
    allowed[1] = False
    allowed[1, [3, 5]] = True
    allowed[3] = False  # nothing allowed (a grammar in its error state): no NaN, no crash
    seqs = [
        seq(SamplingParams(temperature=1.0)),
        seq(SamplingParams(temperature=0)),
        seq(SamplingParams(temperature=0)),
        seq(SamplingParams(temperature=1.0)),
    ]
    sampler = Sampler(8, seed=0)
    for _ in range(10):
        results = sampler(logits, seqs, allowed)
        assert [r.token_id for r in results[:3]] == [7, 3, 0]
        assert 0 <= results[3].token_id < 8


def test_padded_vocabulary_columns_are_never_sampled():
    logits = torch.zeros(4, 130)
    logits[:, 100:] = 50.0  # padding columns past the tokenizer's 100 tokens
    seqs = [seq(SamplingParams(temperature=t)) for t in (0, 1.0, 1.0, 0)]
    results = Sampler(100, seed=0)(logits, seqs)
    assert all(r.token_id < 100 for r in results)


def test_full_size_mixed_batch_runs():
    vocab, rows = 49152, 64
    logits = torch.randn(rows, vocab, generator=torch.Generator().manual_seed(0)) * 3
    seqs = []
    for i in range(rows):
        params = SamplingParams(
            temperature=(0.0, 0.7, 1.0, 1.3)[i % 4],
            top_p=(1.0, 0.9)[i % 2],
            top_k=(0, 40, -1)[i % 3],
            min_p=(0.0, 0.05)[i % 5 == 0],
            seed=i if i % 7 == 0 else None,
            logprobs=3 if i % 6 == 0 else None,
            repetition_penalty=1.1 if i % 8 == 0 else 1.0,
            frequency_penalty=0.3 if i % 9 == 0 else 0.0,
        )
        seqs.append(seq(params, prompt=list(range(i, i + 200)), output=[5, 6, 5]))
    allowed = torch.ones(rows, vocab, dtype=torch.bool)
    allowed[::10, 1000:] = False
    results = Sampler(vocab, seed=0)(logits, seqs, allowed)
    assert len(results) == rows and all(isinstance(r, SampleResult) for r in results)
    assert all(0 <= r.token_id < vocab for r in results)
    assert all(r.token_id < 1000 for r in results[::10])
    assert all((r.logprob is not None) == (i % 6 == 0) for i, r in enumerate(results))


def test_logit_bias_is_added_per_row_before_sampling():
    logits = torch.tensor([[3.0, 2.0, 1.0, 0.0]] * 4)
    seqs = [
        seq(SamplingParams(temperature=0, logit_bias={3: 100.0})),  # forces the least likely
        seq(SamplingParams(temperature=0, logit_bias={0: -100.0})),  # bans the most likely
        seq(SamplingParams(temperature=0)),  # its neighbours' biases do not reach it
        seq(SamplingParams(temperature=1.0, logit_bias={0: -100.0, 1: -100.0, 2: -100.0})),
    ]
    before = logits.clone()
    for _ in range(5):
        assert [r.token_id for r in Sampler(4, seed=0)(logits, seqs)] == [3, 1, 0, 3]
    assert torch.equal(logits, before)  # raw logits untouched: logprobs stay raw


def test_logit_bias_and_penalties_add_up():
    logits = torch.tensor([[2.0, 1.9, 0.0]])
    # Presence 2.0 on token 0 (seen) leaves 0.0; the bias +1.0 on token 2 makes it 1.0.
    params = SamplingParams(temperature=0, presence_penalty=2.0, logit_bias={2: 1.0})
    assert Sampler(3)(logits, [seq(params, output=[0])])[0].token_id == 1
    params = SamplingParams(temperature=0, presence_penalty=2.0, logit_bias={2: 2.5})
    assert Sampler(3)(logits, [seq(params, output=[0])])[0].token_id == 2


@pytest.mark.parametrize(
    "bias, message",
    [
        ({5: 100.5}, r"logit_bias\[5\] must be in \[-100, 100\]"),
        ({5: math.inf}, r"logit_bias\[5\] must be in"),
        ({10: 1.0}, r"outside the vocabulary \[0, 10\)"),
        ({-1: 1.0}, "outside the vocabulary"),
        ({"5": 1.0}, "keys must be token ids"),
    ],
)
def test_logit_bias_is_validated(bias, message):
    with pytest.raises(InputError, match=message):
        SamplingParams(logit_bias=bias).validate(vocab_size=10)
