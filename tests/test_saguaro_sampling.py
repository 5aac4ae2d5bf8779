"""Saguaro sampling and the rejection acceptance test.

Synthetic tests use one position with the 6-outcome distribution P of
``tests.test_sampling`` (N = 20,000, alpha = 0.001, power above 0.99 against a
total-variation shift of 0.02). The model-level tests decode two SSD steps on
the tiny pair at T = 1 and compare the third generated token with its exact
marginal, computed by enumerating the first two tokens. With N = 3,000 over 8
bins, alpha = 0.001, the test detects moving 0.06 of probability between the
two likeliest bins with power above 0.9 (``test_model_level_power``).
"""

import numpy as np
import pytest
import torch
from scipy import stats

from services.draft.engine import DraftEngine
from services.verify.backup import ngram_propose
from services.verify.engine import TargetEngine
from shared.protocol import Proposal, ProposalParams, SamplingParams
from shared.sampling import proposal_distributions, rejection_sample, sample_proposals, verify_with_proposals
from tests.test_sampling import ALPHA, N, P, chi_square_pvalue
from tests.tiny_models import tiny_qwen2

# q before reshaping: a draft that is close to P but not equal.
Q = torch.tensor([0.45, 0.2, 0.15, 0.1, 0.05, 0.05], dtype=torch.float64)


def reshape(q: torch.Tensor, c: float, top_f: int) -> torch.Tensor:
    scaled = q.clone()
    scaled[:top_f] *= c
    return scaled / scaled.sum()


def test_proposal_keeps_support_and_order():
    logits = torch.log(Q)[None].float()
    ids, probs = proposal_distributions(logits, ProposalParams(temperature=1.0, support=4), [0])
    assert ids[0].tolist() == [0, 1, 2, 3]
    expected = Q[:4] / Q[:4].sum()
    torch.testing.assert_close(probs[0], expected, rtol=1e-6, atol=1e-6)


def test_proposal_downweights_top_f():
    logits = torch.log(Q)[None].float()
    params = ProposalParams(temperature=1.0, saguaro_c=0.5, top_f=[0, 2], support=6)
    ids, probs = proposal_distributions(logits.repeat(2, 1), params, [0, 1])
    # Index 0 has top_f 0: unchanged. Index 1 halves the two likeliest tokens.
    torch.testing.assert_close(probs[0], Q, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(probs[1], reshape(Q, 0.5, 2), rtol=1e-6, atol=1e-6)
    # By hand: 0.225 + 0.1 + 0.45 = 0.775 in total.
    assert abs(float(probs[1, 0]) - 0.225 / 0.675) < 1e-6


def test_proposal_with_c_zero_everywhere_stays_unreshaped():
    logits = torch.log(Q)[None].float()
    ids, probs = proposal_distributions(logits, ProposalParams(temperature=1.0, saguaro_c=0.0, top_f=[6], support=6), [0])
    torch.testing.assert_close(probs[0], Q, rtol=1e-6, atol=1e-6)


def test_sampled_proposals_follow_q():
    ids = torch.arange(6)[None]
    probs = reshape(Q, 0.5, 2)[None]
    counts = np.zeros(6)
    for position in range(N):
        tokens, proposals = sample_proposals(ids, probs, seed=3, positions=[position])
        counts[tokens[0]] += 1
    assert proposals[0].ids == list(range(6))
    assert chi_square_pvalue(counts, probs[0].numpy()) > ALPHA


def run_rejection(q_sampled: torch.Tensor, q_claimed: torch.Tensor, rng: np.random.Generator) -> tuple[np.ndarray, int]:
    """Draw N drafts from ``q_sampled``, test them with ``q_claimed``; return committed counts and rejections."""
    counts = np.zeros(6)
    rejected = 0
    drafts = rng.choice(6, size=N, p=q_sampled.numpy())
    for draft, u, v in zip(drafts, rng.random(N), rng.random(N)):
        accepted, token = rejection_sample(P, q_claimed, int(draft), float(u), float(v))
        counts[token] += 1
        rejected += not accepted
    return counts, rejected


@pytest.mark.parametrize("c", [1.0, 0.5, 0.0])
def test_rejection_with_saguaro_q_is_distributed_as_p(c):
    q = reshape(Q, c, 2)
    counts, _ = run_rejection(q, q, np.random.default_rng(5))
    assert chi_square_pvalue(counts, P.numpy()) > ALPHA


def test_rejection_with_unreshaped_q_claimed_is_detected():
    # The draft sampled from the reshaped q but the verifier tested the plain q.
    counts, _ = run_rejection(reshape(Q, 0.3, 2), Q, np.random.default_rng(6))
    assert chi_square_pvalue(counts, P.numpy()) < ALPHA


def test_lower_c_moves_recoveries_to_the_cached_tokens():
    """With C < 1 a rejected position more often commits one of the top-F tokens, which the cache holds."""
    rng = np.random.default_rng(7)
    in_top = {}
    rejections = {}
    for c in (1.0, 0.5):
        q = reshape(Q, c, 2)
        hits = 0
        rejected = 0
        for draft, u, v in zip(rng.choice(6, size=N, p=q.numpy()), rng.random(N), rng.random(N)):
            accepted, token = rejection_sample(P, q, int(draft), float(u), float(v))
            if not accepted:
                rejected += 1
                hits += token < 2
        in_top[c] = hits / rejected
        rejections[c] = rejected / N
    assert in_top[0.5] > in_top[1.0] + 0.1
    # Acceptance may fall or, as here where q overweights the top tokens, barely move.
    assert abs(rejections[0.5] - rejections[1.0]) < 0.05


def test_verify_with_one_hot_and_sparse_proposals():
    logits = torch.log(P)[None].repeat(3, 1).float()
    params = SamplingParams(temperature=1.0, seed=1)
    proposal = Proposal(ids=[0, 1], probs=[0.5, 0.5])
    accepted, committed = verify_with_proposals(logits, params, [0, 1], [proposal], [10, 11, 12])
    assert 0 <= accepted <= 2
    assert len(committed) == accepted + 1
    assert committed[:accepted] == [0, 1][:accepted]
    with pytest.raises(ValueError, match="probability 0"):
        verify_with_proposals(logits, params, [3], [proposal], [10, 11])


# -- model level ------------------------------------------------------------------

PROMPT = [5, 9, 33, 2, 71]
K = 2
MODEL_N = 3000
BINS = 7


def test_model_level_power():
    probs = np.array([0.3, 0.2, 0.15, 0.1, 0.1, 0.05, 0.05, 0.05])
    shifted = probs.copy()
    shifted[0] -= 0.06
    shifted[1] += 0.06
    noncentrality = MODEL_N * float(((shifted - probs) ** 2 / probs).sum())
    critical = stats.chi2.ppf(1 - ALPHA, df=len(probs) - 1)
    assert 1 - stats.ncx2.cdf(critical, df=len(probs) - 1, nc=noncentrality) > 0.9


@pytest.fixture(scope="module")
def pair():
    target = tiny_qwen2(seed=11)
    draft = tiny_qwen2(seed=11)
    generator = torch.Generator().manual_seed(12)
    with torch.no_grad():
        for param in draft.parameters():
            param.add_(torch.randn(param.shape, generator=generator) * 0.3 * param.std())
    return target, draft


@pytest.fixture(scope="module")
def third_token_marginal(pair):
    """Exact distribution of the third generated token at T = 1."""
    target, _ = pair
    with torch.inference_mode():
        first = torch.softmax(target(input_ids=torch.tensor([PROMPT])).logits[0, -1].double(), -1)
        vocab = first.shape[0]
        two = torch.tensor([PROMPT + [x] for x in range(vocab)])
        second = torch.softmax(target(input_ids=two).logits[:, -1].double(), -1)  # [x1, x2]
        joint = first[:, None] * second
        three = torch.tensor([PROMPT + [x1, x2] for x1 in range(vocab) for x2 in range(vocab)])
        third = torch.cat([torch.softmax(target(input_ids=chunk).logits[:, -1].double(), -1) for chunk in three.split(2048)])
    return (joint.reshape(-1, 1) * third).sum(0)


def ssd_third_token(target_engine, draft_engine, seed: int, c: float, backup: str, stats_out: dict) -> int:
    """Decode with SSD steps as the verify worker does, with the rejection test; return the third generated token."""
    sampling = SamplingParams(temperature=1.0, seed=seed)
    fanout = [2, 2, 2]
    proposal = ProposalParams(temperature=1.0, seed=seed, saguaro_c=c, top_f=fanout, support=16)
    seq = target_engine.prefill("t", PROMPT)
    dseq = draft_engine.prefill("t", PROMPT)
    dseq.proposal = proposal
    drafts, proposals = draft_engine.draft(dseq, K)
    generated: list[int] = []
    while len(generated) < 3:
        base = len(seq.ids)
        committed_before = seq.ids + [seq.root]
        build = draft_engine.build_cache(dseq, base, [seq.root] + drafts, fanout, K)
        result = target_engine.verify(seq, drafts, sampling, proposals)
        generated.extend(result.committed)
        branch = next((b for b in build.branches if b.accepted == result.accepted and b.token == seq.root), None)
        if branch is not None:
            stats_out["hits"] += 1
            drafts, proposals = branch.tokens, branch.proposals
            continue
        stats_out["misses"] += 1
        committed = committed_before + result.committed
        draft_engine.sync(dseq, base, committed[base:])
        if backup == "jit":
            drafts, proposals = draft_engine.draft(dseq, K)
        elif backup == "ngram":
            drafts, proposals = ngram_propose(committed, K), []
        else:
            drafts, proposals = [], []
    return generated[2]


@pytest.mark.slow
@pytest.mark.parametrize("c,backup", [(1.0, "jit"), (0.5, "jit"), (0.5, "ngram"), (0.5, "none")])
def test_ssd_rejection_output_is_distributed_as_target(pair, third_token_marginal, c, backup):
    target, draft = pair
    target_engine = TargetEngine(target, torch.device("cpu"))
    draft_engine = DraftEngine(draft, torch.device("cpu"))
    top = torch.argsort(third_token_marginal, descending=True)[:BINS].tolist()
    probs = np.array([float(third_token_marginal[t]) for t in top] + [1.0 - float(third_token_marginal[top].sum())])
    counts = np.zeros(len(probs))
    outcome = {"hits": 0, "misses": 0}
    for seed in range(MODEL_N):
        token = ssd_third_token(target_engine, draft_engine, seed, c, backup, outcome)
        counts[top.index(token) if token in top else len(top)] += 1
    assert outcome["hits"] > 0, outcome
    assert outcome["misses"] > 0, outcome
    assert stats.chisquare(counts, probs * MODEL_N).pvalue > ALPHA
