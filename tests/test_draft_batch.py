"""Building the speculation cache of several sequences at once must match building each in turn."""

from __future__ import annotations

import contextlib
import os
import threading
import uuid

import pytest
import redis
import torch
import zmq

from services.draft.engine import BuildJob, DraftEngine, DraftSequence
from services.draft.server import DraftServer
from shared import keys
from shared.protocol import (
    BuildCacheBatch,
    BuildCacheRequest,
    CacheEntry,
    CacheReady,
    DraftReply,
    DraftRequest,
    ErrorReply,
    PrefillRequest,
    ReleaseRequest,
    ProposalParams,
    decode,
    encode,
)
from tests.tiny_models import tiny_qwen2

# Packed and separate fp32 forwards differ by rounding only (see tests/test_packing.py).
TOLERANCE = {"rtol": 1e-5, "atol": 1e-5}
K = 4


def noisy_draft(seed: int = 41, noise: float = 0.1):
    """Return a tiny fp32 model with noisy weights, so its drafts and candidates vary between sequences."""
    model = tiny_qwen2(seed=seed)
    generator = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for param in model.parameters():
            param.add_(torch.randn(param.shape, generator=generator) * noise * param.std())
    return model


def prompt(length: int, offset: int) -> list[int]:
    return [(offset + 7 * i) % 120 for i in range(length)]


def prepare(engine: DraftEngine, proposal: ProposalParams | None = None) -> list[BuildJob]:
    """Prefill five sequences whose builds exercise every glue case; return their jobs.

    0: fresh glue of 5 tokens. 1: the sequence drafted ahead, so 2 glue tokens are
    reused and the rest cropped. 2: root_offset 2 over committed tokens the draft
    already contains. 3: every token already in the sequence (no glue forward). 4: no
    branches at all.
    """
    jobs = []

    seq = engine.prefill("fresh", prompt(7, 3))
    jobs.append(BuildJob(seq=seq, base_len=7, tokens=[11, 12, 13, 14, 15], fanout=[3, 2, 1, 1, 1], k=K))

    seq = engine.prefill("drafted", prompt(12, 5))
    seq.proposal = proposal
    drafted, _ = engine.draft(seq, K)
    jobs.append(BuildJob(seq=seq, base_len=12, tokens=drafted[:2] + [90, 91, 92], fanout=[1, 0, 2, 1, 3], k=K))

    seq = engine.prefill("offset", prompt(20, 9))
    jobs.append(BuildJob(seq=seq, base_len=18, tokens=prompt(20, 9)[18:] + [30, 31, 32, 33, 34], fanout=[2, 2, 2, 2, 2], k=K, root_offset=2))

    seq = engine.prefill("complete", prompt(9, 1))
    jobs.append(BuildJob(seq=seq, base_len=4, tokens=prompt(9, 1)[4:], fanout=[2, 1, 0, 0, 1], k=K))

    seq = engine.prefill("empty", prompt(5, 2))
    jobs.append(BuildJob(seq=seq, base_len=5, tokens=[40, 41, 42, 43, 44], fanout=[0, 0, 0, 0, 0], k=K))

    for job in jobs:
        job.seq.proposal = proposal
    return jobs


def build_sequentially(engine: DraftEngine, jobs: list[BuildJob]):
    return [engine.build_cache(job.seq, job.base_len, job.tokens, job.fanout, job.k, job.root_offset) for job in jobs]


def assert_same_state(batched: DraftSequence, sequential: DraftSequence) -> None:
    label = batched.request_id
    assert batched.ids == sequential.ids, label
    assert batched.candidates == sequential.candidates, label
    if sequential.last_logits is None:
        assert batched.last_logits is None, label
    else:
        torch.testing.assert_close(batched.last_logits, sequential.last_logits, **TOLERANCE, msg=lambda m: f"{label} last_logits: {m}")
    assert batched.cache.get_seq_length() == len(batched.ids), label
    assert batched.cache.get_seq_length() == sequential.cache.get_seq_length(), label
    for layer, reference in zip(batched.cache.layers, sequential.cache.layers):
        torch.testing.assert_close(layer.keys, reference.keys, **TOLERANCE, msg=lambda m: f"{label} keys: {m}")
        torch.testing.assert_close(layer.values, reference.values, **TOLERANCE, msg=lambda m: f"{label} values: {m}")


def assert_same_builds(batched, sequential, jobs: list[BuildJob]) -> None:
    assert len(batched) == len(sequential)
    for job, got, expected in zip(jobs, batched, sequential):
        label = job.seq.request_id
        assert [(b.accepted, b.token) for b in got.branches] == [(b.accepted, b.token) for b in expected.branches], label
        assert [b.tokens for b in got.branches] == [b.tokens for b in expected.branches], label
        assert got.candidates == expected.candidates, label
        assert [len(b.proposals) for b in got.branches] == [len(b.proposals) for b in expected.branches], label
        for got_branch, expected_branch in zip(got.branches, expected.branches):
            for got_q, expected_q in zip(got_branch.proposals, expected_branch.proposals):
                assert got_q.ids == expected_q.ids, label
                torch.testing.assert_close(torch.tensor(got_q.probs), torch.tensor(expected_q.probs), **TOLERANCE)


def test_batch_matches_sequential_builds():
    model = noisy_draft()
    sequential_jobs = prepare(DraftEngine(model, torch.device("cpu")))
    batched_jobs = prepare(batched_engine := DraftEngine(model, torch.device("cpu")))

    sequential = build_sequentially(DraftEngine(model, torch.device("cpu")), sequential_jobs)
    batched = batched_engine.build_cache_batch(batched_jobs)

    assert sum(len(build.branches) for build in sequential) == 8 + 7 + 10 + 4
    assert all(len(branch.tokens) == K for build in batched for branch in build.branches)
    assert_same_builds(batched, sequential, batched_jobs)
    for batched_job, sequential_job in zip(batched_jobs, sequential_jobs):
        assert_same_state(batched_job.seq, sequential_job.seq)


def test_batch_matches_sequential_sampled_builds():
    model = noisy_draft()
    proposal = ProposalParams(temperature=1.0, seed=1234, saguaro_c=0.5, top_f=[2, 1, 1, 1])
    sequential_jobs = prepare(DraftEngine(model, torch.device("cpu")), proposal)
    batched_jobs = prepare(batched_engine := DraftEngine(model, torch.device("cpu")), proposal)

    sequential = build_sequentially(DraftEngine(model, torch.device("cpu")), sequential_jobs)
    batched = batched_engine.build_cache_batch(batched_jobs)

    assert all(len(branch.proposals) == K for build in batched for branch in build.branches)
    assert_same_builds(batched, sequential, batched_jobs)
    for batched_job, sequential_job in zip(batched_jobs, sequential_jobs):
        assert_same_state(batched_job.seq, sequential_job.seq)


def test_batch_twice_matches_sequential():
    """A second step reuses the state the batched first step left behind."""
    model = noisy_draft()
    sequential_engine = DraftEngine(model, torch.device("cpu"))
    batched_engine = DraftEngine(model, torch.device("cpu"))
    sequential_jobs = prepare(sequential_engine)
    batched_jobs = prepare(batched_engine)
    build_sequentially(sequential_engine, sequential_jobs)
    batched_engine.build_cache_batch(batched_jobs)

    def next_step(jobs: list[BuildJob]) -> list[BuildJob]:
        # Commit r, s1 and 77 (the target's token in place of s2), then verify [77, 1, 2, 3, 4].
        steps = []
        for job in jobs:
            s1 = job.tokens[job.root_offset + 1]
            base_len = job.base_len + job.root_offset + 1
            steps.append(BuildJob(seq=job.seq, base_len=base_len, tokens=[s1, 77, 1, 2, 3, 4], fanout=job.fanout, k=K, root_offset=1))
        return steps

    sequential = build_sequentially(sequential_engine, next_step(sequential_jobs))
    batched = batched_engine.build_cache_batch(next_step(batched_jobs))

    assert_same_builds(batched, sequential, batched_jobs)
    for batched_job, sequential_job in zip(batched_jobs, sequential_jobs):
        assert_same_state(batched_job.seq, sequential_job.seq)


def test_batch_after_hits_matches_sequential():
    """A step after a hit takes its glue rows from the batched tree, and matches a full glue."""
    model = noisy_draft()
    engines = {name: DraftEngine(model, torch.device("cpu")) for name in ("batched", "sequential", "no reuse")}
    jobs = {name: prepare(engine) for name, engine in engines.items()}
    first = engines["batched"].build_cache_batch(jobs["batched"])
    build_sequentially(engines["sequential"], jobs["sequential"])
    build_sequentially(engines["no reuse"], jobs["no reuse"])
    for job in jobs["no reuse"]:
        job.seq.tree = None

    def next_step(step_jobs: list[BuildJob]) -> list[BuildJob]:
        # Commit r..s_j and the last branch's c, then verify the branch's speculation; a job without branches misses.
        steps = []
        for job, build in zip(step_jobs, first):
            root = job.tokens[job.root_offset :]
            branch = build.branches[-1] if build.branches else None
            accepted = branch.accepted if branch else 1
            speculation = [branch.token] + branch.tokens if branch else [77, 1, 2, 3, 4]
            steps.append(BuildJob(seq=job.seq, base_len=job.base_len + job.root_offset, tokens=root[: accepted + 1] + speculation, fanout=job.fanout, k=K, root_offset=accepted + 1))
        return steps

    assert all((job.seq.tree is not None) == bool(build.branches) for job, build in zip(jobs["batched"], first))
    batched = engines["batched"].build_cache_batch(next_step(jobs["batched"]))
    sequential = build_sequentially(engines["sequential"], next_step(jobs["sequential"]))
    reference = build_sequentially(engines["no reuse"], next_step(jobs["no reuse"]))

    assert_same_builds(batched, sequential, jobs["batched"])
    assert_same_builds(batched, reference, jobs["batched"])
    for batched_job, sequential_job, reference_job in zip(jobs["batched"], jobs["sequential"], jobs["no reuse"]):
        assert_same_state(batched_job.seq, sequential_job.seq)
        assert_same_state(batched_job.seq, reference_job.seq)


def test_batch_of_one_skips_packing(monkeypatch):
    model = noisy_draft()
    engine = DraftEngine(model, torch.device("cpu"))
    reference_engine = DraftEngine(model, torch.device("cpu"))
    (job,) = prepare(engine)[:1]
    (reference_job,) = prepare(reference_engine)[:1]

    def no_packing(*args, **kwargs):
        raise AssertionError("one job must not be packed")

    monkeypatch.setattr("services.draft.engine.PackedBatch", no_packing)
    (build,) = engine.build_cache_batch([job])
    (expected,) = build_sequentially(reference_engine, [reference_job])
    assert [b.tokens for b in build.branches] == [b.tokens for b in expected.branches]
    assert engine.build_cache_batch([]) == []


@pytest.mark.parametrize("problem", ["k", "duplicate", "base_len"])
def test_invalid_batch_raises_before_changes(problem):
    engine = DraftEngine(noisy_draft(), torch.device("cpu"))
    jobs = prepare(engine)[:3]
    if problem == "k":
        jobs[2].k = K + 1
        match = "share k"
    elif problem == "duplicate":
        jobs.append(BuildJob(seq=jobs[0].seq, base_len=7, tokens=[1, 2, 3, 4, 5], fanout=[1], k=K))
        match = "appears twice"
    else:
        jobs[2].base_len = len(jobs[2].seq.ids) + 1
        match = "invalid base_len"
    before = [(list(job.seq.ids), job.seq.cache.get_seq_length()) for job in jobs]

    with pytest.raises(ValueError, match=match):
        engine.build_cache_batch(jobs)
    assert [(job.seq.ids, job.seq.cache.get_seq_length()) for job in jobs] == before


# -- server ---------------------------------------------------------------------


@pytest.fixture
def redis_client():
    url = os.environ.get("REDIS_URL", "redis://127.0.0.1:6379/0")
    client = redis.Redis.from_url(url)
    try:
        client.ping()
    except redis.ConnectionError:
        pytest.skip(f"no Redis at {url}")
    yield client
    client.close()


@pytest.fixture
def namespace(redis_client):
    ns = f"test-draft-batch-{uuid.uuid4().hex[:8]}"
    yield ns
    leftover = list(redis_client.scan_iter(f"{ns}:*"))
    if leftover:
        redis_client.delete(*leftover)


@contextlib.contextmanager
def serving(redis_client, namespace, **options):
    """Run a draft server on a thread; yield it and a DEALER socket connected to it."""
    server = DraftServer(DraftEngine(noisy_draft(), torch.device("cpu")), redis_client, namespace, "tcp://127.0.0.1:0", **options)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    socket = zmq.Context.instance().socket(zmq.DEALER)
    socket.setsockopt(zmq.LINGER, 0)
    socket.setsockopt(zmq.RCVTIMEO, 30_000)
    socket.connect(server.address)
    try:
        yield server, socket
    finally:
        socket.close()
        server.stopped.set()
        thread.join(timeout=10)


@pytest.fixture
def draft_server(redis_client, namespace):
    with serving(redis_client, namespace) as pair:
        yield pair


PROMPTS = {"a": prompt(7, 3), "b": prompt(15, 5), "c": prompt(22, 9)}
FANOUTS = {"a": [3, 2, 1, 1, 1], "b": [1, 1, 1, 1, 1], "c": [2, 0, 2, 0, 2]}


def build_requests(step: int, ttl_s: float = 30.0) -> list[BuildCacheRequest]:
    requests = []
    for request_id, ids in PROMPTS.items():
        root_offset = 1 if request_id == "c" else 0
        base_len = len(ids) - root_offset
        tokens = ids[base_len:] + [step + 10, step + 20, step + 30, step + 40, step + 50]
        requests.append(
            BuildCacheRequest(request_id=request_id, step=step, base_len=base_len, tokens=tokens, root_offset=root_offset, fanout=FANOUTS[request_id], k=K, ttl_s=ttl_s)
        )
    return requests


def receive(socket, count: int) -> list:
    return [decode(socket.recv()) for _ in range(count)]


def test_server_builds_batch_and_rejects_unknown(draft_server, redis_client, namespace):
    server, socket = draft_server
    for request_id, ids in PROMPTS.items():
        socket.send(encode(PrefillRequest(request_id=request_id, prompt_token_ids=ids, k=0)))
    requests = build_requests(step=0)
    bogus = requests[0].model_copy(update={"request_id": "bogus"})
    socket.send(encode(BuildCacheBatch(requests=requests[:2] + [bogus] + requests[2:])))
    replies = receive(socket, 4)

    assert [r.request_id for r in replies] == ["a", "b", "bogus", "c"]
    errors = [r for r in replies if isinstance(r, ErrorReply)]
    ready = {r.request_id: r for r in replies if isinstance(r, CacheReady)}
    assert [(e.request_id, e.code) for e in errors] == [("bogus", "unknown_request")]
    assert sorted(ready) == sorted(PROMPTS)
    assert all(r.batch_size == 3 for r in ready.values())

    # Reference: the same builds one at a time on a fresh engine with the same weights.
    reference = DraftEngine(noisy_draft(), torch.device("cpu"))
    for request in requests:
        seq = reference.prefill(request.request_id, PROMPTS[request.request_id])
        expected = reference.build_cache(seq, request.base_len, request.tokens, request.fanout, request.k, request.root_offset)
        reply = ready[request.request_id]
        assert reply.num_entries == len(expected.branches), request.request_id
        assert reply.candidates == expected.candidates, request.request_id
        for branch in expected.branches:
            key = keys.spec_entry(namespace, request.request_id, 0, branch.accepted, branch.token)
            value = redis_client.get(key)
            assert value is not None, key
            entry = decode(value)
            assert isinstance(entry, CacheEntry)
            assert entry.tokens == branch.tokens, key
            assert 0 < redis_client.pttl(key) <= 30_000, key
        assert sorted(server.engine.sequences[request.request_id].published_keys) == sorted(
            keys.spec_entry(namespace, request.request_id, 0, b.accepted, b.token) for b in expected.branches
        )

    # The next step's batch replaces the entries of step 0.
    step0_keys = [key for seq in server.engine.sequences.values() for key in seq.published_keys]
    socket.send(encode(BuildCacheBatch(requests=build_requests(step=1)[:2])))
    replies = receive(socket, 2)
    assert all(isinstance(r, CacheReady) and r.batch_size == 2 for r in replies), replies
    for key in step0_keys:
        still_current = key.startswith(f"{namespace}:spec:c:")
        assert redis_client.exists(key) == int(still_current), key


def test_server_batch_with_duplicate_and_mixed_k(redis_client, namespace):
    server = DraftServer(DraftEngine(noisy_draft(), torch.device("cpu")), redis_client, namespace, "tcp://127.0.0.1:0")
    try:
        for request_id, ids in PROMPTS.items():
            assert server.handle_frame(encode(PrefillRequest(request_id=request_id, prompt_token_ids=ids, k=0))) is None
        requests = build_requests(step=0)
        requests[2] = requests[2].model_copy(update={"k": K - 1})
        duplicate = requests[0].model_copy(update={"fanout": [1]})
        replies = server.handle_frame(encode(BuildCacheBatch(requests=requests + [duplicate])))
    finally:
        server.socket.close()

    assert [type(r).__name__ for r in replies] == ["CacheReady", "CacheReady", "CacheReady", "ErrorReply"]
    assert [r.batch_size for r in replies[:3]] == [2, 2, 1]
    assert (replies[3].request_id, replies[3].code) == ("a", "invalid")
    assert replies[0].num_entries == sum(FANOUTS["a"])
    c_keys = server.engine.sequences["c"].published_keys
    assert len(c_keys) == sum(FANOUTS["c"])
    for key in c_keys:
        assert len(decode(redis_client.get(key)).tokens) == K - 1, key


def test_server_prefills_long_prompt_between_messages(redis_client, namespace):
    short, long = prompt(7, 3), prompt(41, 1)
    with serving(redis_client, namespace, prefill_chunk=8) as (server, socket):
        socket.send(encode(PrefillRequest(request_id="short", prompt_token_ids=short, k=0)))
        # Six chunks of 8 tokens: the short request's draft is answered before the long prompt is done.
        socket.send(encode(PrefillRequest(request_id="long", prompt_token_ids=long, k=K)))
        socket.send(encode(DraftRequest(request_id="short", step=1, base_len=len(short) - 1, tokens=short[-1:], k=K)))
        replies = receive(socket, 2)
        assert [(type(r), r.request_id, r.step) for r in replies] == [(DraftReply, "short", 1), (DraftReply, "long", 0)]
        assert server.engine.sequences["long"].ids[: len(long)] == long
        assert server.pending == {}

    reference = DraftEngine(noisy_draft(), torch.device("cpu"))
    expected, _ = reference.draft(reference.prefill("long", long), K)
    assert replies[1].tokens == expected


def test_server_finishes_prefill_before_its_next_message(redis_client, namespace):
    long = prompt(41, 1)
    with serving(redis_client, namespace, prefill_chunk=8) as (server, socket):
        socket.send(encode(PrefillRequest(request_id="long", prompt_token_ids=long, k=0)))
        socket.send(encode(DraftRequest(request_id="long", step=1, base_len=len(long) - 1, tokens=long[-1:], k=K)))
        [reply] = receive(socket, 1)
        assert isinstance(reply, DraftReply), reply
        assert reply.step == 1
        assert server.engine.sequences["long"].ids[: len(long)] == long


def test_server_drops_released_prefill(redis_client, namespace):
    short, long = prompt(7, 3), prompt(41, 1)
    with serving(redis_client, namespace, prefill_chunk=8) as (server, socket):
        socket.send(encode(PrefillRequest(request_id="short", prompt_token_ids=short, k=0)))
        socket.send(encode(PrefillRequest(request_id="long", prompt_token_ids=long, k=K)))
        socket.send(encode(ReleaseRequest(request_id="long")))
        socket.send(encode(DraftRequest(request_id="short", step=1, base_len=len(short) - 1, tokens=short[-1:], k=K)))
        [reply] = receive(socket, 1)
        assert (type(reply), reply.request_id) == (DraftReply, "short")
        socket.setsockopt(zmq.RCVTIMEO, 500)
        with pytest.raises(zmq.Again):
            socket.recv()
        assert "long" not in server.engine.sequences
        assert server.pending == {}
