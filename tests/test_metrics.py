"""Metrics, health endpoints and client disconnects of a one-replica SSD stack of the tiny pair.

The stack runs the real gateway, verify and draft processes against real
Redis. Metrics are read from each service's ``/metrics`` text exposition.
"""

from __future__ import annotations

import time
import uuid
from collections import defaultdict
from pathlib import Path

import httpx
import pytest
import redis
from prometheus_client.parser import text_string_to_metric_families

from services.launcher import Stack
from shared import keys
from tests.tiny_models import save_tiny_pair, tiny_stack_env

pytestmark = pytest.mark.integration

PROMPT = "w5 w9 w33 w2 w71"
MAX_TOKENS = 40


@pytest.fixture(scope="module")
def stack(tmp_path_factory):
    target, draft = save_tiny_pair(tmp_path_factory.mktemp("models"), draft_noise=0.1)
    env = tiny_stack_env(target, draft, namespace=f"metrics-{uuid.uuid4().hex[:8]}")
    deployment = Stack(env=env, log_dir=tmp_path_factory.mktemp("logs-metrics"), start_timeout_s=120)
    deployment.start()
    yield deployment
    deployment.stop()


def redis_of(stack: Stack) -> tuple[redis.Redis, str]:
    return redis.Redis.from_url(stack.redis_url), stack.env["SAGUARO_NAMESPACE"]


class Scrape:
    """Samples of one ``/metrics`` response, summed over the labels a lookup leaves out."""

    def __init__(self, text: str) -> None:
        self.samples: dict[str, list[tuple[dict[str, str], float]]] = defaultdict(list)
        for family in text_string_to_metric_families(text):
            for sample in family.samples:
                self.samples[sample.name].append((sample.labels, sample.value))

    def value(self, name: str, **labels: str) -> float:
        """Return the sum of the samples called ``name`` whose labels include ``labels``; 0 when there are none."""
        return sum(value for sample_labels, value in self.samples.get(name, []) if labels.items() <= sample_labels.items())


def scrape(stack: Stack, name: str) -> Scrape:
    response = httpx.get(stack.metrics_url(name), timeout=10)
    assert response.status_code == 200, f"{name} /metrics returned {response.status_code}"
    return Scrape(response.text)


def scrape_all(stack: Stack) -> dict[str, Scrape]:
    return {name: scrape(stack, name) for name in ("verify", "draft", "gateway")}


def complete(stack: Stack) -> dict:
    body = {"prompt": PROMPT, "max_tokens": MAX_TOKENS, "temperature": 0, "ignore_eos": True}
    response = httpx.post(f"{stack.base_url}/v1/completions", json=body, timeout=120)
    assert response.status_code == 200, response.text
    return response.json()


# -- metrics ---------------------------------------------------------------------------

VERIFY_COUNTERS = [
    ("saguaro:spec_decode_num_drafts_total", {}),
    ("saguaro:spec_decode_num_draft_tokens_total", {}),
    ("saguaro:spec_decode_num_accepted_tokens_total", {}),
    ("saguaro:spec_decode_num_accepted_tokens_per_pos_total", {"position": "0"}),
    ("saguaro:spec_cache_lookups_total", {}),
    ("saguaro:verify_step_seconds_count", {}),
    ("saguaro:generation_tokens_total", {}),
    ("saguaro:request_success_total", {"finished_reason": "length"}),
]


def test_request_moves_service_metrics(stack):
    before = scrape_all(stack)
    body = complete(stack)
    assert body["usage"]["completion_tokens"] == MAX_TOKENS
    after = scrape_all(stack)

    for name, labels in VERIFY_COUNTERS:
        assert after["verify"].value(name, **labels) > before["verify"].value(name, **labels), f"verify {name}{labels}"
    drafted = after["verify"].value("saguaro:spec_decode_num_draft_tokens_total") - before["verify"].value("saguaro:spec_decode_num_draft_tokens_total")
    accepted = after["verify"].value("saguaro:spec_decode_num_accepted_tokens_total") - before["verify"].value("saguaro:spec_decode_num_accepted_tokens_total")
    assert 0 < accepted <= drafted
    lookups = after["verify"].value("saguaro:spec_cache_lookups_total") - before["verify"].value("saguaro:spec_cache_lookups_total")
    saguaro = body["saguaro"]
    assert lookups == saguaro["cache_hits"] + saguaro["cache_misses"]

    def grew(name: str, **labels: str) -> float:
        return after["verify"].value(name, **labels) - before["verify"].value(name, **labels)

    ranked = grew("saguaro:spec_cache_committed_rank_count")
    assert 0 < ranked <= lookups
    ranked_hits = grew("saguaro:spec_cache_committed_rank_count", result="hit")
    assert ranked_hits <= saguaro["cache_hits"]
    # A hit's token was among the draft's candidates, so it lies in a finite bucket.
    assert grew("saguaro:spec_cache_committed_rank_bucket", result="hit", le="15.0") == ranked_hits
    assert grew("saguaro:verify_steps_total", kind="cache") >= saguaro["cache_hits"] + saguaro["cache_misses"]

    for phase in ("glue", "fork", "tree", "publish"):
        name = "saguaro:draft_cache_build_seconds_count"
        assert after["draft"].value(name, phase=phase) > before["draft"].value(name, phase=phase), f"draft {name} phase={phase}"
    assert after["draft"].value("saguaro:draft_cache_entries_total") > before["draft"].value("saguaro:draft_cache_entries_total")

    requests = "saguaro:requests_total"
    labels = {"endpoint": "/v1/completions", "status": "200"}
    assert after["gateway"].value(requests, **labels) == before["gateway"].value(requests, **labels) + 1
    ttft = "saguaro:time_to_first_token_seconds_count"
    assert after["gateway"].value(ttft) == before["gateway"].value(ttft) + 1
    tokens = "saguaro:generation_tokens_total"
    assert after["gateway"].value(tokens) == before["gateway"].value(tokens) + MAX_TOKENS


READINESS_PATHS = ("/health/ready", "/readyz", "/health")
HEALTH_ENDPOINTS = [
    *((service, path) for service in ("verify", "draft") for path in ("/health/live", "/livez", *READINESS_PATHS)),
    ("gateway", "/health/live"),
    ("gateway", "/health"),
]


@pytest.mark.parametrize(("service", "path"), HEALTH_ENDPOINTS)
def test_health_endpoint_answers_ok(stack, service, path):
    base = stack.http_base_url(service)
    response = httpx.get(base + path, timeout=10)
    assert response.status_code == 200, response.text
    if path in READINESS_PATHS:
        assert response.json()["status"] == "ready"
    else:
        assert response.json()["status"] == "alive"


# -- client disconnect -------------------------------------------------------------------


def find_engine_request_id(client: redis.Redis, ns: str, prefix: str, timeout_s: float = 10.0) -> str:
    """Return the id of the engine request whose state hash key starts with ``prefix``, waiting until verify creates it."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        found = [key.decode() for key in client.scan_iter(match=keys.state(ns, prefix + "*"), count=1000)]
        if found:
            assert len(found) == 1, found
            return found[0][len(f"{ns}:req:"):-len(":state")]
        time.sleep(0.05)
    raise TimeoutError(f"no state hash for a request id starting with {prefix!r} within {timeout_s} s")


@pytest.mark.parametrize("client_request_id", [False, True], ids=["gateway-id", "client-id"])
def test_disconnect_aborts_request(stack, client_request_id):
    """Closing a streaming response cancels the engine request: it finishes with abort and leaves the inflight set."""
    client, ns = redis_of(stack)
    headers = {}
    if client_request_id:
        headers["X-Request-Id"] = f"disconnect-{uuid.uuid4().hex[:8]}"
    body = {"prompt": PROMPT, "max_tokens": 3000, "temperature": 0, "ignore_eos": True, "stream": True}

    with httpx.Client(base_url=stack.base_url, timeout=60) as http:
        with http.stream("POST", "/v1/completions", json=body, headers=headers) as response:
            assert response.status_code == 200
            gateway_id = response.headers["x-request-id"]
            chunks = 0
            for line in response.iter_lines():
                if line.startswith("data: "):
                    chunks += 1
                if chunks == 3:
                    break
    closed_at = time.monotonic()

    if client_request_id:
        # The gateway keeps the client's id and appends a random suffix to the engine request id.
        assert gateway_id == headers["X-Request-Id"]
        request_id = find_engine_request_id(client, ns, gateway_id + "-")
    else:
        request_id = gateway_id
    state_key = keys.state(ns, request_id)

    # The gateway sets the cancel key when the connection closes, and verify checks it before every step.
    deadline = closed_at + 5.0
    while time.monotonic() < deadline and client.hget(state_key, "status") != b"finished":
        time.sleep(0.05)
    state = client.hgetall(state_key)
    assert state.get(b"status") == b"finished", state
    assert state.get(b"finish_reason") == b"abort", state
    assert int(state[b"completion_tokens"]) < 3000
    assert not client.sismember(keys.inflight(ns), request_id)
    assert client.exists(keys.cancel(ns, request_id))
