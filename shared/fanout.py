"""Fan-out: how many candidate tokens the draft caches per acceptance length.

With per-token acceptance rate a and K drafts, the number of accepted drafts j
is roughly capped-geometric: P(j) = a^j (1 - a) for j < K and P(K) = a^K. If the
chance that the committed token lies outside the draft's top F candidates
falls like F^-r, the expected hit rate under a budget sum(f_j) = B is
maximised by f_j proportional to P(j)^(1 / (1 + r)). ``geometric_fanout``
computes that allocation and rounds it to integers that sum to B.

Two policies measure their inputs online: ``GeometricFanout`` fits a and r
(one r after a rejection, one after full acceptance) and allocates under that
model. ``AdaptiveFanout`` allocates from the measured frequencies themselves.
"""

from __future__ import annotations

import math

# Rank observations between two fits of a GeometricFanout's miss exponents.
REFIT_EVERY = 4


def acceptance_length_probs(k: int, acceptance_rate: float) -> list[float]:
    """Return P(j) for j = 0..k under the capped geometric model."""
    a = acceptance_rate
    probs = [a**j * (1.0 - a) for j in range(k)]
    probs.append(a**k)
    return probs


def round_to_budget(weights: list[float], budget: int) -> list[int]:
    """Scale ``weights`` to sum to ``budget`` and round by largest remainder."""
    total = sum(weights)
    if total <= 0.0:
        raise ValueError("fan-out weights must have a positive sum")
    exact = [w * budget / total for w in weights]
    counts = [math.floor(x) for x in exact]
    remaining = budget - sum(counts)
    by_remainder = sorted(range(len(exact)), key=lambda i: exact[i] - counts[i], reverse=True)
    for i in by_remainder[:remaining]:
        counts[i] += 1
    return counts


def geometric_fanout(k: int, budget: int, acceptance_rate: float, miss_exponent: float) -> list[int]:
    """Return f_0..f_K summing to ``budget`` with f_j proportional to P(j)^(1/(1+r))."""
    if not 0.0 < acceptance_rate < 1.0:
        raise ValueError(f"acceptance_rate must be in (0, 1), got {acceptance_rate}")
    if miss_exponent <= 0.0:
        raise ValueError(f"miss_exponent must be > 0, got {miss_exponent}")
    power = 1.0 / (1.0 + miss_exponent)
    weights = [p**power for p in acceptance_length_probs(k, acceptance_rate)]
    return round_to_budget(weights, budget)


def uniform_fanout(k: int, budget: int) -> list[int]:
    """Return the budget spread as evenly as possible over the K + 1 acceptance lengths."""
    return round_to_budget([1.0] * (k + 1), budget)


def power_law_rank_probs(max_rank: int, miss_exponent: float) -> list[float]:
    """Return P(rank = f) for f = 0..max_rank - 1 and, last, P(rank >= max_rank).

    Model: the committed token lies outside the top F candidates with probability (F + 1)^-r.
    """
    miss = [(f + 1) ** -miss_exponent for f in range(max_rank + 1)]
    probs = [miss[f] - miss[f + 1] for f in range(max_rank)]
    probs.append(miss[max_rank])
    return probs


class AcceptanceEstimate:
    """Decaying estimate of the per-token acceptance rate a under the capped geometric model."""

    def __init__(self, prior: float, decay: float = 0.98, prior_weight: float = 5.0):
        self.decay = decay
        self.accepted = prior * prior_weight
        self.rejected = (1.0 - prior) * prior_weight

    def observe(self, accepted: int, drafted: int) -> None:
        self.accepted = self.accepted * self.decay + accepted
        self.rejected = self.rejected * self.decay + (1 if accepted < drafted else 0)

    @property
    def rate(self) -> float:
        return min(0.95, max(0.05, self.accepted / (self.accepted + self.rejected)))


def add_decayed(row: list[float], index: int, decay: float) -> None:
    """Multiply every count in ``row`` by ``decay``, then add one observation at ``index``."""
    for i in range(len(row)):
        row[i] *= decay
    row[index] += 1.0


def allocate_by_gain(gains: list[list[float]], budget: int) -> list[int]:
    """Spend ``budget`` candidates one at a time on the largest marginal gain.

    ``gains[j][f]`` is the hit probability that an (f + 1)-th candidate at
    acceptance length j adds. Where each row decreases, as under the models
    here, this greedy order yields the integer allocation with the most
    expected hits. A length gets at most ``len(gains[j])`` candidates.
    """
    counts = [0] * len(gains)
    for _ in range(budget):
        best = max(range(len(gains)), key=lambda j: gains[j][counts[j]] if counts[j] < len(gains[j]) else -1.0)
        if counts[best] >= len(gains[best]):
            break
        counts[best] += 1
    return counts


def rank_log_likelihood(counts: list[float], miss_exponent: float) -> float:
    """Return the log-likelihood of rank ``counts`` under ``power_law_rank_probs`` (last bin: not among the candidates)."""
    probs = power_law_rank_probs(len(counts) - 1, miss_exponent)
    return sum(count * math.log(max(p, 1e-300)) for count, p in zip(counts, probs) if count > 0.0)


def fit_miss_exponent(counts: list[float], lower: float = 0.05, upper: float = 20.0) -> float:
    """Return the maximum-likelihood r for rank ``counts``, searched on a log scale in [lower, upper].

    ``counts[f]`` is how often the committed token had rank f among the draft's
    candidates; the last entry counts the times it was not among them.
    """
    low, high = math.log(lower), math.log(upper)
    # A coarse grid picks the start, so the refinement is less likely to stop at a local maximum.
    grid = [low + (high - low) * i / 32 for i in range(33)]
    best = max(grid, key=lambda x: rank_log_likelihood(counts, math.exp(x)))
    step = (high - low) / 32
    a, b = max(low, best - step), min(high, best + step)
    ratio = (math.sqrt(5.0) - 1.0) / 2.0
    for _ in range(30):
        c = b - ratio * (b - a)
        d = a + ratio * (b - a)
        if rank_log_likelihood(counts, math.exp(c)) >= rank_log_likelihood(counts, math.exp(d)):
            b = d
        else:
            a = c
    return math.exp((a + b) / 2.0)


def model_fanout(k: int, budget: int, acceptance_rate: float, rejection_exponent: float, bonus_exponent: float, max_rank: int = 15) -> list[int]:
    """Return the integer f_0..f_K that maximise sum_j P(j) (1 - (f_j + 1)^-r_j) under ``budget``.

    P(j) is the capped geometric law; r_j is ``bonus_exponent`` for j = K and
    ``rejection_exponent`` otherwise. No length gets more than ``max_rank``.
    """
    gains = []
    for j, p_j in enumerate(acceptance_length_probs(k, acceptance_rate)):
        r = bonus_exponent if j == k else rejection_exponent
        gains.append([p_j * ((f + 1) ** -r - (f + 2) ** -r) for f in range(max_rank)])
    return allocate_by_gain(gains, budget)


class GeometricFanout:
    """Fan-out from the capped geometric model with its parameters measured online.

    The acceptance rate a comes from decayed counts of accepted and rejected
    drafts. The miss law P(rank >= F) = (F + 1)^-r is fitted by maximum
    likelihood to decayed counts of the committed token's rank, with one
    exponent for the recovery token after a rejection (j < K) and one for the
    bonus token (j = K): the recovery token is drawn from what the target wants
    and the draft did not propose, so its rank spreads wider. The allocation
    maximises the expected hit rate sum_j P(j) (1 - (f_j + 1)^-r_j) under the
    budget. With one exponent its continuous relaxation gives
    f_j + 1 proportional to P(j)^(1/(1+r)), the rule of ``geometric_fanout``
    up to the +1. Counts start from the priors, weighted as ``prior_weight``
    observations.
    """

    def __init__(self, k: int, budget: int, acceptance_rate: float, miss_exponent: float, max_rank: int = 15, decay: float = 0.995, prior_weight: float = 20.0):
        self.k = k
        self.budget = budget
        self.max_rank = max_rank
        self.decay = decay
        self.acceptance = AcceptanceEstimate(acceptance_rate, decay, prior_weight)
        rank_prior = power_law_rank_probs(max_rank, miss_exponent)
        # Rank counts after a rejection, then after full acceptance.
        self.ranks = [[p * prior_weight for p in rank_prior] for _ in range(2)]
        self._exponents = (miss_exponent, miss_exponent)
        self._unfitted = 0

    def observe_outcome(self, accepted: int) -> None:
        self.acceptance.observe(accepted, self.k)

    def observe_rank(self, accepted: int, rank: int | None) -> None:
        """Record the committed token's rank among the candidates for ``accepted`` (None: not among them)."""
        row = self.ranks[1 if accepted == self.k else 0]
        add_decayed(row, self.max_rank if rank is None else min(rank, self.max_rank), self.decay)
        self._unfitted += 1

    @property
    def acceptance_rate(self) -> float:
        return self.acceptance.rate

    @property
    def miss_exponents(self) -> tuple[float, float]:
        """The fitted r after a rejection and after full acceptance."""
        # A fit takes about a millisecond of the verifier's time, so it runs every few ranks.
        if self._unfitted >= REFIT_EVERY:
            self._exponents = (fit_miss_exponent(self.ranks[0]), fit_miss_exponent(self.ranks[1]))
            self._unfitted = 0
        return self._exponents

    def allocation(self) -> list[int]:
        rejection, bonus = self.miss_exponents
        return model_fanout(self.k, self.budget, self.acceptance_rate, rejection, bonus, self.max_rank)

    def describe(self) -> str:
        rejection, bonus = self.miss_exponents
        return f"acceptance rate {self.acceptance_rate:.2f}, miss exponent {rejection:.2f} after a rejection and {bonus:.2f} after full acceptance"


class AdaptiveFanout:
    """Fan-out from measured frequencies of acceptance lengths and candidate ranks.

    For each acceptance length j the policy keeps decayed counts of how often
    a step ended with j accepted drafts, and of the rank of the committed token
    among the draft's candidates for j. Adding a (f + 1)-th candidate at j wins
    a hit with probability P(j) * P(rank = f | j), so the budget goes, one
    candidate at a time, to the largest such gain. The counts start from the
    capped geometric model for acceptance and the power-law model for ranks,
    weighted as ``prior_weight`` observations, so the first allocations are the
    geometric ones and measurements take over as they accumulate.
    """

    def __init__(self, k: int, budget: int, acceptance_rate: float, miss_exponent: float, max_rank: int = 15, decay: float = 0.995, prior_weight: float = 20.0):
        self.k = k
        self.budget = budget
        self.max_rank = max_rank
        self.decay = decay
        rank_prior = power_law_rank_probs(max_rank, miss_exponent)
        self.outcomes = [p * prior_weight for p in acceptance_length_probs(k, acceptance_rate)]
        self.ranks = [[p * prior_weight for p in rank_prior] for _ in range(k + 1)]

    def observe_outcome(self, accepted: int) -> None:
        self.outcomes = [count * self.decay for count in self.outcomes]
        self.outcomes[accepted] += 1.0

    def observe_rank(self, accepted: int, rank: int | None) -> None:
        """Record the committed token's rank among the candidates for ``accepted`` (None: not among them)."""
        add_decayed(self.ranks[accepted], self.max_rank if rank is None else min(rank, self.max_rank), self.decay)

    def allocation(self) -> list[int]:
        total_outcomes = sum(self.outcomes)
        gains = []
        for j in range(self.k + 1):
            p_j = self.outcomes[j] / total_outcomes
            row_total = sum(self.ranks[j])
            gains.append([p_j * self.ranks[j][f] / row_total for f in range(self.max_rank)])
        return allocate_by_gain(gains, self.budget)

    def describe(self) -> str:
        total_outcomes = sum(self.outcomes)
        shares = ", ".join(f"{count / total_outcomes:.2f}" for count in self.outcomes)
        return f"acceptance-length shares {shares}"
