"""Sampling and acceptance: greedy exactness and distribution tests at T > 0.

Distribution tests use a chi-square goodness-of-fit test at significance
level ALPHA = 0.001 on N samples. With N = 20,000 over 6 outcomes, the test
detects a shift of 0.02 in total variation (half the probability moved
between two outcomes) with power above 0.99 (non-central chi-square; see
``test_stated_power``). Each test also runs a biased sampler the same way
and asserts that it is rejected, so the check can fail.
"""

import numpy as np
import pytest
import torch
from scipy import stats

from shared.protocol import SamplingParams
from shared.sampling import accept_prefix, position_noise, process_logits, rejection_sample, sample_positions

ALPHA = 0.001
N = 20_000
P = torch.tensor([0.35, 0.25, 0.2, 0.1, 0.07, 0.03], dtype=torch.float64)


def chi_square_pvalue(counts: np.ndarray, probs: np.ndarray) -> float:
    expected = probs * counts.sum()
    return float(stats.chisquare(counts, expected).pvalue)


def test_stated_power():
    # Move 0.02 of mass from outcome 0 to outcome 5: total variation 0.02.
    shifted = P.numpy().copy()
    shifted[0] -= 0.02
    shifted[5] += 0.02
    noncentrality = N * float(((shifted - P.numpy()) ** 2 / P.numpy()).sum())
    critical = stats.chi2.ppf(1 - ALPHA, df=len(P) - 1)
    power = 1 - stats.ncx2.cdf(critical, df=len(P) - 1, nc=noncentrality)
    assert power > 0.99


def test_greedy_takes_argmax():
    logits = torch.tensor([[0.1, 2.0, -1.0], [3.0, 0.0, 2.9]])
    params = SamplingParams(temperature=0.0)
    assert sample_positions(logits, params, [5, 6]) == [1, 0]


def test_greedy_accept_prefix():
    assert accept_prefix([4, 5, 6, 7], [4, 5, 9]) == 2
    assert accept_prefix([4, 5, 6, 7], [4, 5, 6]) == 3
    assert accept_prefix([1, 5], [4]) == 0
    assert accept_prefix([3], []) == 0


def test_noise_depends_only_on_seed_and_position():
    a = position_noise(7, 100, 50)
    b = position_noise(7, 100, 50)
    c = position_noise(7, 101, 50)
    d = position_noise(8, 100, 50)
    assert torch.equal(a, b)
    assert not torch.equal(a, c)
    assert not torch.equal(a, d)


@pytest.mark.parametrize("draft_token", [0, 3])
def test_coupled_acceptance_is_distributed_as_p(draft_token):
    """Commit the draft token if it equals the coupled sample, else the sample: the result follows p."""
    logits = torch.log(P)[None].float()
    params_seeds = range(N)
    counts = np.zeros(len(P))
    accepted = 0
    for seed in params_seeds:
        params = SamplingParams(temperature=1.0, seed=seed)
        target = sample_positions(logits, params, [0])
        j = accept_prefix(target, [draft_token])
        committed = draft_token if j else target[0]
        counts[committed] += 1
        accepted += j
    assert chi_square_pvalue(counts, P.numpy()) > ALPHA
    # One-hot acceptance probability is p(draft_token); 5 standard errors of slack.
    p_accept = float(P[draft_token])
    assert abs(accepted / N - p_accept) < 5 * (p_accept * (1 - p_accept) / N) ** 0.5


def test_argmax_acceptance_pitfall_is_detected():
    """Accepting a random draft token when it equals the target argmax is not exact; the test must see it."""
    rng = np.random.default_rng(0)
    counts = np.zeros(len(P))
    argmax = int(torch.argmax(P))
    for _ in range(N):
        draft = int(rng.integers(len(P)))
        if draft == argmax:
            counts[draft] += 1
        else:
            counts[int(rng.choice(len(P), p=P.numpy()))] += 1
    assert chi_square_pvalue(counts, P.numpy()) < ALPHA


def test_processed_sampling_distribution():
    logits = torch.log(P)[None].float() * 2.0
    params = SamplingParams(temperature=0.7, top_k=5, top_p=0.9, seed=0)
    processed = torch.softmax(process_logits(logits, params).double(), dim=-1)[0]
    assert processed[5] == 0.0  # cut by top-k
    counts = np.zeros(len(P))
    for seed in range(N):
        token = sample_positions(logits, params.model_copy(update={"seed": seed}), [3])[0]
        counts[token] += 1
    support = processed.numpy() > 0
    assert counts[~support].sum() == 0
    assert chi_square_pvalue(counts[support], processed.numpy()[support]) > ALPHA


def test_top_p_keeps_crossing_token():
    logits = torch.log(torch.tensor([[0.5, 0.3, 0.15, 0.05]]))
    kept = process_logits(logits, SamplingParams(temperature=1.0, top_p=0.6)).isfinite()[0].tolist()
    assert kept == [True, True, False, False]
    kept = process_logits(logits, SamplingParams(temperature=1.0, top_p=0.5)).isfinite()[0].tolist()
    assert kept == [True, False, False, False]


def test_top_k_keeps_k_tokens():
    logits = torch.tensor([[1.0, 4.0, 3.0, 2.0]])
    kept = process_logits(logits, SamplingParams(temperature=1.0, top_k=2)).isfinite()[0].tolist()
    assert kept == [False, True, True, False]


def test_rejection_sample_matches_p():
    q = torch.tensor([0.1, 0.4, 0.2, 0.1, 0.1, 0.1], dtype=torch.float64)
    rng = np.random.default_rng(1)
    counts = np.zeros(len(P))
    for _ in range(N):
        draft = int(rng.choice(len(q), p=q.numpy()))
        _, token = rejection_sample(P, q, draft, float(rng.random()), float(rng.random()))
        counts[token] += 1
    assert chi_square_pvalue(counts, P.numpy()) > ALPHA


def test_rejection_sample_with_wrong_q_is_detected():
    """Verifying with a q other than the one the draft sampled from breaks exactness."""
    q_used = torch.tensor([0.1, 0.4, 0.2, 0.1, 0.1, 0.1], dtype=torch.float64)
    q_claimed = torch.full((6,), 1 / 6, dtype=torch.float64)
    rng = np.random.default_rng(2)
    counts = np.zeros(len(P))
    for _ in range(N):
        draft = int(rng.choice(6, p=q_used.numpy()))
        _, token = rejection_sample(P, q_claimed, draft, float(rng.random()), float(rng.random()))
        counts[token] += 1
    assert chi_square_pvalue(counts, P.numpy()) < ALPHA
