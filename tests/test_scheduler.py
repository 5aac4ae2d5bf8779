"""Batch-size back-off: the forward-cost fit and the choice of drafts per request."""

import pytest

from services.verify.scheduler import ForwardCost, best_num_drafts, expected_committed, speculation_pays


def test_expected_committed_by_hand():
    # a = 0.5, 2 drafts: 1 + 0.5 + 0.25.
    assert expected_committed(0.5, 2) == pytest.approx(1.75)
    assert expected_committed(0.5, 0) == pytest.approx(1.0)


def test_cost_fit_recovers_a_line():
    cost = ForwardCost(per_token_ratio=0.0, prior_weight=0.01)
    for tokens in (1, 5, 10, 20, 40) * 20:
        cost.observe(tokens, 0.3 + 0.02 * tokens)
    base, per_token = cost.coefficients()
    assert base == pytest.approx(0.3, abs=0.01)
    assert per_token == pytest.approx(0.02, abs=0.001)


def test_cost_keeps_prior_ratio_for_one_size():
    cost = ForwardCost(per_token_ratio=0.025)
    for _ in range(200):
        cost.observe(5, 0.45)
    assert cost.predict(5) == pytest.approx(0.45, abs=0.001)
    # One token costs 1.025 / 1.125 of five under the prior ratio, at any time scale.
    assert cost.predict(1) == pytest.approx(0.45 * 1.025 / 1.125, abs=0.001)
    tiny = ForwardCost(per_token_ratio=0.025)
    for _ in range(200):
        tiny.observe(5, 0.002)
    assert tiny.predict(1) / tiny.predict(5) == pytest.approx(1.025 / 1.125, abs=0.001)


def test_cost_before_measurements():
    assert ForwardCost(default_s=0.4).predict(1) == pytest.approx(0.4)


def cost_of(base: float, per_token: float) -> ForwardCost:
    cost = ForwardCost(prior_weight=0.01)
    for tokens in (1, 8, 16, 64, 128) * 20:
        cost.observe(tokens, base + per_token * tokens)
    return cost


def test_full_speculation_with_the_prior_alone():
    assert best_num_drafts(1, 4, 0.8, ForwardCost()) == 4
    assert best_num_drafts(8, 4, 0.8, ForwardCost()) == 4


def test_full_speculation_when_weights_dominate():
    # A CPU-like cost: 375 ms base, 10 ms per token.
    assert best_num_drafts(1, 4, 0.8, cost_of(0.375, 0.01)) == 4
    assert best_num_drafts(8, 4, 0.8, cost_of(0.375, 0.01)) == 4


def test_backs_off_as_the_batch_grows():
    cost = cost_of(0.05, 0.01)
    limits = [best_num_drafts(batch, 4, 0.6, cost) for batch in (1, 4, 16, 64)]
    # Batch 1 by hand: rates 16.7, 22.9, 24.5, 24.2, 23.1 tokens/s for 0..4 drafts.
    assert limits[0] == 2
    assert limits[-1] == 0
    assert limits == sorted(limits, reverse=True)


def test_comes_back_when_acceptance_rises():
    cost = cost_of(0.05, 0.01)
    assert best_num_drafts(16, 4, 0.3, cost) < best_num_drafts(16, 4, 0.9, cost)


def test_current_count_survives_near_ties():
    cost = cost_of(0.002, 0.0001)
    best = best_num_drafts(1, 4, 0.2, cost)
    for current in range(5):
        kept = best_num_drafts(1, 4, 0.2, cost, current=current, margin=0.5)
        assert kept == current
    assert best_num_drafts(1, 4, 0.2, cost, current=0, margin=0.0) == best


def test_speculation_pauses_when_builds_dominate():
    verify = cost_of(0.375, 0.01)
    builds = ForwardCost(per_token_ratio=0.5, prior_weight=0.01)
    for batch in (1, 4, 8) * 20:
        builds.observe(batch, 0.5 * (1 + 0.5 * (batch - 1)))
    # Batch 8: builds take 2.25 s, so 8 x 3.36 tokens per 2.25 s lose to 8 one-token forwards in 0.455 s.
    assert not speculation_pays(8, 4, 0.8, verify, builds, speculating=True)
    assert speculation_pays(1, 4, 0.8, verify, builds, speculating=False)


def test_speculation_before_any_build_measurement():
    assert speculation_pays(8, 4, 0.8, cost_of(0.375, 0.01), ForwardCost(per_token_ratio=0.5, default_s=0.0), speculating=True)
    assert not speculation_pays(8, 0, 0.8, cost_of(0.375, 0.01), ForwardCost(), speculating=True)
