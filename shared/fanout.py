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
