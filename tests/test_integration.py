"""End-to-end tests: real Redis, and the draft, verify and gateway services as real processes.

The models are a tiny random target and a draft made from it with noisy
weights (both fp32), so acceptance is high but not total and both cache hits
and misses occur. The reference is target-only greedy decoding in this process.
"""

from __future__ import annotations

import json
import time
import uuid
from pathlib import Path

import httpx
import pytest
import redis
import torch

from bench.direct_client import collect, generate, submit
from services.launcher import Stack
from shared import keys
from tests.tiny_models import save_tiny_pair, target_greedy

pytestmark = pytest.mark.integration

PROMPTS = [[5, 9, 33, 2, 71], [1, 2, 3], [40, 41, 42, 43, 44, 45, 46, 47, 48, 49, 50, 51]]
MAX_TOKENS = 40


@pytest.fixture(scope="module")
def tiny_pair(tmp_path_factory) -> tuple[Path, Path]:
    return save_tiny_pair(tmp_path_factory.mktemp("models"), draft_noise=0.1)


@pytest.fixture(scope="module")
def reference(tiny_pair) -> list[list[int]]:
    return target_greedy(tiny_pair[0], PROMPTS, MAX_TOKENS)


def start_stack(tiny_pair, tmp_path_factory, mode: str, **extra) -> Stack:
    target, draft = tiny_pair
    env = {
        "SAGUARO_NAMESPACE": f"it-{mode}-{uuid.uuid4().hex[:8]}",
        "SAGUARO_TARGET_MODEL": str(target),
        "SAGUARO_DRAFT_MODEL": str(draft),
        "SAGUARO_DTYPE": "float32",
        "SAGUARO_DRAFT_QUANTIZATION": "none",
        "SAGUARO_MODE": mode,
        "SAGUARO_NUM_SPECULATIVE_TOKENS": "3",
        # The tiny models' forwards cost about the same as the draft's builds, so the back-off
        # would pause speculation; these tests exercise the speculative paths.
        "SAGUARO_SPECULATION_BACKOFF": "false",
        **{f"SAGUARO_{k.upper()}": str(v) for k, v in extra.items()},
    }
    stack = Stack(env=env, log_dir=tmp_path_factory.mktemp(f"logs-{mode}"), start_timeout_s=120)
    stack.start()
    return stack


@pytest.fixture(scope="module", params=["ar", "sd", "ssd"])
def stack(request, tiny_pair, tmp_path_factory):
    deployment = start_stack(tiny_pair, tmp_path_factory, request.param)
    yield deployment
    deployment.stop()


@pytest.fixture(scope="module")
def ssd_stack(tiny_pair, tmp_path_factory):
    deployment = start_stack(tiny_pair, tmp_path_factory, "ssd")
    yield deployment
    deployment.stop()


def redis_of(stack: Stack) -> tuple[redis.Redis, str]:
    return redis.Redis.from_url(stack.redis_url), stack.env["SAGUARO_NAMESPACE"]


def complete(stack: Stack, **body) -> dict:
    with httpx.Client(base_url=stack.base_url, timeout=120) as client:
        model = client.get("/v1/models").json()["data"][0]["id"]
        response = client.post("/v1/completions", json={"model": model, **body})
    assert response.status_code == 200, response.text
    return response.json()


def stream_completion(stack: Stack, **body) -> tuple[list[dict], list[str]]:
    chunks, raw = [], []
    with httpx.Client(base_url=stack.base_url, timeout=120) as client:
        model = client.get("/v1/models").json()["data"][0]["id"]
        with client.stream("POST", "/v1/completions", json={"model": model, "stream": True, **body}) as response:
            assert response.status_code == 200
            for line in response.iter_lines():
                if not line.startswith("data: "):
                    continue
                raw.append(line[6:])
                if line[6:] != "[DONE]":
                    chunks.append(json.loads(line[6:]))
    return chunks, raw


def words(token_ids: list[int]) -> str:
    return " ".join(f"w{t}" for t in token_ids)


# -- every mode ------------------------------------------------------------------


def test_greedy_equals_target_greedy(stack, reference):
    client, ns = redis_of(stack)
    for prompt, expected in zip(PROMPTS, reference):
        result = generate(client, ns, prompt, temperature=0.0, max_tokens=MAX_TOKENS, ignore_eos=True)
        assert result.finish is not None, result.error
        assert result.token_ids == expected
        # The first step commits the root's successor plus the drafts it accepts (K = 3 here).
        first_step = result.finish.stats.first_step_tokens
        if stack.env["SAGUARO_MODE"] == "ar":
            assert first_step == 1
        else:
            assert 1 <= first_step <= 4


def test_gateway_text_equals_reference(stack, reference):
    body = complete(stack, prompt=words(PROMPTS[0]), max_tokens=MAX_TOKENS, temperature=0, ignore_eos=True)
    assert body["choices"][0]["text"] == words(reference[0])
    assert body["usage"]["completion_tokens"] == MAX_TOKENS
    assert body["usage"]["prompt_tokens"] == len(PROMPTS[0])


def test_streamed_deltas_join_to_the_text(stack):
    body = complete(stack, prompt=words(PROMPTS[2]), max_tokens=25, temperature=0, ignore_eos=True)
    chunks, raw = stream_completion(stack, prompt=words(PROMPTS[2]), max_tokens=25, temperature=0, ignore_eos=True)
    joined = "".join(c["choices"][0]["text"] for c in chunks if c["choices"])
    assert joined == body["choices"][0]["text"]
    assert raw[-1] == "[DONE]"
    assert chunks[-1]["choices"][0]["finish_reason"] == "length"


@pytest.mark.parametrize("max_tokens", [1, 2, 7, 16])
def test_max_tokens_is_exact(stack, max_tokens):
    client, ns = redis_of(stack)
    result = generate(client, ns, PROMPTS[0], temperature=0.0, max_tokens=max_tokens, ignore_eos=True)
    assert len(result.token_ids) == max_tokens
    assert result.finish.usage.completion_tokens == max_tokens
    assert result.finish.finish_reason == "length"


def test_stop_string_cuts_exactly(stack, reference):
    expected = reference[2]
    # A stop string made of tokens 6 and 7 of the greedy output: the output must end before it.
    stop = f"w{expected[6]} w{expected[7]}"
    first = words(expected).find(stop)
    body = complete(stack, prompt=words(PROMPTS[2]), max_tokens=MAX_TOKENS, temperature=0, ignore_eos=True, stop=[stop])
    choice = body["choices"][0]
    assert choice["finish_reason"] == "stop"
    assert choice["text"] == words(expected)[:first]
    client, ns = redis_of(stack)
    result = generate(client, ns, PROMPTS[2], temperature=0.0, max_tokens=MAX_TOKENS, ignore_eos=True, stop=[stop])
    assert result.finish.stop_reason == stop
    # The tokens up to the one that completed the stop string are counted, and none after it.
    assert result.token_ids == expected[: len(result.token_ids)]
    assert words(result.token_ids).endswith(stop)


def test_seeded_sampling_is_reproducible(stack):
    client, ns = redis_of(stack)
    runs = [generate(client, ns, PROMPTS[1], temperature=0.9, top_p=0.95, seed=seed, max_tokens=20, ignore_eos=True).token_ids for seed in (7, 7, 8)]
    assert runs[0] == runs[1]
    assert runs[0] != runs[2]


# -- across modes: sampling at T > 0 gives the same tokens for the same seed ----------


def test_sampled_output_is_identical_across_modes(tiny_pair, tmp_path_factory):
    outputs = {}
    for mode in ("ar", "ssd"):
        deployment = start_stack(tiny_pair, tmp_path_factory, mode)
        try:
            client, ns = redis_of(deployment)
            outputs[mode] = [
                generate(client, ns, prompt, temperature=1.0, top_k=50, seed=seed, max_tokens=30, ignore_eos=True).token_ids
                for seed, prompt in enumerate(PROMPTS)
            ]
        finally:
            deployment.stop()
    assert outputs["ssd"] == outputs["ar"]


# -- SSD specifics ---------------------------------------------------------------------


def test_ssd_records_cache_hits(ssd_stack):
    client, ns = redis_of(ssd_stack)
    result = generate(client, ns, PROMPTS[0], temperature=0.0, max_tokens=MAX_TOKENS, ignore_eos=True)
    stats = result.finish.stats
    assert stats.cache_hits > 0
    assert stats.cache_hits + stats.cache_misses == stats.steps - 1
    assert stats.accepted_tokens > 0
    body = complete(ssd_stack, prompt=words(PROMPTS[0]), max_tokens=MAX_TOKENS, temperature=0, ignore_eos=True)
    assert body["saguaro"]["cache_hits"] > 0


def test_redis_holds_cache_entries_during_a_request(ssd_stack):
    client, ns = redis_of(ssd_stack)
    request_id = submit(client, ns, PROMPTS[2], temperature=0.0, max_tokens=400, ignore_eos=True)
    seen = 0
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline and not seen:
        seen = sum(1 for _ in client.scan_iter(match=keys.spec_pattern(ns, request_id), count=1000))
    assert seen > 0
    # Only the entries of the latest step are kept while the request runs.
    assert seen <= 8
    collect(client, ns, request_id)
    # The draft deletes the last step's entries when the verifier releases the request.
    leftover = ["pending"]
    deadline = time.monotonic() + 5
    while leftover and time.monotonic() < deadline:
        leftover = list(client.scan_iter(match=keys.spec_pattern(ns, request_id), count=1000))
    assert leftover == []


def test_cancel_frees_the_request(ssd_stack):
    client, ns = redis_of(ssd_stack)
    request_id = submit(client, ns, PROMPTS[0], temperature=0.0, max_tokens=900, ignore_eos=True)
    time.sleep(0.5)
    client.set(keys.cancel(ns, request_id), "1", ex=60)
    result = collect(client, ns, request_id, timeout_s=30)
    assert result.finish.finish_reason == "abort"
    assert len(result.token_ids) < 900
    assert not client.sismember(keys.inflight(ns), request_id)
    assert client.hget(keys.state(ns, request_id), "status") == b"finished"


def test_cancel_during_prefill_stops_it(ssd_stack):
    client, ns = redis_of(ssd_stack)
    request_id = f"test-prefill-{uuid.uuid4().hex[:8]}"
    # Cancelled before the verifier reads it: the verifier checks before each prefill chunk, so none runs.
    client.set(keys.cancel(ns, request_id), "1", ex=60)
    submit(client, ns, (PROMPTS[0] * 200)[:900], request_id=request_id, temperature=0.0, max_tokens=50)
    result = collect(client, ns, request_id, timeout_s=30)
    assert result.finish.finish_reason == "abort"
    assert result.token_ids == []
    assert not client.sismember(keys.inflight(ns), request_id)
    verify_log = (ssd_stack.log_dir / "verify.log").read_text(errors="replace")
    assert f"request {request_id} cancelled by the client during prefill" in verify_log


def test_draft_restart_keeps_output_exact(tiny_pair, tmp_path_factory, reference):
    """Kill the draft mid-request and start a new one: the verifier re-prefills it and output stays exact."""
    import signal
    import subprocess
    import sys

    deployment = start_stack(tiny_pair, tmp_path_factory, "ssd")
    try:
        client, ns = redis_of(deployment)
        request_id = submit(client, ns, PROMPTS[0], temperature=0.0, max_tokens=MAX_TOKENS, ignore_eos=True)
        time.sleep(0.3)
        old = deployment.processes["draft"]
        old.send_signal(signal.SIGKILL)
        old.wait()
        client.delete(*list(client.scan_iter(match=keys.replica_pattern(ns, "draft"))))
        log = open(Path(deployment.log_dir) / "draft-restarted.log", "ab")
        deployment.processes["draft"] = subprocess.Popen([sys.executable, "-m", "services.draft.main"], env=deployment.env, stdout=log, stderr=subprocess.STDOUT)
        result = collect(client, ns, request_id, timeout_s=120)
        assert result.finish is not None, result.error
        assert result.token_ids == reference[0]
    finally:
        deployment.stop()


def sampled_reference(model_dir, prompt: list[int], max_tokens: int, **sampling) -> list[int]:
    """Decode with the target alone through the verify engine's sampler: the exact AR output for a seed."""
    from transformers import AutoModelForCausalLM

    from services.verify.engine import TargetEngine
    from shared.protocol import SamplingParams

    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32, use_kernels=False)
    engine = TargetEngine(model, torch.device("cpu"))
    params = SamplingParams(max_tokens=max_tokens, **sampling)
    seq = engine.prefill("reference", prompt)
    tokens: list[int] = []
    while len(tokens) < max_tokens:
        tokens.extend(engine.verify(seq, [], params).committed)
    return tokens[:max_tokens]


@pytest.mark.parametrize("backup", ["jit", "ngram", "none", "auto"])
def test_ssd_backups_stay_exact(backup, tiny_pair, tmp_path_factory, reference):
    sampling = {"temperature": 1.0, "top_p": 0.9, "seed": 5}
    expected_sampled = sampled_reference(tiny_pair[0], PROMPTS[1], 30, **sampling)
    deployment = start_stack(tiny_pair, tmp_path_factory, "ssd", backup=backup)
    try:
        client, ns = redis_of(deployment)
        runs: dict[str, int] = {}
        for prompt, expected in zip(PROMPTS, reference):
            result = generate(client, ns, prompt, temperature=0.0, max_tokens=MAX_TOKENS, ignore_eos=True)
            assert result.token_ids == expected
            for kind, count in result.finish.stats.backup_runs.items():
                runs[kind] = runs.get(kind, 0) + count
        sampled = generate(client, ns, PROMPTS[1], max_tokens=30, ignore_eos=True, **sampling)
        assert sampled.token_ids == expected_sampled
    finally:
        deployment.stop()
    assert sum(runs.values()) > 0, "no cache miss happened, so no backup ran"
    if backup == "jit":
        assert set(runs) == {"jit"}
    if backup == "none":
        assert set(runs) == {"none"}
    if backup == "ngram":
        # Prompt lookup falls back to none when it finds no match.
        assert set(runs) <= {"ngram", "none"}


def test_rejection_acceptance_with_saguaro_c(tiny_pair, tmp_path_factory, reference):
    """Rejection acceptance with C = 0.5: greedy output stays exact, sampled output runs with cache hits and seeds repeat.

    Under the rejection test the sampled tokens depend on the q of each draft.
    C reshapes q over the top-f tokens of the fan-out list in use, and an
    n-gram backup's q is one-hot, so a seed repeats only with a fixed fan-out
    list and backup: the test fixes both.
    """
    deployment = start_stack(tiny_pair, tmp_path_factory, "ssd", acceptance="rejection", saguaro_c=0.5, fanout="2,2,2,2", backup="jit")
    try:
        client, ns = redis_of(deployment)
        greedy = generate(client, ns, PROMPTS[0], temperature=0.0, max_tokens=MAX_TOKENS, ignore_eos=True)
        assert greedy.token_ids == reference[0]
        runs = [generate(client, ns, PROMPTS[2], temperature=1.0, seed=seed, max_tokens=30, ignore_eos=True) for seed in (3, 3)]
    finally:
        deployment.stop()
    assert runs[0].token_ids == runs[1].token_ids
    assert len(runs[0].token_ids) == 30
    stats = runs[0].finish.stats
    assert stats.cache_hits > 0
    assert stats.accepted_tokens > 0
