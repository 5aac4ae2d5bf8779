"""Fan-out allocation against hand-computed cases."""

import pytest

from shared.fanout import (
    AdaptiveFanout,
    GeometricFanout,
    acceptance_length_probs,
    allocate_by_gain,
    fit_miss_exponent,
    geometric_fanout,
    model_fanout,
    power_law_rank_probs,
    round_to_budget,
    uniform_fanout,
)


def test_acceptance_length_probs_sum_to_one():
    probs = acceptance_length_probs(5, 0.7)
    assert len(probs) == 6
    assert sum(probs) == pytest.approx(1.0)
    assert probs[5] == pytest.approx(0.7**5)


@pytest.mark.parametrize(
    "rate, expected",
    [
        # K=7, B=24, r=1, worked by hand: weights sqrt(P(j)) scaled to 24, largest remainder.
        (0.6, [6, 5, 4, 3, 2, 2, 1, 1]),
        (0.8, [4, 3, 3, 3, 3, 2, 2, 4]),
    ],
)
def test_geometric_fanout_hand_cases(rate, expected):
    assert geometric_fanout(7, 24, rate, 1.0) == expected


def test_geometric_fanout_sums_to_budget():
    for k in range(1, 9):
        for budget in (1, 5, 8, 24, 64):
            assert sum(geometric_fanout(k, budget, 0.75, 1.5)) == budget


def test_larger_miss_exponent_flattens_allocation():
    steep = geometric_fanout(4, 40, 0.5, 0.2)
    flat = geometric_fanout(4, 40, 0.5, 5.0)
    assert steep[0] - steep[3] > flat[0] - flat[3]


def test_uniform_fanout():
    assert uniform_fanout(3, 8) == [2, 2, 2, 2]
    assert uniform_fanout(3, 10) == [3, 3, 2, 2]


def test_round_to_budget_rejects_zero_weights():
    with pytest.raises(ValueError):
        round_to_budget([0.0, 0.0], 4)


@pytest.mark.parametrize("rate", [0.0, 1.0, -0.1])
def test_geometric_fanout_rejects_bad_rate(rate):
    with pytest.raises(ValueError):
        geometric_fanout(3, 8, rate, 1.0)


def test_power_law_rank_probs_sum_to_one():
    probs = power_law_rank_probs(10, 1.0)
    assert len(probs) == 11
    assert sum(probs) == pytest.approx(1.0)
    assert probs[0] == pytest.approx(0.5)


def test_adaptive_fanout_spends_the_budget():
    policy = AdaptiveFanout(k=4, budget=10, acceptance_rate=0.7, miss_exponent=1.0)
    assert sum(policy.allocation()) == 10


def test_adaptive_fanout_prior_favours_likely_lengths():
    policy = AdaptiveFanout(k=3, budget=8, acceptance_rate=0.9, miss_exponent=1.0)
    allocation = policy.allocation()
    # P(3) = 0.729 dominates, so full acceptance gets the most candidates.
    assert allocation[3] == max(allocation)


def test_adaptive_fanout_follows_measured_ranks():
    policy = AdaptiveFanout(k=2, budget=6, acceptance_rate=0.5, miss_exponent=1.0)
    for _ in range(400):
        # Steps end with j = 0 only, and the committed token is always the draft's third candidate.
        policy.observe_outcome(0)
        policy.observe_rank(0, 2)
    allocation = policy.allocation()
    assert allocation[0] >= 3
    assert allocation[1] + allocation[2] <= 3


def test_adaptive_fanout_counts_misses_outside_the_list():
    policy = AdaptiveFanout(k=1, budget=4, acceptance_rate=0.5, miss_exponent=1.0, max_rank=3)
    for _ in range(300):
        policy.observe_outcome(1)
        policy.observe_rank(1, None)
    # Candidates at j = 1 no longer pay, but the allocation still spends within max_rank per length.
    allocation = policy.allocation()
    assert all(count <= 3 for count in allocation)
    assert sum(allocation) == 4


def test_paired_list_hits_by_hand():
    from bench.fanout_bench import best_list, hits_of_list

    # K = 1. After 0 accepted drafts: 2 lookups at rank 0 and 1 at rank 1. After 1: one at rank 1.
    lookups = {"rank_le": [[2, 3] + [3] * 14, [0, 1] + [1] * 14], "total": [3, 1], "hits": 0}
    assert hits_of_list(lookups, [1, 1]) == 2
    assert hits_of_list(lookups, [0, 2]) == 1
    assert hits_of_list(lookups, [2, 0]) == 3
    assert best_list(lookups, 1, 2) == ([2, 0], 3)
    assert best_list(lookups, 1, 4) == ([2, 2], 4)


def test_allocate_by_gain_by_hand():
    # K = 1, P = [0.4, 0.6], r = 1: gains P(j) * (1/(f+1) - 1/(f+2)).
    # j = 0: 0.2, 0.0667, 0.0333; j = 1: 0.3, 0.1, 0.05.
    gains = [[0.4 * (1 / (f + 1) - 1 / (f + 2)) for f in range(3)], [0.6 * (1 / (f + 1) - 1 / (f + 2)) for f in range(3)]]
    assert allocate_by_gain(gains, 1) == [0, 1]
    assert allocate_by_gain(gains, 3) == [1, 2]
    assert allocate_by_gain(gains, 4) == [2, 2]
    assert allocate_by_gain(gains, 5) == [2, 3]
    # No length gets more candidates than it has gains.
    assert allocate_by_gain(gains, 9) == [3, 3]


@pytest.mark.parametrize("exponent", [0.3, 1.0, 3.0])
def test_fit_miss_exponent_recovers_power_law(exponent):
    counts = [p * 500 for p in power_law_rank_probs(15, exponent)]
    assert fit_miss_exponent(counts) == pytest.approx(exponent, rel=1e-3)


def test_fit_miss_exponent_orders_spread_ranks():
    # Always the first candidate: steep. Ranks spread evenly over 0..7: flat.
    steep = fit_miss_exponent([100.0] + [0.0] * 15)
    flat = fit_miss_exponent([10.0] * 8 + [0.0] * 8)
    assert steep > 10.0
    assert flat < 1.0


def test_geometric_policy_prior_by_hand():
    # K = 1, a = 0.6, r = 1 before any measurement: the gains of test_allocate_by_gain_by_hand.
    assert GeometricFanout(k=1, budget=3, acceptance_rate=0.6, miss_exponent=1.0).allocation() == [1, 2]
    assert GeometricFanout(k=1, budget=5, acceptance_rate=0.6, miss_exponent=1.0).allocation() == [2, 3]


def test_model_fanout_with_two_exponents_by_hand():
    # K = 1, a = 0.6, r = 0.5 after a rejection and 3 after full acceptance.
    # j = 0: 0.4 * (1 - 2^-0.5) = 0.1172, 0.4 * (2^-0.5 - 3^-0.5) = 0.0519, 0.4 * (3^-0.5 - 4^-0.5) = 0.0309.
    # j = 1: 0.6 * (1 - 2^-3) = 0.525, 0.6 * (2^-3 - 3^-3) = 0.0528, 0.6 * (3^-3 - 4^-3) = 0.0128.
    assert model_fanout(1, 3, 0.6, 0.5, 3.0) == [1, 2]
    assert model_fanout(1, 4, 0.6, 0.5, 3.0) == [2, 2]
    assert model_fanout(1, 5, 0.6, 0.5, 3.0) == [3, 2]


def test_geometric_policy_measures_acceptance_rate():
    policy = GeometricFanout(k=4, budget=8, acceptance_rate=0.7, miss_exponent=1.0)
    for _ in range(2000):
        # Two of four drafts accepted every step: a = 2 / (2 + 1).
        policy.observe_outcome(2)
    assert policy.acceptance_rate == pytest.approx(2 / 3, abs=0.01)


def test_geometric_policy_fits_exponents_per_outcome_class():
    policy = GeometricFanout(k=4, budget=16, acceptance_rate=0.7, miss_exponent=1.0)
    for i in range(800):
        # After full acceptance the bonus token is the draft's first choice. After a rejection
        # the recovery token is spread over the draft's first eight candidates.
        policy.observe_rank(4, 0)
        policy.observe_rank(0, i % 8)
    rejection, bonus = policy.miss_exponents
    assert bonus > 5.0
    assert rejection < 1.0
    allocation = policy.allocation()
    # A steep bonus law leaves one candidate at j = K, and the rest goes to rejections.
    assert allocation[4] == 1
    assert sum(allocation) == 16


def test_geometric_policy_uncached_ranks_flatten_fit():
    policy = GeometricFanout(k=2, budget=6, acceptance_rate=0.5, miss_exponent=1.0)
    for _ in range(500):
        policy.observe_rank(0, None)
    rejection, bonus = policy.miss_exponents
    assert rejection < 0.2
    assert bonus == pytest.approx(1.0, rel=0.05)
