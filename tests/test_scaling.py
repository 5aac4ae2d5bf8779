"""Several verify and draft replicas against real Redis, started by the launcher as real processes.

Every verify replica decodes one request at a time (``max_num_seqs=1``), so
concurrent requests must spread over the replicas. Outputs are greedy and
compared with target-only greedy decoding in this process.
"""

from __future__ import annotations

import signal
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import pytest
import redis

from bench.direct_client import collect, submit
from services.launcher import Stack
from services.verify.draft_client import DraftClient
from shared import keys
from shared.protocol import ReplicaInfo, encode
from shared.service import live_replicas
from tests.tiny_models import save_tiny_pair, target_greedy, tiny_stack_env

pytestmark = pytest.mark.integration

PROMPTS = [[5, 9, 33, 2, 71], [1, 2, 3], [40, 41, 42, 43, 44, 45, 46, 47, 48, 49, 50, 51], [7, 7, 100, 3]]
MAX_TOKENS = 40
NUM_REQUESTS = 8


@pytest.fixture(scope="module")
def tiny_pair(tmp_path_factory) -> tuple[Path, Path]:
    return save_tiny_pair(tmp_path_factory.mktemp("models"), draft_noise=0.1)


@pytest.fixture(scope="module")
def reference(tiny_pair) -> list[list[int]]:
    return target_greedy(tiny_pair[0], PROMPTS, MAX_TOKENS)


def start_replicated_stack(tiny_pair, log_dir: Path, replicas: dict[str, int], services=("draft", "verify", "gateway")) -> Stack:
    env = tiny_stack_env(*tiny_pair, namespace=f"scale-{uuid.uuid4().hex[:8]}", max_num_seqs=1)
    stack = Stack(env=env, log_dir=log_dir, services=services, replicas=replicas, start_timeout_s=180)
    stack.start()
    return stack


@pytest.fixture(scope="module")
def scaled_stack(tiny_pair, tmp_path_factory):
    deployment = start_replicated_stack(tiny_pair, tmp_path_factory.mktemp("logs-scaled"), {"verify": 2, "draft": 2})
    yield deployment
    deployment.stop()


def redis_of(stack: Stack) -> tuple[redis.Redis, str]:
    return redis.Redis.from_url(stack.redis_url), stack.env["SAGUARO_NAMESPACE"]


def words(token_ids: list[int]) -> str:
    return " ".join(f"w{t}" for t in token_ids)


def draft_addresses(client: redis.Redis, ns: str) -> dict[str, str]:
    """Return ``{replica id: ZeroMQ address}`` of the draft replicas with a live heartbeat."""
    return {info.replica_id: info.address for info in live_replicas(client, ns, "draft")}


def request_state(client: redis.Redis, ns: str, request_id: str) -> dict[str, str]:
    return {key.decode(): value.decode() for key, value in client.hgetall(keys.state(ns, request_id)).items()}


def complete(base_url: str, prompt: list[int]) -> dict:
    with httpx.Client(base_url=base_url, timeout=180) as client:
        response = client.post(
            "/v1/completions",
            json={"prompt": words(prompt), "max_tokens": MAX_TOKENS, "temperature": 0, "ignore_eos": True},
        )
    assert response.status_code == 200, response.text
    return response.json()


# -- assignment, without service processes -------------------------------------------


@pytest.fixture
def two_draft_heartbeats():
    """Yield ``(client, namespace, addresses)`` with heartbeats of two draft replicas in Redis and no processes behind them."""
    client = redis.Redis.from_url("redis://127.0.0.1:6379/0")
    ns = f"scale-unit-{uuid.uuid4().hex[:8]}"
    addresses = ["tcp://127.0.0.1:1", "tcp://127.0.0.1:2"]
    names = []
    for index, address in enumerate(addresses):
        info = ReplicaInfo(role="draft", replica_id=f"draft-{index}", address=address, started_at=time.time())
        names.append(keys.replica(ns, "draft", info.replica_id))
        client.set(names[-1], encode(info), ex=60)
    yield client, ns, addresses
    client.delete(*names)


def test_draft_assignment_rotates_on_ties(two_draft_heartbeats):
    """With equal load, consecutive assignments of one verify replica alternate between drafts."""
    client, ns, addresses = two_draft_heartbeats
    drafts = DraftClient(client, ns, tokenizer_hash="")
    chosen = []
    for _ in range(4):
        address = drafts.assign()
        chosen.append(address)
        drafts.unassign(address)
    drafts.close()
    assert sorted(chosen) == sorted(addresses * 2)
    assert chosen[0] != chosen[1]


def test_draft_assignment_prefers_fewest_requests(two_draft_heartbeats):
    client, ns, addresses = two_draft_heartbeats
    drafts = DraftClient(client, ns, tokenizer_hash="")
    first = drafts.assign()
    second = drafts.assign()
    drafts.close()
    assert {first, second} == set(addresses)


# -- 2 verify + 2 draft replicas --------------------------------------------------------


def test_launcher_starts_every_replica(scaled_stack):
    assert set(scaled_stack.processes) >= {"draft", "draft-2", "verify", "verify-2", "gateway"}
    client, ns = redis_of(scaled_stack)
    verify_ids = {info.replica_id for info in live_replicas(client, ns, "verify")}
    assert verify_ids == {"verify-1", "verify-2"}
    drafts = draft_addresses(client, ns)
    assert set(drafts) >= {"draft-1", "draft-2"}
    assert drafts["draft-1"] != drafts["draft-2"]
    assert scaled_stack.replica_envs["verify"]["SAGUARO_VERIFY_METRICS_PORT"] != scaled_stack.replica_envs["verify-2"]["SAGUARO_VERIFY_METRICS_PORT"]
    with httpx.Client(timeout=10) as http:
        for name in scaled_stack.processes:
            assert http.get(scaled_stack.health_url(name)).status_code == 200, name


def test_concurrent_requests_use_every_replica(scaled_stack, reference):
    client, ns = redis_of(scaled_stack)
    drafts = draft_addresses(client, ns)
    prompts = [PROMPTS[index % len(PROMPTS)] for index in range(NUM_REQUESTS)]
    with ThreadPoolExecutor(max_workers=NUM_REQUESTS) as pool:
        bodies = list(pool.map(lambda prompt: complete(scaled_stack.base_url, prompt), prompts))

    for index, body in enumerate(bodies):
        expected = reference[index % len(PROMPTS)]
        assert body["choices"][0]["text"] == words(expected), f"request {index}"
        assert body["choices"][0]["finish_reason"] == "length"
        assert body["usage"]["completion_tokens"] == MAX_TOKENS

    # Without a client-provided X-Request-Id, the response id is the engine request id.
    states = [request_state(client, ns, body["id"]) for body in bodies]
    assert all(state.get("status") == "finished" for state in states), states
    assert {state["verify"] for state in states} == {"verify-1", "verify-2"}
    used_drafts = {state["draft"] for state in states}
    assert drafts["draft-1"] in used_drafts
    assert drafts["draft-2"] in used_drafts


def test_draft_replica_joins(scaled_stack, reference):
    """A draft started after the others becomes live, gets requests and keeps the output exact."""
    client, ns = redis_of(scaled_stack)
    name = scaled_stack.add_replica("draft")
    assert name == "draft-3"
    joined = draft_addresses(client, ns).get("draft-3")
    assert joined == scaled_stack.replica_envs["draft-3"]["SAGUARO_DRAFT_BIND"]

    # Verify replicas list live drafts at most once a second (draft_client.REFRESH_S).
    time.sleep(1.5)
    request_ids = [submit(client, ns, PROMPTS[index % len(PROMPTS)], temperature=0.0, max_tokens=MAX_TOKENS, ignore_eos=True) for index in range(6)]
    for index, request_id in enumerate(request_ids):
        result = collect(client, ns, request_id, timeout_s=180)
        assert result.finish is not None, result.error
        assert result.token_ids == reference[index % len(PROMPTS)], f"request {index}"
    used_drafts = {request_state(client, ns, request_id)["draft"] for request_id in request_ids}
    assert joined in used_drafts


# -- a verify replica leaves ---------------------------------------------------------


def test_verify_replica_leaves(tiny_pair, tmp_path_factory, reference):
    """SIGTERM one of two verify replicas: the other takes its running request over and serves new requests."""
    stack = start_replicated_stack(tiny_pair, tmp_path_factory.mktemp("logs-leave"), {"verify": 2}, services=("draft", "verify"))
    try:
        client, ns = redis_of(stack)
        # Each replica takes one request at a time, so two long requests occupy both.
        long_ids = [submit(client, ns, PROMPTS[0], temperature=0.0, max_tokens=2000, ignore_eos=True) for _ in range(2)]
        owners = {}
        deadline = time.monotonic() + 60
        while len(owners) < 2 and time.monotonic() < deadline:
            for request_id in long_ids:
                owner = request_state(client, ns, request_id).get("verify")
                if owner:
                    owners[owner] = request_id
            time.sleep(0.05)
        assert set(owners) == {"verify-1", "verify-2"}

        leaving = stack.processes["verify-2"]
        leaving.send_signal(signal.SIGTERM)
        assert leaving.wait(timeout=30) == 0

        assert not client.exists(keys.replica(ns, "verify", "verify-2"))

        # verify-1 takes one request at a time: free it, and it continues verify-2's request.
        client.set(keys.cancel(ns, owners["verify-1"]), "1", ex=60)
        assert collect(client, ns, owners["verify-1"], timeout_s=60).finish.finish_reason == "abort"
        handed = collect(client, ns, owners["verify-2"], timeout_s=120)
        assert handed.finish is not None, handed.error
        assert handed.finish.finish_reason == "length"
        assert len(handed.token_ids) == 2000
        assert handed.token_ids[:MAX_TOKENS] == reference[0]
        assert request_state(client, ns, owners["verify-2"])["verify"] == "verify-1"
        assert not client.sismember(keys.inflight(ns), owners["verify-2"])

        new_ids = [submit(client, ns, prompt, temperature=0.0, max_tokens=MAX_TOKENS, ignore_eos=True) for prompt in PROMPTS]
        for index, (request_id, expected) in enumerate(zip(new_ids, reference)):
            result = collect(client, ns, request_id, timeout_s=120)
            assert result.finish is not None, result.error
            assert result.token_ids == expected, f"prompt {index}"
        served_by = {request_state(client, ns, request_id)["verify"] for request_id in new_ids}
        assert served_by == {"verify-1"}
    finally:
        stack.stop()
