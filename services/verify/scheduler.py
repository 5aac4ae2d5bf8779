"""How many draft tokens a batched verification step checks per request.

Every running request shares one target forward per step. Its cost grows with
the tokens in the batch: on a CPU a forward is mostly weight reads plus a
per-token part, so the verifier fits ``t(N) = base + per_token * N`` online
to the measured forward times. With per-token acceptance rate a, verifying k
drafts commits ``E(k) = (1 - a^(k+1)) / (1 - a)`` tokens per request, so a
batch of b requests yields ``b * E(k) / t(b * (k + 1))`` tokens per second.
The verifier checks the k in 0..K with the highest rate. When the batch grows
large enough that the extra tokens cost more than they commit, k falls, down
to plain one-token steps, and it rises again as soon as the fit predicts a gain.
The limit is recomputed every step from smoothed measurements and changes only
when another count is predicted faster by more than 2%, so it neither waits
for a timer nor flips back and forth on near-ties.

Each step also takes one of three kinds (``choose_step_kind``). A ``cache``
step (SSD) asks the draft to build the caches of the whole batch while the
target verifies, so it lasts as long as the slower of the two. A ``jit``
step (SD) drafts for the whole batch after the verification, in one batched
draft request, so the two times add up. A ``plain`` step verifies one token
per request and needs no draft. The build and the JIT draft times are fitted
against the batch size like the forward. With the int8 Qwen2.5-Coder-0.5B
draft on one core of a 2-core Xeon VM, the cache build grew about as fast as
the batch while a JIT draft barely grew, so SSD used caches for 1 or 2
requests and JIT drafts for 4 to 8 (``python -m bench.concurrency``). The
kind changes only when another is predicted faster by 5%.
"""

from __future__ import annotations

import math
from dataclasses import dataclass


@dataclass
class ForwardCost:
    """Online least-squares fit of target forward time against the tokens in the forward.

    While every forward has about the same size the data cannot give the slope,
    so a prior does: one more token costs ``per_token_ratio`` of a one-token
    forward. The default 0.025 matches a 1.5B bf16 model on one CPU core (375 ms
    plus about 10 ms per token) and is only an estimate for other hardware. The prior weighs as much
    as ``prior_weight`` measurements spread over +-10 tokens, so forwards of
    varied sizes soon override it. ``decay`` down-weights old measurements.

    With ``chunk_tokens`` set, a forward over N tokens runs its linear layers in
    ceil(N / chunk_tokens) chunks, each reading the weights again (see
    ``shared.row_attention.invariant_linear``). The fit is then per chunk:
    ``t(N) = chunks * base + per_token * N``.
    """

    per_token_ratio: float = 0.025
    prior_weight: float = 4.0
    decay: float = 0.98
    # Predicted one-token forward before any measurement, seconds.
    default_s: float = 0.4
    chunk_tokens: int | None = None

    def __post_init__(self) -> None:
        self.weight = 0.0
        self.sum_n = 0.0
        self.sum_t = 0.0
        self.sum_nn = 0.0
        self.sum_nt = 0.0

    def chunks(self, tokens: float) -> int:
        """Return how many weight passes a forward over ``tokens`` tokens makes."""
        if not self.chunk_tokens or tokens <= self.chunk_tokens:
            return 1
        return math.ceil(tokens / self.chunk_tokens)

    def observe(self, tokens: float, seconds: float) -> None:
        chunks = self.chunks(tokens)
        tokens, seconds = tokens / chunks, seconds / chunks
        self.weight = self.weight * self.decay + 1.0
        self.sum_n = self.sum_n * self.decay + tokens
        self.sum_t = self.sum_t * self.decay + seconds
        self.sum_nn = self.sum_nn * self.decay + tokens * tokens
        self.sum_nt = self.sum_nt * self.decay + tokens * seconds

    def coefficients(self) -> tuple[float, float]:
        """Return (base seconds, seconds per token) of the current fit; the slope is kept >= 0."""
        ratio = self.per_token_ratio
        if self.weight == 0.0:
            return self.default_s / (1.0 + ratio), self.default_s * ratio / (1.0 + ratio)
        mean_n = self.sum_n / self.weight
        mean_t = self.sum_t / self.weight
        variance = max(0.0, self.sum_nn / self.weight - mean_n * mean_n)
        covariance = self.sum_nt / self.weight - mean_n * mean_t
        prior_slope = ratio * mean_t / (1.0 + ratio * mean_n)
        prior = self.prior_weight * 100.0
        slope = max(0.0, (self.weight * covariance + prior * prior_slope) / (self.weight * variance + prior))
        return max(1e-4, mean_t - slope * mean_n), slope

    def predict(self, tokens: int) -> float:
        base, slope = self.coefficients()
        return self.chunks(tokens) * base + slope * tokens


def expected_committed(acceptance_rate: float, drafts: int) -> float:
    """Return the expected tokens one step commits with ``drafts`` drafts under the capped geometric model."""
    a = min(max(acceptance_rate, 0.0), 0.999)
    return (1.0 - a ** (drafts + 1)) / (1.0 - a)


def best_num_drafts(batch_size: int, max_drafts: int, acceptance_rate: float, cost: ForwardCost, current: int | None = None, margin: float = 0.02) -> int:
    """Return the draft count in 0..max_drafts with the highest predicted batch throughput.

    The ``current`` count stays unless another is predicted faster by more than
    ``margin``, so near-ties do not flip the count every step.
    """
    rates = [batch_size * expected_committed(acceptance_rate, drafts) / cost.predict(batch_size * (drafts + 1)) for drafts in range(max_drafts + 1)]
    # Ties go to more drafts: they also feed the acceptance statistics.
    best = max(range(max_drafts + 1), key=lambda drafts: (rates[drafts], drafts))
    if current is not None and 0 <= current <= max_drafts and rates[current] >= (1.0 - margin) * rates[best]:
        return current
    return best


STEP_KINDS = ("cache", "jit", "plain")


def step_rates(
    batch_size: int,
    drafts: int,
    acceptance_rate: float,
    hit_rate: float,
    verify_cost: ForwardCost,
    build_cost: ForwardCost,
    jit_cost: ForwardCost,
    kinds: tuple[str, ...] = STEP_KINDS,
    miss_tokens: float | None = None,
    miss_stall_s: float = 0.0,
) -> dict[str, float]:
    """Return the predicted tokens per second of each step kind in ``kinds`` at this batch size.

    A cache step commits E(drafts) tokens per request on a hit. After a miss
    it commits ``miss_tokens``, or E(drafts) when that is None: a JIT backup
    drafts from the same draft model as a cache branch, so its drafts are
    accepted as often. The backup delays the whole batch by ``miss_stall_s``
    whenever any of its requests misses (probability 1 - hit_rate^batch_size).
    A cache step lasts max(verify, build) plus that delay. A JIT step commits
    E(drafts) and lasts verify + JIT draft. A plain step commits one token per
    request in a one-token-per-request forward. Kinds that need drafts are left
    out when ``drafts`` is 0.
    """
    rates = {}
    if drafts > 0:
        verify = verify_cost.predict(batch_size * (drafts + 1))
        per_request = expected_committed(acceptance_rate, drafts)
        if "cache" in kinds:
            after_miss = per_request if miss_tokens is None else miss_tokens
            on_cache = batch_size * (hit_rate * per_request + (1.0 - hit_rate) * after_miss)
            stall = (1.0 - hit_rate**batch_size) * miss_stall_s
            rates["cache"] = on_cache / (max(verify, build_cost.predict(batch_size)) + stall)
        if "jit" in kinds:
            rates["jit"] = batch_size * per_request / (verify + jit_cost.predict(batch_size))
    rates["plain"] = batch_size / verify_cost.predict(batch_size)
    return rates


def choose_step_kind(rates: dict[str, float], current: str, margin: float = 0.05) -> str:
    """Return the kind with the highest rate, keeping ``current`` unless another beats it by ``margin``."""
    best = max(rates, key=lambda kind: (rates[kind], -STEP_KINDS.index(kind)))
    if current in rates and rates[current] * (1.0 + margin) >= rates[best]:
        return current
    return best
