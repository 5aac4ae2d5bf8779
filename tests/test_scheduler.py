"""Batch-size back-off: the forward-cost fit and the choice of drafts per request."""

import math

import pytest

from services.verify.scheduler import ForwardCost, best_num_drafts, choose_step_kind, expected_committed, step_rates


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


def test_chunked_cost_fit_by_hand():
    # Linear layers in chunks of at most 32 tokens: 40 tokens take two weight passes of 0.3 s.
    cost = ForwardCost(per_token_ratio=0.0, prior_weight=0.01, chunk_tokens=32)
    for tokens in (1, 5, 20, 32, 40, 64) * 20:
        cost.observe(tokens, 0.3 * math.ceil(tokens / 32) + 0.001 * tokens)
    assert cost.chunks(32) == 1
    assert cost.chunks(33) == 2
    assert cost.predict(32) == pytest.approx(0.332, abs=0.002)
    assert cost.predict(40) == pytest.approx(0.64, abs=0.002)


def test_chunked_cost_keeps_drafts_in_one_pass():
    # With K = 4 at batch 8 (40 tokens) a second pass costs more than the fourth drafts commit.
    cost = ForwardCost(chunk_tokens=32)
    for _ in range(100):
        cost.observe(8 * 5, 0.7)
        cost.observe(8, 0.34)
    assert best_num_drafts(8, 4, 0.8, cost) == 3
    assert best_num_drafts(1, 4, 0.8, cost) == 4


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


def measured_draft_costs() -> tuple[ForwardCost, ForwardCost]:
    """Return (cache build, JIT draft) fits of a draft whose builds grow with the batch and whose JIT drafts barely do."""
    builds = ForwardCost(per_token_ratio=0.5, prior_weight=0.01)
    jits = ForwardCost(per_token_ratio=0.1, prior_weight=0.01)
    for batch in (1, 4, 8) * 20:
        builds.observe(batch, 0.5 * (1 + 0.5 * (batch - 1)))
        jits.observe(batch, 0.25 + 0.15 * (batch - 1) / 7)
    return builds, jits


def test_step_rates_by_hand():
    builds, jits = measured_draft_costs()
    verify = cost_of(0.375, 0.01)
    committed = expected_committed(0.8, 4)  # 3.3616 tokens per request
    rates = step_rates(8, 4, 0.8, 0.8, verify, builds, jits, miss_tokens=1.0)
    # Batch 8: a 40-token forward of 0.775 s; builds of 2.25 s; JIT drafts of 0.4 s.
    assert rates["cache"] == pytest.approx((8 * 0.8 * committed + 8 * 0.2) / 2.25, rel=1e-3)
    assert rates["jit"] == pytest.approx(8 * committed / (0.775 + 0.4), rel=1e-3)
    assert rates["plain"] == pytest.approx(8 / 0.455, rel=1e-3)
    rates = step_rates(1, 4, 0.8, 0.8, verify, builds, jits, miss_tokens=1.0)
    assert rates["cache"] == pytest.approx((0.8 * committed + 0.2) / 0.5, rel=1e-3)
    assert rates["jit"] == pytest.approx(committed / (0.425 + 0.25), rel=1e-3)
    # Without miss_tokens a miss's JIT backup commits E(4), like any drafted step.
    rates = step_rates(1, 4, 0.8, 0.8, verify, builds, jits, miss_stall_s=0.25)
    assert rates["cache"] == pytest.approx(committed / (0.5 + 0.2 * 0.25), rel=1e-3)


def test_cache_rate_counts_backup_stalls():
    builds, jits = measured_draft_costs()
    verify = cost_of(0.375, 0.01)
    committed = expected_committed(0.8, 4)
    # JIT backups: a miss commits a full speculation, but some request of 4 misses with probability 1 - 0.8^4.
    rates = step_rates(4, 4, 0.8, 0.8, verify, builds, jits, miss_stall_s=0.3)
    step_s = max(verify.predict(20), builds.predict(4)) + (1 - 0.8**4) * 0.3
    assert rates["cache"] == pytest.approx(4 * committed / step_s, rel=1e-3)
    assert rates["jit"] == pytest.approx(4 * committed / (verify.predict(20) + jits.predict(4)), rel=1e-3)


def test_step_kind_by_batch_size():
    builds, jits = measured_draft_costs()
    verify = cost_of(0.375, 0.01)
    assert choose_step_kind(step_rates(1, 4, 0.8, 0.8, verify, builds, jits), "jit") == "cache"
    assert choose_step_kind(step_rates(8, 4, 0.8, 0.8, verify, builds, jits), "cache") == "jit"
    # SD mode offers no cache steps.
    assert choose_step_kind(step_rates(1, 4, 0.8, 0.8, verify, builds, jits, kinds=("jit", "plain")), "jit") == "jit"


def test_plain_steps_at_low_acceptance():
    builds, jits = measured_draft_costs()
    verify = cost_of(0.375, 0.01)
    # At acceptance rate 0.1 a step commits 1.11 tokens per request: not worth a draft.
    assert choose_step_kind(step_rates(8, 4, 0.1, 0.8, verify, builds, jits), "cache") == "plain"
    assert step_rates(8, 0, 0.8, 0.8, verify, builds, jits) == {"plain": pytest.approx(8 / 0.455, rel=1e-3)}


def test_cache_beats_jit_when_build_fits():
    """With the build inside the verify, a cache step is never slower than a JIT step at any hit rate above 0."""
    verify = cost_of(0.4, 0.005)
    builds = ForwardCost(default_s=0.26)
    jits = ForwardCost(default_s=0.24)
    for hit_rate in (0.05, 0.4, 0.73, 0.95):
        rates = step_rates(1, 4, 0.85, hit_rate, verify, builds, jits, miss_stall_s=jits.predict(1))
        assert rates["cache"] > rates["jit"], f"hit rate {hit_rate}"


def test_step_kind_holds_within_the_margin():
    assert choose_step_kind({"cache": 1.0, "jit": 1.04, "plain": 0.5}, "cache") == "cache"
    assert choose_step_kind({"cache": 1.0, "jit": 1.06, "plain": 0.5}, "cache") == "jit"
    assert choose_step_kind({"cache": 1.0, "jit": 1.0, "plain": 1.0}, "missing") == "cache"


def test_priors_pick_jit_at_batch_eight():
    # The verifier's priors before any draft measurement: a one-request build or JIT draft lasts one 5-token verify.
    verify = cost_of(0.375, 0.01)
    one_request = verify.predict(5)
    builds = ForwardCost(per_token_ratio=1.0, default_s=one_request)
    jits = ForwardCost(per_token_ratio=0.1, default_s=one_request)
    assert builds.predict(8) == pytest.approx(one_request * 4.5)
    assert choose_step_kind(step_rates(8, 4, 0.8, 0.75, verify, builds, jits), "cache") == "jit"
    assert choose_step_kind(step_rates(1, 4, 0.8, 0.75, verify, builds, jits), "cache") == "cache"
