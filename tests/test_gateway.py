"""Gateway REST API against real Redis, with a fake verify worker in place of the verify service."""

from __future__ import annotations

import asyncio
import json
import logging
import time

import httpx
import openai
import pytest
from fastapi.testclient import TestClient

from shared import keys
from tests.gateway_fakes import (  # noqa: F401  (fixtures are used by name)
    MODEL_NAME,
    SCRIPT,
    FakeVerifyWorker,
    UvicornThread,
    gateway_factory,
    parse_sse,
    redis_client,
    tiny_model_dir,
    tiny_tokenizer,
    wait_until,
)

pytestmark = pytest.mark.timeout(120)

COMPLETIONS = "/v1/completions"
CHAT = "/v1/chat/completions"
USER_MESSAGE = [{"role": "user", "content": "hello world"}]
LONG_PROMPT = " ".join(["hello"] * 120)  # 120 tokens, while max_model_len is 128 in these tests


def completion(**fields):
    return {"model": MODEL_NAME, "prompt": "hello world", "max_tokens": 4, **fields}


def chat(**fields):
    return {"model": MODEL_NAME, "messages": USER_MESSAGE, "max_tokens": 4, **fields}


def script_text(start: int, count: int) -> str:
    return " ".join(SCRIPT[(start + i) % len(SCRIPT)] for i in range(count))


@pytest.fixture
def served(gateway_factory, tiny_tokenizer):
    """A ready gateway (TestClient) with a fake worker, plus its settings."""
    settings, app = gateway_factory()
    with TestClient(app) as client, FakeVerifyWorker(settings, tiny_tokenizer) as worker:
        yield client, worker, settings


# Validation.

VALIDATION_CASES = [
    # (endpoint, body, param, text the message must contain)
    (COMPLETIONS, completion(temperature=2.5), "temperature", "less than or equal to 2"),
    (COMPLETIONS, completion(temperature=-0.1), "temperature", "greater than or equal to 0"),
    (COMPLETIONS, completion(temperature="hot"), "temperature", "valid number"),
    (COMPLETIONS, completion(top_p=0), "top_p", "greater than 0"),
    (COMPLETIONS, completion(top_p=1.5), "top_p", "less than or equal to 1"),
    (COMPLETIONS, completion(top_k=-2), "top_k", "greater than or equal to -1"),
    (COMPLETIONS, completion(n=0), "n", "greater than or equal to 1"),
    (COMPLETIONS, completion(n=9), "n", "less than or equal to 8"),
    (COMPLETIONS, completion(max_tokens=0), "max_tokens", "greater than or equal to 1"),
    (COMPLETIONS, completion(max_tokens=101), "max_tokens", "at most 100"),
    (COMPLETIONS, completion(prompt=LONG_PROMPT, max_tokens=20), "max_tokens", "context length is 128"),
    (COMPLETIONS, completion(prompt=" ".join(["hello"] * 128)), "prompt", "shorten the prompt"),
    (COMPLETIONS, completion(prompt=[7, 8, 999]), "prompt", "not a valid token id"),
    (COMPLETIONS, completion(prompt=[]), "prompt", "must not be empty"),
    (COMPLETIONS, completion(prompt=["hello", "world"]), "prompt", "batched prompts are not supported"),
    (COMPLETIONS, completion(prompt=5), "prompt", "string or a list of token ids"),
    (COMPLETIONS, {"model": MODEL_NAME, "max_tokens": 4}, "prompt", "prompt is required"),
    (COMPLETIONS, completion(stop=["x"] * 17), "stop", "at most 16 stop strings"),
    (COMPLETIONS, completion(stop=""), "stop", "must not be empty"),
    (COMPLETIONS, completion(stop=3), "stop", "string or a list of strings"),
    (COMPLETIONS, completion(stop_token_ids=[-1]), "stop_token_ids", "non-negative"),
    (COMPLETIONS, completion(stop_token_ids=[9999]), "stop_token_ids", "not a valid token id"),
    (COMPLETIONS, completion(seed=-1), "seed", "greater than or equal to 0"),
    (COMPLETIONS, completion(seed=2**63 - 1, n=2), "seed", "too large for n=2"),
    (COMPLETIONS, completion(logprobs=21), "logprobs", "less than or equal to 20"),
    (COMPLETIONS, completion(echo=True), "echo", "echo=true is not supported"),
    (COMPLETIONS, completion(suffix="end"), "suffix", "suffix is not supported"),
    (COMPLETIONS, completion(stream_options={"include_usage": True}), "stream_options", "only allowed when stream is true"),
    (COMPLETIONS, completion(presence_penalty=0.5), "presence_penalty", "penalties are not supported"),
    (COMPLETIONS, completion(frequency_penalty=1), "frequency_penalty", "penalties are not supported"),
    (COMPLETIONS, completion(logit_bias={"7": 5}), "logit_bias", "logit_bias is not supported"),
    (COMPLETIONS, completion(best_of=3), "best_of", "equal to n"),
    (CHAT, chat(messages=[]), "messages", "at least 1 item"),
    (CHAT, chat(messages=[{"role": "wizard", "content": "hi"}]), "messages[0].role", "input should be 'system'"),
    (CHAT, chat(messages=[{"content": "hi"}]), "messages[0].role", "is required"),
    (
        CHAT,
        chat(messages=[{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "x"}}]}]),
        "messages[0].content[0]",
        "not supported",
    ),
    (CHAT, chat(messages=[{"role": "user", "content": 5}]), "messages[0].content", "string or a list"),
    (CHAT, chat(top_logprobs=2), "top_logprobs", "requires logprobs=true"),
    (CHAT, chat(logprobs=True, top_logprobs=21), "top_logprobs", "less than or equal to 20"),
    (CHAT, chat(max_tokens=4, max_completion_tokens=5), "max_completion_tokens", "disagree"),
    (CHAT, chat(max_tokens=None, max_completion_tokens=101), "max_completion_tokens", "at most 100"),
    (CHAT, chat(tools=[{"type": "function", "function": {"name": "f"}}]), "tools", "tool calling is not supported"),
    (CHAT, chat(response_format={"type": "json_object"}), "response_format", "not supported"),
    (CHAT, chat(temperature=3), "temperature", "less than or equal to 2"),
    (CHAT, chat(n=9), "n", "less than or equal to 8"),
]


@pytest.mark.parametrize(
    ("endpoint", "body", "param", "message_part"),
    VALIDATION_CASES,
    ids=[
        f"{'chat' if endpoint == CHAT else 'completion'}-{param}-{index}"
        for index, (endpoint, _, param, _) in enumerate(VALIDATION_CASES)
    ],
)
def test_invalid_request_names_field(served, redis_client, endpoint, body, param, message_part):
    client, worker, settings = served
    response = client.post(endpoint, json=body)
    assert response.status_code == 400, response.text
    error = response.json()["error"]
    assert error["type"] == "invalid_request_error"
    assert error["param"] == param
    assert message_part in error["message"]
    assert error["code"] is None
    assert redis_client.xlen(keys.request_stream(settings.namespace)) == 0
    assert redis_client.scard(keys.inflight(settings.namespace)) == 0


@pytest.mark.parametrize(
    ("content", "message_part"),
    [
        (b'{"prompt": "hello"', "not valid JSON"),
        (b"[1, 2, 3]", "invalid request body"),
        (b"", "request body is missing"),
    ],
)
def test_malformed_body_is_400(served, redis_client, content, message_part):
    client, _worker, settings = served
    response = client.post(COMPLETIONS, content=content, headers={"Content-Type": "application/json"})
    assert response.status_code == 400, response.text
    error = response.json()["error"]
    assert error["type"] == "invalid_request_error"
    assert message_part in error["message"]
    assert redis_client.xlen(keys.request_stream(settings.namespace)) == 0


def test_body_without_json_content_type_is_400(served, redis_client):
    client, _worker, settings = served
    # What `curl -d` sends without -H 'Content-Type: application/json'.
    response = client.post(COMPLETIONS, content=json.dumps(completion()).encode(), headers={"Content-Type": "application/x-www-form-urlencoded"})
    assert response.status_code == 400, response.text
    assert "Content-Type: application/json" in response.json()["error"]["message"]
    assert redis_client.xlen(keys.request_stream(settings.namespace)) == 0


def test_unknown_model_is_404(served, redis_client):
    client, _worker, settings = served
    response = client.post(COMPLETIONS, json=completion(model="gpt-4"))
    assert response.status_code == 404
    error = response.json()["error"]
    assert error["code"] == "model_not_found"
    assert error["param"] == "model"
    assert MODEL_NAME in error["message"]
    assert client.get("/v1/models/gpt-4").status_code == 404
    assert redis_client.xlen(keys.request_stream(settings.namespace)) == 0


def test_body_over_limit_is_413(gateway_factory, tiny_tokenizer, redis_client):
    settings, app = gateway_factory(max_request_bytes=2048)
    with TestClient(app) as client, FakeVerifyWorker(settings, tiny_tokenizer):
        response = client.post(COMPLETIONS, json=completion(prompt="hello " * 1000))
        assert response.status_code == 413
        assert "2048 bytes" in response.json()["error"]["message"]
        # A chunked body has no Content-Length, so the limit is enforced while reading.
        chunks = iter([b'{"prompt": "', b"hello " * 400, b"hello " * 400, b'"}'])
        response = client.post(COMPLETIONS, content=chunks, headers={"Content-Type": "application/json"})
        assert response.status_code == 413
        assert client.post(COMPLETIONS, json=completion()).status_code == 200
    assert redis_client.xlen(keys.request_stream(settings.namespace)) == 1


def test_unknown_route_uses_error_shape(served):
    client, _worker, _settings = served
    response = client.get("/v1/does-not-exist")
    assert response.status_code == 404
    assert response.json()["error"]["type"] == "not_found_error"


# Authentication.


def test_api_key_required_on_v1(gateway_factory, tiny_tokenizer, caplog):
    settings, app = gateway_factory(api_keys=["first-secret-key", "second-secret-key"])
    caplog.set_level(logging.DEBUG)
    with TestClient(app) as client, FakeVerifyWorker(settings, tiny_tokenizer):
        missing = client.post(COMPLETIONS, json=completion())
        assert missing.status_code == 401
        assert missing.json()["error"]["code"] == "invalid_api_key"
        assert missing.headers["www-authenticate"] == "Bearer"

        wrong = client.post(COMPLETIONS, json=completion(), headers={"Authorization": "Bearer wrong-key"})
        assert wrong.status_code == 401
        assert "wrong-key" not in wrong.text

        not_bearer = client.get("/v1/models", headers={"Authorization": "Basic first-secret-key"})
        assert not_bearer.status_code == 401

        ok = client.post(COMPLETIONS, json=completion(), headers={"Authorization": "Bearer second-secret-key"})
        assert ok.status_code == 200
        models = client.get("/v1/models", headers={"Authorization": "Bearer first-secret-key"})
        assert models.status_code == 200

        # An invalid body is still rejected with 401 first, so unauthenticated clients learn nothing.
        assert client.post(COMPLETIONS, json={"temperature": 9}).status_code == 401
        assert client.get("/health").status_code == 200
        assert client.get("/health/live").status_code == 200
        assert client.get("/metrics").status_code == 200
    assert "secret-key" not in caplog.text


# Readiness and overload.


def test_not_ready_returns_503(gateway_factory, tiny_tokenizer, redis_client):
    settings, app = gateway_factory()
    with TestClient(app) as client:
        response = client.post(COMPLETIONS, json=completion())
        assert response.status_code == 503
        assert int(response.headers["retry-after"]) > 0
        assert "verify replica" in response.json()["error"]["message"]

        health = client.get("/health")
        assert health.status_code == 503
        assert health.json()["ready"] is False
        assert "verify replica" in health.json()["missing"][0]
        assert client.get("/health/live").status_code == 200

        # Speculative modes also need a draft replica.
        with FakeVerifyWorker(settings, tiny_tokenizer, verify_mode="ssd", with_draft=False):
            health = client.get("/health")
            assert health.status_code == 503
            assert "draft replica" in health.json()["missing"][0]
            assert client.post(COMPLETIONS, json=completion()).status_code == 503

        # Autoregressive mode needs no draft.
        with FakeVerifyWorker(settings, tiny_tokenizer, verify_mode="ar", with_draft=False):
            health = client.get("/health")
            assert health.status_code == 200
            assert health.json()["verify_modes"] == {"fake-verify": "ar"}
            assert client.post(COMPLETIONS, json=completion()).status_code == 200
    assert redis_client.xlen(keys.request_stream(settings.namespace)) == 1


def test_full_queue_returns_429(gateway_factory, tiny_tokenizer, redis_client):
    settings, app = gateway_factory(max_queue_depth=3)
    inflight = keys.inflight(settings.namespace)
    with TestClient(app) as client, FakeVerifyWorker(settings, tiny_tokenizer):
        redis_client.sadd(inflight, "other-1", "other-2")
        # One slot is left: n=2 does not fit, n=1 does.
        response = client.post(COMPLETIONS, json=completion(n=2))
        assert response.status_code == 429
        assert response.headers["retry-after"] == "1"
        assert response.json()["error"]["type"] == "rate_limit_error"
        assert client.post(COMPLETIONS, json=completion()).status_code == 200

        redis_client.sadd(inflight, "other-3")
        response = client.post(CHAT, json=chat())
        assert response.status_code == 429
        assert "limit is 3" in response.json()["error"]["message"]

        redis_client.srem(inflight, "other-1", "other-2", "other-3")
        assert client.post(COMPLETIONS, json=completion(n=2)).status_code == 200


# Completions.


def test_completion_returns_text_and_usage(served, tiny_tokenizer):
    client, worker, _settings = served
    response = client.post(COMPLETIONS, json=completion(temperature=0, max_tokens=5))
    assert response.status_code == 200
    body = response.json()
    assert body["object"] == "text_completion"
    assert body["model"] == MODEL_NAME
    assert body["id"] == response.headers["x-request-id"]
    assert body["id"].startswith("cmpl-")
    assert len(body["choices"]) == 1
    choice = body["choices"][0]
    assert choice["text"] == script_text(0, 5)
    assert choice["finish_reason"] == "length"
    assert choice["logprobs"] is None
    prompt_ids = tiny_tokenizer.encode("hello world")
    assert body["usage"] == {"prompt_tokens": len(prompt_ids), "completion_tokens": 5, "total_tokens": len(prompt_ids) + 5}
    assert worker.requests[0].prompt_token_ids == prompt_ids


def test_completion_accepts_token_id_prompt(served):
    client, worker, _settings = served
    response = client.post(COMPLETIONS, json=completion(prompt=[7, 8, 9]))
    assert response.status_code == 200
    assert worker.requests[0].prompt_token_ids == [7, 8, 9]
    response = client.post(COMPLETIONS, json=completion(prompt=[[10, 11]]))
    assert response.status_code == 200
    assert worker.requests[1].prompt_token_ids == [10, 11]


def test_streamed_deltas_join_to_full_text(served):
    client, _worker, _settings = served
    full = client.post(COMPLETIONS, json=completion(temperature=0, max_tokens=7)).json()

    response = client.post(COMPLETIONS, json=completion(temperature=0, max_tokens=7, stream=True))
    assert response.status_code == 200
    assert response.headers["content-type"].startswith("text/event-stream")
    events = parse_sse(response.text)
    assert events[-1] == "[DONE]"
    chunks = [json.loads(event) for event in events[:-1]]
    assert all(chunk["object"] == "text_completion" for chunk in chunks)
    assert all(chunk["id"] == response.headers["x-request-id"] for chunk in chunks)
    assert all("usage" not in chunk for chunk in chunks)
    assert "".join(chunk["choices"][0]["text"] for chunk in chunks) == full["choices"][0]["text"]
    assert [chunk["choices"][0]["finish_reason"] for chunk in chunks][-1] == "length"
    assert all(chunk["choices"][0]["finish_reason"] is None for chunk in chunks[:-1])


def test_stream_include_usage_adds_final_chunk(served):
    client, _worker, _settings = served
    full = client.post(COMPLETIONS, json=completion(temperature=0, max_tokens=6)).json()
    response = client.post(
        COMPLETIONS,
        json=completion(temperature=0, max_tokens=6, stream=True, stream_options={"include_usage": True}),
    )
    events = parse_sse(response.text)
    assert events[-1] == "[DONE]"
    chunks = [json.loads(event) for event in events[:-1]]
    assert chunks[-1]["choices"] == []
    assert chunks[-1]["usage"] == full["usage"]
    assert all(chunk["usage"] is None for chunk in chunks[:-1])


def test_stop_string_and_eos_finish_with_stop(gateway_factory, tiny_tokenizer):
    settings, app = gateway_factory()
    with TestClient(app) as client, FakeVerifyWorker(settings, tiny_tokenizer, eos_after=3) as worker:
        body = client.post(COMPLETIONS, json=completion(temperature=0, max_tokens=10, stop=["three"])).json()
        assert body["choices"][0]["finish_reason"] == "stop"
        assert body["choices"][0]["stop_reason"] == "three"
        assert "three" not in body["choices"][0]["text"]

        body = client.post(COMPLETIONS, json=completion(temperature=0, max_tokens=10)).json()
        assert body["choices"][0]["finish_reason"] == "stop"
        assert body["usage"]["completion_tokens"] == 4  # three script tokens and EOS

        body = client.post(COMPLETIONS, json=completion(temperature=0, max_tokens=10, ignore_eos=True)).json()
        assert body["choices"][0]["finish_reason"] == "length"
        assert body["usage"]["completion_tokens"] == 10
        assert worker.requests[-1].sampling.ignore_eos is True


def test_completion_logprobs(served):
    client, worker, _settings = served
    body = client.post(COMPLETIONS, json=completion(temperature=0, max_tokens=3, logprobs=2)).json()
    logprobs = body["choices"][0]["logprobs"]
    assert logprobs["tokens"] == SCRIPT[:3]
    assert logprobs["token_logprobs"] == [-0.25, -0.25, -0.25]
    assert len(logprobs["top_logprobs"]) == 3
    assert logprobs["top_logprobs"][1]["one"] == -0.25
    assert logprobs["top_logprobs"][1]["two"] == -0.75
    assert logprobs["text_offset"] == [0, 3, 6]
    assert worker.requests[0].sampling.logprobs == 2

    stream = client.post(COMPLETIONS, json=completion(temperature=0, max_tokens=3, logprobs=0, stream=True))
    chunks = [json.loads(event) for event in parse_sse(stream.text)[:-1]]
    streamed_tokens = [t for chunk in chunks if chunk["choices"][0]["logprobs"] for t in chunk["choices"][0]["logprobs"]["tokens"]]
    assert streamed_tokens == SCRIPT[:3]
    offsets = [o for chunk in chunks if chunk["choices"][0]["logprobs"] for o in chunk["choices"][0]["logprobs"]["text_offset"]]
    assert offsets == [0, 3, 6]


# Chat completions.


def test_chat_completion_uses_chat_template(served, tiny_tokenizer):
    client, worker, _settings = served
    response = client.post(CHAT, json=chat(temperature=0, max_tokens=3))
    assert response.status_code == 200
    body = response.json()
    assert body["object"] == "chat.completion"
    assert body["id"].startswith("chatcmpl-")
    assert body["choices"][0]["message"] == {"role": "assistant", "content": script_text(0, 3)}
    assert body["choices"][0]["finish_reason"] == "length"
    rendered = tiny_tokenizer.apply_chat_template(USER_MESSAGE, add_generation_prompt=True, tokenize=False)
    expected_ids = tiny_tokenizer.encode(rendered, add_special_tokens=False)
    assert worker.requests[0].prompt_token_ids == expected_ids
    assert body["usage"]["prompt_tokens"] == len(expected_ids)


def test_chat_streaming_starts_with_role(served):
    client, _worker, _settings = served
    full = client.post(CHAT, json=chat(temperature=0, max_tokens=5)).json()
    response = client.post(CHAT, json=chat(temperature=0, max_tokens=5, stream=True, stream_options={"include_usage": True}))
    events = parse_sse(response.text)
    assert events[-1] == "[DONE]"
    chunks = [json.loads(event) for event in events[:-1]]
    assert chunks[0]["object"] == "chat.completion.chunk"
    assert chunks[0]["choices"][0]["delta"] == {"role": "assistant", "content": ""}
    content = "".join(chunk["choices"][0]["delta"].get("content", "") for chunk in chunks if chunk["choices"])
    assert content == full["choices"][0]["message"]["content"]
    assert chunks[-2]["choices"][0]["finish_reason"] == "length"
    assert chunks[-1]["usage"] == full["usage"]


def test_chat_defaults_max_tokens_to_context_left(served):
    client, worker, settings = served
    body = {"model": MODEL_NAME, "messages": USER_MESSAGE, "temperature": 0}
    response = client.post(CHAT, json=body)
    assert response.status_code == 200
    prompt_tokens = len(worker.requests[0].prompt_token_ids)
    expected = min(settings.max_model_len - prompt_tokens, settings.max_tokens_limit)
    assert worker.requests[0].sampling.max_tokens == expected
    client.post(CHAT, json={**body, "max_completion_tokens": 3})
    assert worker.requests[1].sampling.max_tokens == 3


def test_chat_logprobs(served):
    client, worker, _settings = served
    body = client.post(CHAT, json=chat(temperature=0, max_tokens=2, logprobs=True, top_logprobs=2)).json()
    content = body["choices"][0]["logprobs"]["content"]
    assert [entry["token"] for entry in content] == SCRIPT[:2]
    assert content[0]["bytes"] == list(SCRIPT[0].encode())
    assert [top["token"] for top in content[0]["top_logprobs"]] == ["one", "two"]
    assert worker.requests[0].sampling.logprobs == 2
    client.post(CHAT, json=chat(logprobs=True))
    assert worker.requests[1].sampling.logprobs == 0
    client.post(CHAT, json=chat())
    assert worker.requests[2].sampling.logprobs is None


# Sampling fields, n and seeds.


def test_sampling_fields_reach_engine(served):
    client, worker, _settings = served
    fields = dict(temperature=0.7, top_p=0.9, top_k=5, seed=1234, stop=["dog", "cat"], stop_token_ids=[2, 9], max_tokens=6)
    assert client.post(COMPLETIONS, json=completion(**fields)).status_code == 200
    sampling = worker.requests[0].sampling
    assert sampling.temperature == 0.7
    assert sampling.top_p == 0.9
    assert sampling.top_k == 5
    assert sampling.seed == 1234
    assert sampling.stop == ["dog", "cat"]
    assert sampling.stop_token_ids == [2, 9]
    assert sampling.max_tokens == 6
    assert sampling.ignore_eos is False

    assert client.post(COMPLETIONS, json=completion(top_k=-1, stop="dog")).status_code == 200
    assert worker.requests[1].sampling.top_k == 0
    assert worker.requests[1].sampling.stop == ["dog"]

    assert client.post(COMPLETIONS, json={"prompt": "hello", "temperature": None, "max_tokens": None}).status_code == 200
    assert worker.requests[2].sampling.temperature == 1.0
    assert worker.requests[2].sampling.max_tokens == 16


def test_random_seed_when_client_gives_none(served, caplog):
    client, worker, _settings = served
    caplog.set_level(logging.INFO, logger="saguaro.gateway")
    for _ in range(2):
        assert client.post(COMPLETIONS, json=completion(temperature=1.0)).status_code == 200
    seeds = [request.sampling.seed for request in worker.requests]
    assert len(set(seeds)) == 2
    assert all(0 <= seed < 2**31 for seed in seeds)
    # The chosen seed is logged with the request id, so the request can be replayed.
    assert f"seed={seeds[0]}" in caplog.text


def test_n_choices_use_consecutive_seeds(served):
    client, worker, _settings = served
    response = client.post(COMPLETIONS, json=completion(n=3, seed=7, temperature=1.0, max_tokens=3))
    body = response.json()
    assert [choice["index"] for choice in body["choices"]] == [0, 1, 2]
    assert sorted(request.sampling.seed for request in worker.requests) == [7, 8, 9]
    by_seed = {request.sampling.seed: request for request in worker.requests}
    for index, choice in enumerate(body["choices"]):
        assert choice["text"] == script_text((7 + index) % len(SCRIPT), 3)
    assert body["usage"]["completion_tokens"] == 9
    assert body["usage"]["prompt_tokens"] == len(by_seed[7].prompt_token_ids)
    assert len({request.request_id for request in worker.requests}) == 3


def test_n_choices_stream_merged(served):
    client, _worker, _settings = served
    full = client.post(CHAT, json=chat(n=2, seed=3, temperature=1.0, max_tokens=5)).json()
    response = client.post(CHAT, json=chat(n=2, seed=3, temperature=1.0, max_tokens=5, stream=True))
    chunks = [json.loads(event) for event in parse_sse(response.text)[:-1]]
    assert [chunk["choices"][0]["delta"].get("role") for chunk in chunks[:2]] == ["assistant", "assistant"]
    for index in (0, 1):
        mine = [chunk["choices"][0] for chunk in chunks if chunk["choices"][0]["index"] == index]
        assert "".join(choice["delta"].get("content", "") for choice in mine) == full["choices"][index]["message"]["content"]
        assert mine[-1]["finish_reason"] == "length"


# Request ids.


def test_request_id_header(served):
    client, worker, _settings = served
    response = client.post(COMPLETIONS, json=completion(), headers={"X-Request-Id": "client-id_1.2"})
    assert response.headers["x-request-id"] == "client-id_1.2"
    assert response.json()["id"] == "client-id_1.2"
    # A repeated client id must not share Redis keys with the first request.
    again = client.post(COMPLETIONS, json=completion(), headers={"X-Request-Id": "client-id_1.2"})
    assert again.status_code == 200
    engine_ids = [request.request_id for request in worker.requests]
    assert len(set(engine_ids)) == 2
    assert all(engine_id.startswith("client-id_1.2-") for engine_id in engine_ids)

    for unsafe in ("has space", "a" * 129, "colon:id"):
        response = client.post(COMPLETIONS, json=completion(), headers={"X-Request-Id": unsafe})
        assert response.headers["x-request-id"].startswith("cmpl-")
    response = client.post(CHAT, json=chat())
    assert response.headers["x-request-id"].startswith("chatcmpl-")
    assert client.post(COMPLETIONS, json=completion(temperature=5)).headers["x-request-id"].startswith("cmpl-")


# Failures: timeout, engine error, disconnect.


def test_timeout_cancels_and_returns_504(gateway_factory, tiny_tokenizer, redis_client):
    settings, app = gateway_factory(request_timeout_s=0.5)
    with TestClient(app) as client, FakeVerifyWorker(settings, tiny_tokenizer, behavior="silent") as worker:
        started = time.monotonic()
        response = client.post(COMPLETIONS, json=completion())
        assert time.monotonic() - started < 5
        assert response.status_code == 504
        assert response.json()["error"]["type"] == "timeout_error"
        engine_id = worker.requests[0].request_id
        assert wait_until(lambda: redis_client.get(keys.cancel(settings.namespace, engine_id)) == b"1")
        assert 0 < redis_client.ttl(keys.cancel(settings.namespace, engine_id)) <= keys.EVENTS_TTL_S
        assert wait_until(lambda: not redis_client.sismember(keys.inflight(settings.namespace), engine_id))

        response = client.post(COMPLETIONS, json=completion(stream=True))
        assert response.status_code == 200
        events = parse_sse(response.text)
        assert events[-1] == "[DONE]"
        assert json.loads(events[-2])["error"]["type"] == "timeout_error"


def test_slow_engine_outlasts_redis_socket_timeout(gateway_factory, tiny_tokenizer, monkeypatch):
    """A request whose first tokens take longer than the Redis socket timeout still gets them."""
    from services.gateway import engine_client

    monkeypatch.setattr(engine_client, "REDIS_SOCKET_TIMEOUT_S", 1.0)
    settings, app = gateway_factory()
    with TestClient(app) as client, FakeVerifyWorker(settings, tiny_tokenizer, step_delay_s=2.5, tokens_per_event=4):
        response = client.post(COMPLETIONS, json=completion(max_tokens=4))
        assert response.status_code == 200, response.text
        assert response.json()["usage"]["completion_tokens"] == 4


def test_engine_error_event_returns_500(gateway_factory, tiny_tokenizer):
    settings, app = gateway_factory()
    with TestClient(app) as client, FakeVerifyWorker(settings, tiny_tokenizer, behavior="error"):
        response = client.post(COMPLETIONS, json=completion())
        assert response.status_code == 500
        assert "fake engine failure" in response.json()["error"]["message"]
        streamed = client.post(CHAT, json=chat(stream=True))
        events = parse_sse(streamed.text)
        assert "fake engine failure" in json.loads(events[-2])["error"]["message"]
        assert events[-1] == "[DONE]"


def test_stream_disconnect_sets_cancel_key(gateway_factory, tiny_tokenizer, redis_client):
    settings, app = gateway_factory()
    worker = FakeVerifyWorker(settings, tiny_tokenizer, step_delay_s=0.05, tokens_per_event=1)
    with UvicornThread(app) as server, worker:
        with httpx.Client(base_url=server.url, timeout=10) as client:
            with client.stream("POST", COMPLETIONS, json=completion(max_tokens=100, stream=True)) as response:
                assert response.status_code == 200
                first = next(response.iter_lines())
                assert first.startswith("data: ")
            disconnected_at = time.monotonic()
        engine_id = worker.requests[0].request_id
        assert wait_until(lambda: redis_client.exists(keys.cancel(settings.namespace, engine_id)), timeout_s=2.0)
        assert time.monotonic() - disconnected_at < 2.0
        assert wait_until(lambda: engine_id in worker.cancelled, timeout_s=3.0)


def test_disconnect_while_queued_cancels(gateway_factory, tiny_tokenizer, redis_client):
    """A client that leaves before the first token (engine still silent) is noticed without waiting for a write."""
    settings, app = gateway_factory()
    with UvicornThread(app) as server, FakeVerifyWorker(settings, tiny_tokenizer, behavior="silent") as worker:
        for body in (completion(stream=True), completion()):
            with pytest.raises(httpx.ReadTimeout):
                httpx.post(server.url + COMPLETIONS, json=body, timeout=httpx.Timeout(10, read=0.5))
            assert wait_until(lambda: len(worker.requests) > 0)
            engine_id = worker.requests[-1].request_id
            assert wait_until(lambda: redis_client.exists(keys.cancel(settings.namespace, engine_id)), timeout_s=2.0)
            worker.requests.clear()


# Operational endpoints.


def test_models_endpoint(served):
    client, _worker, settings = served
    body = client.get("/v1/models").json()
    assert body["object"] == "list"
    assert [model["id"] for model in body["data"]] == [MODEL_NAME]
    assert body["data"][0]["max_model_len"] == settings.max_model_len
    assert client.get(f"/v1/models/{MODEL_NAME}").json()["id"] == MODEL_NAME


def test_health_reports_replicas(served):
    client, _worker, _settings = served
    body = client.get("/health").json()
    assert body["status"] == "ready"
    assert body["verify_replicas"] == ["fake-verify"]
    assert body["draft_replicas"] == ["fake-draft"]
    assert body["missing"] == []


def test_metrics_after_requests(served, redis_client):
    client, _worker, settings = served
    client.post(COMPLETIONS, json=completion(max_tokens=5))
    client.post(COMPLETIONS, json=completion(temperature=9))
    redis_client.sadd(keys.inflight(settings.namespace), "queued-1", "queued-2")
    text = client.get("/metrics").text
    assert 'saguaro:requests_total{endpoint="/v1/completions",model_name="tiny-test-model",status="200"} 1.0' in text
    assert 'saguaro:requests_total{endpoint="/v1/completions",model_name="tiny-test-model",status="400"} 1.0' in text
    assert 'saguaro:time_to_first_token_seconds_count{model_name="tiny-test-model"} 1.0' in text
    assert 'saguaro:time_per_output_token_seconds_count{model_name="tiny-test-model"} 1.0' in text
    assert 'saguaro:e2e_request_latency_seconds_count{model_name="tiny-test-model"} 1.0' in text
    assert 'saguaro:generation_tokens_total{model_name="tiny-test-model"} 5.0' in text
    assert 'saguaro:prompt_tokens_total{model_name="tiny-test-model"} 2.0' in text
    assert 'saguaro:queue_depth{model_name="tiny-test-model"} 2.0' in text
    assert 'saguaro:num_requests_running{model_name="tiny-test-model"} 0.0' in text


# The official OpenAI client against a real server.


def test_openai_client_completions_and_chat(gateway_factory, tiny_tokenizer):
    settings, app = gateway_factory(load_tokenizer=True, api_keys=["test-key"])
    with UvicornThread(app) as server, FakeVerifyWorker(settings, tiny_tokenizer):
        client = openai.OpenAI(base_url=server.url + "/v1", api_key="test-key", max_retries=0)

        models = client.models.list()
        assert [model.id for model in models.data] == [MODEL_NAME]

        completion_result = client.completions.create(model=MODEL_NAME, prompt="hello world", max_tokens=5, temperature=0)
        assert completion_result.choices[0].text == script_text(0, 5)
        assert completion_result.choices[0].finish_reason == "length"
        assert completion_result.usage.completion_tokens == 5

        stream = client.completions.create(
            model=MODEL_NAME, prompt="hello world", max_tokens=5, temperature=0, stream=True,
            stream_options={"include_usage": True},
        )
        chunks = list(stream)
        assert "".join(chunk.choices[0].text for chunk in chunks if chunk.choices) == script_text(0, 5)
        assert chunks[-1].usage.completion_tokens == 5

        chat_result = client.chat.completions.create(model=MODEL_NAME, messages=USER_MESSAGE, max_tokens=4, temperature=0, seed=11)
        assert chat_result.choices[0].message.role == "assistant"
        assert chat_result.choices[0].message.content == script_text(0, 4)

        chat_stream = client.chat.completions.create(model=MODEL_NAME, messages=USER_MESSAGE, max_tokens=4, temperature=0, stream=True)
        content = "".join(chunk.choices[0].delta.content or "" for chunk in chat_stream if chunk.choices)
        assert content == script_text(0, 4)

        with pytest.raises(openai.BadRequestError) as bad_request:
            client.completions.create(model=MODEL_NAME, prompt="hello", max_tokens=5, temperature=3)
        assert bad_request.value.body["param"] == "temperature"

        with pytest.raises(openai.NotFoundError):
            client.completions.create(model="no-such-model", prompt="hello", max_tokens=5)

        unauthorized = openai.OpenAI(base_url=server.url + "/v1", api_key="wrong", max_retries=0)
        with pytest.raises(openai.AuthenticationError):
            unauthorized.models.list()


def test_many_concurrent_streams(gateway_factory, tiny_tokenizer, redis_client):
    settings, app = gateway_factory()
    worker = FakeVerifyWorker(settings, tiny_tokenizer, step_delay_s=0.01)

    async def run_all(url: str) -> list[tuple[int, str]]:
        async with httpx.AsyncClient(base_url=url, timeout=30) as client:

            async def one(seed: int) -> tuple[int, str]:
                body = completion(seed=seed, temperature=1.0, max_tokens=6, stream=True)
                async with client.stream("POST", COMPLETIONS, json=body) as response:
                    assert response.status_code == 200
                    lines = [line async for line in response.aiter_lines()]
                events = parse_sse("\n".join(lines))
                assert events[-1] == "[DONE]"
                return seed, "".join(json.loads(event)["choices"][0]["text"] for event in events[:-1])

            return await asyncio.gather(*(one(seed) for seed in range(40)))

    with UvicornThread(app) as server, worker:
        results = asyncio.run(run_all(server.url))
    assert len(results) == 40
    for seed, text in results:
        assert text == script_text(seed % len(SCRIPT), 6)
    assert redis_client.scard(keys.inflight(settings.namespace)) == 0


def test_decode_speed_counts_tokens_after_first_step():
    from services.gateway.engine_client import ChoiceResult
    from services.gateway.openai_api import decode_summary
    from shared.protocol import DecodeStats

    def choice(index: int, completion: int, steps: int, first_step: int, decode_s: float) -> ChoiceResult:
        stats = DecodeStats(mode="ssd", steps=steps, first_step_tokens=first_step, decode_s=decode_s)
        return ChoiceResult(index=index, request_id=f"r{index}", completion_tokens=completion, stats=stats)

    # 20 tokens: 5 in the first step, 15 in the 2 s after it; 10 tokens: 3 first, 7 in 1.5 s.
    summary = decode_summary([choice(0, 20, 6, 5, 2.0), choice(1, 10, 3, 3, 1.5)])
    assert summary["decode_tokens_per_s"] == pytest.approx(22 / 3.5)
    # Every token came in the first step: no decoding speed, however short the time after it.
    assert decode_summary([choice(0, 4, 1, 4, 0.0003)])["decode_tokens_per_s"] is None
    # Stats without the first step's size (a request taken over from another replica) count one token.
    assert decode_summary([choice(0, 11, 4, 0, 2.0)])["decode_tokens_per_s"] == pytest.approx(5.0)
