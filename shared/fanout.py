"""Fan-out: how many candidate tokens the draft caches per acceptance length.

With per-token acceptance rate a and K drafts, the number of accepted drafts j
is roughly capped-geometric: P(j) = a^j (1 - a) for j < K and P(K) = a^K. If the
chance that the committed token lies outside the draft's top F candidates
falls like F^-r, the expected hit rate under a budget sum(f_j) = B is
maximised by f_j proportional to P(j)^(1 / (1 + r)). ``geometric_fanout``
computes that allocation and rounds it to integers that sum to B.
"""

from __future__ import annotations

import math


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
        row = self.ranks[accepted]
        for f in range(len(row)):
            row[f] *= self.decay
        row[self.max_rank if rank is None else min(rank, self.max_rank)] += 1.0

    def allocation(self) -> list[int]:
        total_outcomes = sum(self.outcomes)
        counts = [0] * (self.k + 1)
        gains = []
        for j in range(self.k + 1):
            p_j = self.outcomes[j] / total_outcomes
            row_total = sum(self.ranks[j])
            gains.append([p_j * self.ranks[j][f] / row_total for f in range(self.max_rank)])
        for _ in range(self.budget):
            best = max(range(self.k + 1), key=lambda j: gains[j][counts[j]] if counts[j] < self.max_rank else -1.0)
            if counts[best] >= self.max_rank:
                break
            counts[best] += 1
        return counts
