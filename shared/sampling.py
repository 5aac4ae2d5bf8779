"""Sampling and exact acceptance, shared by the verify service and the tests.

Notation: ``p`` is the target distribution, ``q`` the draft distribution.

Verification uses coupled sampling. The token the target commits at absolute
sequence position ``n`` is ``x_n = argmax(log p_n + g_n)``, where ``p_n`` is the
target's distribution after temperature, top-k and top-p, and ``g_n`` is Gumbel
noise drawn from a generator seeded by ``(seed, n)`` alone. By the Gumbel-max
identity ``x_n`` is an exact sample of ``p_n``. A draft token ``s`` at that
position is accepted iff ``s == x_n``, which happens with probability
``p_n(s)``; on rejection the committed token is ``x_n`` given ``x_n != s``,
that is ``p_n`` with ``s`` removed and renormalised. This is the one-hot
variant of speculative sampling (the draft proposes its argmax, so ``q`` is
one-hot), and it is exact for any proposal that does not look at the noise.
Because the noise depends only on the seed and the position, a request's
output is the same in AR, SD and SSD mode and with any speculation, hit or
miss. At temperature 0, ``x_n`` is the target's argmax.

The rejection path (``verify_with_proposals``) is standard speculative
sampling: the draft samples each token from a proposal distribution q that it
sends along (see ``proposal_distributions``), the verifier accepts token s with
probability min(1, p(s) / q(s)) and on rejection draws the committed token
from normalise(max(0, p - q)). It exists for Saguaro sampling, which reshapes
q so that rejected positions land on the tokens the draft cached. Its uniforms
come from their own (seed, position) streams, so each is used at most once: a
position is tested only while every earlier one was accepted, and a tested
position is committed.
"""

from __future__ import annotations

import torch

from shared.protocol import SamplingParams

from shared.protocol import Proposal, ProposalParams

_SEED_MIX = 0x9E3779B97F4A7C15
_MASK63 = (1 << 63) - 1
# Independent random streams per (seed, position).
STREAM_TARGET = 0
STREAM_DRAFT = 1
STREAM_ACCEPT = 2
STREAM_RESIDUAL = 3


def process_logits(logits: torch.Tensor, params: SamplingParams) -> torch.Tensor:
    """Apply temperature, top-k and top-p to ``logits`` [N, V]; excluded tokens get -inf.

    Returns float32 log-weights whose softmax is the sampling distribution p.
    Temperature 0 returns the logits unchanged (greedy decoding takes their argmax).
    """
    logits = logits.float()
    if params.temperature == 0.0:
        return logits
    logits = logits / params.temperature
    vocab = logits.shape[-1]
    if 0 < params.top_k < vocab:
        kth = torch.topk(logits, params.top_k, dim=-1).values[..., -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if params.top_p < 1.0:
        sorted_logits, order = torch.sort(logits, dim=-1, descending=True)
        probs = torch.softmax(sorted_logits, dim=-1)
        # Mass of the tokens ranked strictly above each token; a token is kept
        # while that mass is below top_p, so the token that crosses top_p stays.
        mass_before = torch.cumsum(probs, dim=-1) - probs
        drop_sorted = mass_before >= params.top_p
        drop = torch.zeros_like(drop_sorted).scatter(-1, order, drop_sorted)
        logits = logits.masked_fill(drop, float("-inf"))
    return logits


def _generator(seed: int, position: int, stream: int) -> torch.Generator:
    generator = torch.Generator(device="cpu")
    generator.manual_seed(((seed * _SEED_MIX) ^ (position + 1) * 0xBF58476D1CE4E5B9 ^ stream * 0x94D049BB133111EB) & _MASK63)
    return generator


def position_uniform(seed: int, position: int, stream: int) -> float:
    """Return one uniform in [0, 1) of ``stream``, a pure function of (seed, position, stream)."""
    return float(torch.rand(1, generator=_generator(seed, position, stream), dtype=torch.float64))


def position_noise(seed: int, position: int, vocab_size: int, stream: int = STREAM_TARGET) -> torch.Tensor:
    """Return Gumbel noise [vocab_size] for one sequence position, a pure function of (seed, position, stream)."""
    uniform = torch.rand(vocab_size, generator=_generator(seed, position, stream), dtype=torch.float64)
    uniform = uniform.clamp_(min=1e-300, max=1.0 - 1e-16)
    return -torch.log(-torch.log(uniform))


def sample_positions(logits: torch.Tensor, params: SamplingParams, positions: list[int]) -> list[int]:
    """Return the token the target commits at each of ``positions`` given ``logits`` [N, V] for them."""
    if params.temperature == 0.0:
        return torch.argmax(logits, dim=-1).tolist()
    weights = process_logits(logits, params).double()
    tokens = []
    for row, position in enumerate(positions):
        noise = position_noise(params.seed, position, weights.shape[-1])
        tokens.append(int(torch.argmax(weights[row] + noise)))
    return tokens


def accept_prefix(target_tokens: list[int], draft_tokens: list[int]) -> int:
    """Return j, the number of leading draft tokens equal to the target's tokens at the same positions.

    ``target_tokens`` has one entry more than ``draft_tokens``: entry i is what the
    target commits after the root and the first i drafts. The step commits
    ``draft_tokens[:j] + [target_tokens[j]]``.
    """
    accepted = 0
    for draft, target in zip(draft_tokens, target_tokens):
        if draft != target:
            break
        accepted += 1
    return accepted


def rejection_sample(p: torch.Tensor, q: torch.Tensor, draft_token: int, uniform: float, residual_uniform: float) -> tuple[bool, int]:
    """Run the standard speculative-sampling test for one position with full distributions.

    ``p`` and ``q`` are probability vectors [V]; ``draft_token`` was sampled from ``q``.
    Accepts with probability min(1, p/q); on rejection returns a sample of
    normalize(max(0, p - q)) drawn by inverse CDF with ``residual_uniform``.
    Returns (accepted, token).
    """
    ratio = float(p[draft_token]) / max(float(q[draft_token]), 1e-30)
    if uniform < min(1.0, ratio):
        return True, draft_token
    residual = torch.clamp(p - q, min=0.0)
    total = float(residual.sum())
    if total <= 0.0:
        residual, total = p, float(p.sum())
    cdf = torch.cumsum(residual.double(), dim=0) / total
    token = int(torch.searchsorted(cdf, torch.tensor([residual_uniform], dtype=torch.float64)).clamp(max=p.shape[0] - 1))
    return False, token


def logprobs_of(logits: torch.Tensor, tokens: list[int], top_n: int) -> list[tuple[float, dict[int, float]]]:
    """Return the target log-probability of each token and the ``top_n`` most likely alternatives.

    ``logits`` [N, V] are raw target logits (before temperature), like vLLM's default.
    """
    logp = torch.log_softmax(logits.float(), dim=-1)
    result = []
    for row, token in enumerate(tokens):
        top: dict[int, float] = {}
        if top_n > 0:
            values, ids = torch.topk(logp[row], top_n)
            top = {int(i): float(v) for i, v in zip(ids, values)}
        result.append((float(logp[row, token]), top))
    return result


def proposal_distributions(logits: torch.Tensor, params: ProposalParams, draft_indices: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
    """Return the draft's proposal q for each row of ``logits`` [M, V] as (ids [M, N], probs [M, N]).

    Row m is for draft index ``draft_indices[m]`` (0 for the first token of a
    speculation). q keeps the ``params.support`` likeliest tokens, likeliest
    first, and multiplies the first ``top_f[i]`` of them by ``saguaro_c``. If
    that leaves no mass (C = 0 and every kept token downweighted), the row
    stays unreshaped.
    """
    sampling = SamplingParams(temperature=params.temperature, top_k=params.top_k, top_p=params.top_p)
    weights = process_logits(logits, sampling)
    support = min(params.support, weights.shape[-1])
    top_weights, ids = torch.topk(weights, support, dim=-1)
    probs = torch.softmax(top_weights.double(), dim=-1)
    if params.saguaro_c < 1.0:
        ranks = torch.arange(support)
        limits = torch.tensor([params.top_f[i] if i < len(params.top_f) else 0 for i in draft_indices])
        scale = torch.where(ranks[None, :] < limits[:, None], params.saguaro_c, 1.0).double()
        reshaped = probs * scale
        totals = reshaped.sum(dim=-1, keepdim=True)
        probs = torch.where(totals > 0, reshaped / totals.clamp(min=1e-300), probs)
    return ids, probs


def sample_proposals(ids: torch.Tensor, probs: torch.Tensor, seed: int, positions: list[int]) -> tuple[list[int], list[Proposal]]:
    """Sample one token per row from q by Gumbel-max with draft noise of (seed, position); return tokens and q."""
    tokens = []
    proposals = []
    logq = torch.log(probs)
    for row, position in enumerate(positions):
        noise = position_noise(seed, position, ids.shape[-1], STREAM_DRAFT)
        choice = int(torch.argmax(logq[row] + noise))
        tokens.append(int(ids[row, choice]))
        proposals.append(Proposal(ids=ids[row].tolist(), probs=probs[row].tolist()))
    return tokens, proposals


def verify_with_proposals(
    logits: torch.Tensor, params: SamplingParams, drafts: list[int], proposals: list[Proposal], positions: list[int]
) -> tuple[int, list[int]]:
    """Run the speculative-sampling test on ``drafts`` with their proposals; return (accepted, committed).

    ``logits`` [len(drafts) + 1, V] are the target's for ``positions``. After all
    drafts are accepted the bonus token is the coupled sample of the last row.
    A draft without a proposal counts as proposed with certainty (q one-hot),
    which is how n-gram drafts are tested.
    """
    weights = process_logits(logits, params).double()
    p = torch.softmax(weights, dim=-1)
    vocab = p.shape[-1]
    for index, token in enumerate(drafts):
        q = torch.zeros(vocab, dtype=torch.float64)
        if index < len(proposals):
            q[torch.tensor(proposals[index].ids, dtype=torch.long)] = torch.tensor(proposals[index].probs, dtype=torch.float64)
        else:
            q[token] = 1.0
        if float(q[token]) <= 0.0:
            raise ValueError(f"draft token {token} at index {index} has probability 0 under its own proposal")
        position = positions[index]
        accepted, committed = rejection_sample(
            p[index], q, token, position_uniform(params.seed, position, STREAM_ACCEPT), position_uniform(params.seed, position, STREAM_RESIDUAL)
        )
        if not accepted:
            return index, drafts[:index] + [committed]
    last = len(drafts)
    bonus = int(torch.argmax(weights[last] + position_noise(params.seed, positions[last], vocab)))
    return last, drafts + [bonus]
