"""Backup speculation after a cache miss, and the choice between backups.

Three backups exist. ``jit`` requests K tokens from the draft, as SD does, so
the target waits for it. ``ngram`` looks the latest tokens up in the prompt and
the output so far (prompt lookup), which costs nothing but often finds
nothing. ``none`` verifies the root alone, one autoregressive step, while the
draft builds the cache for it with the whole fan-out budget on the next token.
Every backup's tokens go through the same exact acceptance test as cached ones.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from services.verify.scheduler import ForwardCost


def ngram_propose(tokens: list[int], k: int, max_n: int = 4, min_n: int = 2) -> list[int]:
    """Return up to ``k`` tokens that followed the latest earlier occurrence of the last n tokens.

    Tries n = max_n down to min_n and returns the continuation of the first match,
    or an empty list when no suffix of that length occurred before.
    """
    length = len(tokens)
    for n in range(min(max_n, length - 1), min_n - 1, -1):
        suffix = tokens[length - n :]
        # Search right to left so the most recent occurrence wins.
        for start in range(length - n - 1, -1, -1):
            if tokens[start : start + n] == suffix:
                continuation = tokens[start + n : start + n + k]
                if continuation:
                    return continuation
    return []


@dataclass
class Ema:
    value: float
    weight: float = 0.1

    def update(self, sample: float) -> None:
        self.value += self.weight * (sample - self.value)


def jit_cost_prior() -> ForwardCost:
    """Return the fit of a JIT draft's time against the requests drafted together.

    The draft drafts every request of a step in one batched forward per token,
    so one more request adds a row, not a forward. The prior makes each
    request add a tenth of a one-request draft. Before any measurement the
    verifier sets ``default_s`` (see ``VerifyWorker.seed_draft_costs``).
    """
    return ForwardCost(per_token_ratio=0.1, default_s=0.2)


@dataclass
class BackupChooser:
    """Pick the backup with the highest expected tokens per second, from measured times and yields.

    A JIT draft delays every request verified in the same batch. The JIT
    drafts of a step run as one batched draft request, whose time
    ``jit_cost`` fits against the requests in it. N-gram and none cost no
    draft time. Expected committed tokens per step are measured per backup,
    and so is how often a prompt lookup finds a match.
    """

    verify_s: Ema = field(default_factory=lambda: Ema(0.4))
    jit_cost: ForwardCost = field(default_factory=jit_cost_prior)
    tokens: dict[str, Ema] = field(default_factory=lambda: {"jit": Ema(3.0), "ngram": Ema(1.5), "none": Ema(1.0)})
    # Share of prompt lookups after a miss that found an n-gram match.
    ngram_found: Ema = field(default_factory=lambda: Ema(0.3, weight=0.05))

    def observe_verify(self, seconds: float) -> None:
        self.verify_s.update(seconds)

    def observe_jit(self, requests: int, seconds: float) -> None:
        """Record that a batched JIT draft for ``requests`` requests took ``seconds``."""
        self.jit_cost.observe(requests, seconds)

    def observe_tokens(self, kind: str, committed: int) -> None:
        self.tokens[kind].update(float(committed))

    def stall_s(self, kind: str, batch_size: int) -> float:
        """Return how long the batch waits for backup ``kind``, priced as if every request of the batch missed."""
        return self.jit_cost.predict(batch_size) if kind == "jit" else 0.0

    def rate(self, kind: str, batch_size: int) -> float:
        return self.tokens[kind].value / (self.verify_s.value + self.stall_s(kind, batch_size))

    def choose(self, batch_size: int, ngram_found: bool) -> str:
        kinds = ["jit", "none"] + (["ngram"] if ngram_found else [])
        return max(kinds, key=lambda kind: self.rate(kind, batch_size))

    def observe_ngram_lookup(self, found: bool) -> None:
        """Record whether a prompt lookup after a miss found an n-gram match."""
        self.ngram_found.update(1.0 if found else 0.0)

    def miss_outcome(self, batch_size: int, drafted_tokens: float, kind: str | None = None) -> tuple[float, float]:
        """Return the tokens per request that the step after a miss commits, and the batch's wait for the backup in seconds.

        Both are expectations over the backups that can run: ``kind`` is the
        configured backup, or None for the one ``choose`` picks. An n-gram match
        turns up at the measured share of misses, and without one an ``ngram``
        backup verifies the root alone (``none``). A JIT backup commits
        ``drafted_tokens``, the caller's estimate for any drafted step, because its
        drafts come from the same draft as a cache branch's. The JIT tokens
        measured here come only from steps after misses, at the hard spots of a
        text, where any speculation commits fewer.
        """
        found = self.ngram_found.value
        if kind is None:
            options = [(found, self.choose(batch_size, ngram_found=True)), (1.0 - found, self.choose(batch_size, ngram_found=False))]
        elif kind == "ngram":
            options = [(found, "ngram"), (1.0 - found, "none")]
        else:
            options = [(1.0, kind)]
        tokens = sum(share * (drafted_tokens if option == "jit" else self.tokens[option].value) for share, option in options)
        stall = sum(share * self.stall_s(option, batch_size) for share, option in options)
        return tokens, stall
