"""Drafting for several sequences at once must match drafting for each in turn."""

from __future__ import annotations

import pytest
import torch

from services.draft.engine import DraftEngine, DraftJob
from services.draft.server import DraftServer
from shared.protocol import DraftBatch, DraftReply, DraftRequest, ErrorReply, PrefillRequest, ProposalParams, encode
from tests.test_draft_batch import TOLERANCE, assert_same_state, namespace, noisy_draft, prompt, redis_client  # noqa: F401 (fixtures)

K = 4


def prepare(engine: DraftEngine, proposal: ProposalParams | None = None) -> list[DraftJob]:
    """Prefill four sequences whose drafts exercise every sync case; return their jobs.

    0: two new committed tokens. 1: the sequence drafted ahead, so its first
    drafts are reused and the rest cropped. 2: every token already in the
    sequence. 3: a shorter k.
    """
    jobs = []
    seq = engine.prefill("fresh", prompt(7, 3))
    jobs.append(DraftJob(seq=seq, base_len=6, tokens=[prompt(7, 3)[6], 11, 12], k=K))

    seq = engine.prefill("drafted", prompt(12, 5))
    seq.proposal = proposal
    drafted, _ = engine.draft(seq, K)
    jobs.append(DraftJob(seq=seq, base_len=12, tokens=drafted[:2] + [90], k=K))

    seq = engine.prefill("complete", prompt(9, 1))
    jobs.append(DraftJob(seq=seq, base_len=4, tokens=prompt(9, 1)[4:], k=K))

    seq = engine.prefill("short", prompt(15, 2))
    jobs.append(DraftJob(seq=seq, base_len=15, tokens=[40], k=2))

    for job in jobs:
        job.seq.proposal = proposal
    return jobs


def draft_sequentially(engine: DraftEngine, jobs: list[DraftJob]):
    results = []
    for job in jobs:
        engine.sync(job.seq, job.base_len, job.tokens)
        results.append(engine.draft(job.seq, job.k))
    return results


@pytest.mark.parametrize("sampled", [False, True], ids=["greedy", "sampled"])
def test_batch_matches_sequential_drafts(sampled):
    model = noisy_draft()
    proposal = ProposalParams(temperature=1.0, seed=99) if sampled else None
    sequential_jobs = prepare(sequential_engine := DraftEngine(model, torch.device("cpu")), proposal)
    batched_jobs = prepare(batched_engine := DraftEngine(model, torch.device("cpu")), proposal)

    expected = draft_sequentially(sequential_engine, sequential_jobs)
    got = batched_engine.draft_batch(batched_jobs)

    assert [len(tokens) for tokens, _ in got] == [K, K, K, 2]
    assert [tokens for tokens, _ in got] == [tokens for tokens, _ in expected]
    for (_, got_q), (_, expected_q) in zip(got, expected):
        assert len(got_q) == len(expected_q) == (len(got_q) if sampled else 0)
        for a, b in zip(got_q, expected_q):
            assert a.ids == b.ids
            torch.testing.assert_close(torch.tensor(a.probs), torch.tensor(b.probs), **TOLERANCE)
    for batched_job, sequential_job in zip(batched_jobs, sequential_jobs):
        assert_same_state(batched_job.seq, sequential_job.seq)


def test_second_batch_reuses_the_drafted_tokens():
    """After a batched draft, the next step's sync keeps the accepted drafts and matches the sequential engine."""
    model = noisy_draft()
    sequential_jobs = prepare(sequential_engine := DraftEngine(model, torch.device("cpu")))
    batched_jobs = prepare(batched_engine := DraftEngine(model, torch.device("cpu")))
    first = batched_engine.draft_batch(batched_jobs)
    draft_sequentially(sequential_engine, sequential_jobs)

    def next_step(jobs, drafts):
        # Accept the first draft, then the target's own token 55.
        return [DraftJob(seq=job.seq, base_len=job.base_len + len(job.tokens), tokens=tokens[:1] + [55], k=K) for job, (tokens, _) in zip(jobs, drafts)]

    batched = batched_engine.draft_batch(next_step(batched_jobs, first))
    sequential = draft_sequentially(sequential_engine, next_step(sequential_jobs, first))
    assert [tokens for tokens, _ in batched] == [tokens for tokens, _ in sequential]
    for batched_job, sequential_job in zip(batched_jobs, sequential_jobs):
        assert_same_state(batched_job.seq, sequential_job.seq)


def test_invalid_draft_batch_raises_before_changes():
    engine = DraftEngine(noisy_draft(), torch.device("cpu"))
    jobs = prepare(engine)
    before = [(list(job.seq.ids), job.seq.cache.get_seq_length()) for job in jobs]
    with pytest.raises(ValueError, match="appears twice"):
        engine.draft_batch(jobs + [DraftJob(seq=jobs[0].seq, base_len=1, tokens=[1], k=K)])
    with pytest.raises(ValueError, match="invalid base_len"):
        engine.draft_batch(jobs[:2] + [DraftJob(seq=jobs[2].seq, base_len=len(jobs[2].seq.ids) + 1, tokens=[1], k=K)])
    assert [(job.seq.ids, job.seq.cache.get_seq_length()) for job in jobs] == before


def test_server_drafts_batch_and_rejects_bad_requests(redis_client, namespace):  # noqa: F811
    server = DraftServer(DraftEngine(noisy_draft(), torch.device("cpu")), redis_client, namespace, "tcp://127.0.0.1:0")
    prompts = {"a": prompt(7, 3), "b": prompt(15, 5), "c": prompt(22, 9)}
    try:
        for request_id, ids in {**prompts, "d": prompt(4, 1)}.items():
            assert server.handle_frame(encode(PrefillRequest(request_id=request_id, prompt_token_ids=ids, k=0))) is None
        requests = [DraftRequest(request_id=rid, step=3, base_len=len(ids), tokens=[20, 21], k=K if rid != "c" else 2) for rid, ids in prompts.items()]
        unknown = requests[0].model_copy(update={"request_id": "unknown"})
        duplicate = requests[1].model_copy(update={"tokens": [5]})
        too_long = DraftRequest(request_id="d", step=3, base_len=500, tokens=[1], k=K)
        replies = server.handle_frame(encode(DraftBatch(requests=requests[:1] + [unknown] + requests[1:] + [duplicate, too_long])))
    finally:
        server.socket.close()

    assert [type(r).__name__ for r in replies] == ["DraftReply", "ErrorReply", "DraftReply", "DraftReply", "ErrorReply", "ErrorReply"]
    assert [(r.request_id, r.code) for r in replies if isinstance(r, ErrorReply)] == [("unknown", "unknown_request"), ("b", "invalid"), ("d", "unknown_request")]
    drafted = [r for r in replies if isinstance(r, DraftReply)]
    assert all(r.batch_size == 3 and r.step == 3 for r in drafted)

    reference = DraftEngine(noisy_draft(), torch.device("cpu"))
    for request, reply in zip(requests, drafted):
        seq = reference.prefill(request.request_id, prompts[request.request_id])
        reference.sync(seq, request.base_len, request.tokens)
        assert reply.tokens == reference.draft(seq, request.k)[0], request.request_id
