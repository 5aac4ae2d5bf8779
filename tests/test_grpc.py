"""gRPC API of the gateway (saguaro.v1.Generation and grpc.health.v1) and the generated code."""

from __future__ import annotations

import socket
import sys
from pathlib import Path

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from shared import keys
from shared.proto import saguaro_pb2, saguaro_pb2_grpc
from tests.gateway_fakes import (  # noqa: F401  (fixtures are used by name)
    MODEL_NAME,
    SCRIPT,
    FakeVerifyWorker,
    UvicornThread,
    gateway_factory,
    redis_client,
    tiny_model_dir,
    tiny_tokenizer,
    wait_until,
)

pytestmark = pytest.mark.timeout(120)

REPO_ROOT = Path(__file__).resolve().parent.parent
SERVICE_NAME = "saguaro.v1.Generation"


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def script_text(start: int, count: int) -> str:
    return " ".join(SCRIPT[(start + i) % len(SCRIPT)] for i in range(count))


def sampling(**fields) -> saguaro_pb2.SamplingParams:
    return saguaro_pb2.SamplingParams(**{"max_tokens": 4, "temperature": 0.0, **fields})


@pytest.fixture
def grpc_gateway(gateway_factory):
    """Return ``start(**settings_overrides) -> (settings, channel, server)``, which starts a gateway (HTTP and gRPC) without a worker."""

    def start(**overrides):
        settings, app = gateway_factory(grpc_port=free_port(), **overrides)
        server = UvicornThread(app).__enter__()
        channel = grpc.insecure_channel(f"127.0.0.1:{settings.grpc_port}")
        started.append((server, channel))
        return settings, channel, server

    started = []
    yield start
    for server, channel in started:
        channel.close()
        server.__exit__(None, None, None)


def test_unary_generate(grpc_gateway, tiny_tokenizer):
    settings, channel, _server = grpc_gateway()
    stub = saguaro_pb2_grpc.GenerationStub(channel)
    with FakeVerifyWorker(settings, tiny_tokenizer) as worker:
        response = stub.Generate(
            saguaro_pb2.GenerateRequest(prompt="hello world", model=MODEL_NAME, sampling=sampling(max_tokens=5, seed=21)),
            timeout=10,
        )
        assert response.model == MODEL_NAME
        assert response.request_id.startswith("cmpl-")
        assert len(response.choices) == 1
        choice = response.choices[0]
        assert choice.text == script_text(0, 5)
        assert list(choice.token_ids) == [tiny_tokenizer.convert_tokens_to_ids(word) for word in SCRIPT[:5]]
        assert choice.finish_reason == "length"
        assert choice.seed == 21
        assert response.usage.prompt_tokens == 2
        assert response.usage.completion_tokens == 5
        assert response.usage.total_tokens == 7
        assert worker.requests[0].sampling.seed == 21
        assert worker.requests[0].sampling.temperature == 0.0

        response = stub.Generate(
            saguaro_pb2.GenerateRequest(prompt_token_ids=saguaro_pb2.TokenIds(ids=[7, 8]), sampling=sampling(top_p=0.7)),
            timeout=10,
        )
        assert worker.requests[1].prompt_token_ids == [7, 8]
        assert worker.requests[1].sampling.top_p == 0.7  # not 0.699999988 from the 32-bit proto float

        chat = saguaro_pb2.ChatMessages(messages=[saguaro_pb2.ChatMessage(role="user", content="hello world")])
        response = stub.Generate(saguaro_pb2.GenerateRequest(chat=chat, sampling=sampling(n=2, temperature=1.0, seed=4)), timeout=10)
        assert response.request_id.startswith("chatcmpl-")
        assert [choice.index for choice in response.choices] == [0, 1]
        assert [choice.seed for choice in response.choices] == [4, 5]
        assert response.usage.completion_tokens == 8
        rendered = tiny_tokenizer.apply_chat_template([{"role": "user", "content": "hello world"}], add_generation_prompt=True, tokenize=False)
        assert worker.requests[2].prompt_token_ids == tiny_tokenizer.encode(rendered, add_special_tokens=False)


def test_stream_matches_unary(grpc_gateway, tiny_tokenizer):
    settings, channel, _server = grpc_gateway()
    stub = saguaro_pb2_grpc.GenerationStub(channel)
    with FakeVerifyWorker(settings, tiny_tokenizer):
        request = saguaro_pb2.GenerateRequest(prompt="hello world", sampling=sampling(max_tokens=7, logprobs=1))
        unary = stub.Generate(request, timeout=10)
        messages = list(stub.GenerateStream(request, timeout=10))
        assert "".join(message.text for message in messages) == unary.choices[0].text
        assert [t for message in messages for t in message.token_ids] == list(unary.choices[0].token_ids)
        assert len([lp for message in messages for lp in message.logprobs]) == 7
        assert all(message.finish_reason == "" for message in messages[:-1])
        assert messages[-1].finish_reason == "length"
        assert messages[-1].usage.completion_tokens == 7
        assert len({message.request_id for message in messages}) == 1

        many = list(stub.GenerateStream(saguaro_pb2.GenerateRequest(prompt="hello", sampling=sampling(n=3, temperature=1.0, seed=0)), timeout=10))
        finished = sorted(message.index for message in many if message.finish_reason)
        assert finished == [0, 1, 2]
        for index in range(3):
            text = "".join(message.text for message in many if message.index == index)
            assert text == script_text(index, 4)


@pytest.mark.parametrize(
    ("request_message", "code", "message_part"),
    [
        (saguaro_pb2.GenerateRequest(prompt="hi", sampling=sampling(temperature=3.0)), grpc.StatusCode.INVALID_ARGUMENT, "temperature"),
        (saguaro_pb2.GenerateRequest(prompt="hi", sampling=sampling(max_tokens=1000)), grpc.StatusCode.INVALID_ARGUMENT, "max_tokens"),
        (saguaro_pb2.GenerateRequest(prompt="hi", sampling=sampling(n=9)), grpc.StatusCode.INVALID_ARGUMENT, "n"),
        (saguaro_pb2.GenerateRequest(sampling=sampling()), grpc.StatusCode.INVALID_ARGUMENT, "prompt, prompt_token_ids or chat"),
        (
            saguaro_pb2.GenerateRequest(prompt_token_ids=saguaro_pb2.TokenIds(ids=[99999]), sampling=sampling()),
            grpc.StatusCode.INVALID_ARGUMENT,
            "not a valid token id",
        ),
        (
            saguaro_pb2.GenerateRequest(
                chat=saguaro_pb2.ChatMessages(messages=[saguaro_pb2.ChatMessage(role="robot", content="x")]), sampling=sampling()
            ),
            grpc.StatusCode.INVALID_ARGUMENT,
            "messages[0].role",
        ),
        (saguaro_pb2.GenerateRequest(prompt="hi", model="other-model", sampling=sampling()), grpc.StatusCode.NOT_FOUND, "other-model"),
    ],
)
def test_invalid_request_status(grpc_gateway, tiny_tokenizer, redis_client, request_message, code, message_part):
    settings, channel, _server = grpc_gateway()
    stub = saguaro_pb2_grpc.GenerationStub(channel)
    with FakeVerifyWorker(settings, tiny_tokenizer):
        for call in (stub.Generate, lambda request, timeout: list(stub.GenerateStream(request, timeout=timeout))):
            with pytest.raises(grpc.RpcError) as error:
                call(request_message, timeout=10)
            assert error.value.code() == code
            assert message_part in error.value.details()
    assert redis_client.xlen(keys.request_stream(settings.namespace)) == 0


def test_api_key_metadata(grpc_gateway, tiny_tokenizer):
    settings, channel, _server = grpc_gateway(api_keys=["grpc-secret"])
    stub = saguaro_pb2_grpc.GenerationStub(channel)
    request = saguaro_pb2.GenerateRequest(prompt="hello", sampling=sampling())
    with FakeVerifyWorker(settings, tiny_tokenizer):
        with pytest.raises(grpc.RpcError) as error:
            stub.Generate(request, timeout=10)
        assert error.value.code() == grpc.StatusCode.UNAUTHENTICATED
        with pytest.raises(grpc.RpcError) as error:
            stub.Generate(request, timeout=10, metadata=[("authorization", "Bearer wrong")])
        assert error.value.code() == grpc.StatusCode.UNAUTHENTICATED
        response = stub.Generate(request, timeout=10, metadata=[("authorization", "Bearer grpc-secret")])
        assert response.choices[0].finish_reason == "length"


def test_health_serving_only_when_ready(grpc_gateway, tiny_tokenizer):
    settings, channel, _server = grpc_gateway()
    health = health_pb2_grpc.HealthStub(channel)
    stub = saguaro_pb2_grpc.GenerationStub(channel)

    def status(service: str) -> int:
        return health.Check(health_pb2.HealthCheckRequest(service=service), timeout=5).status

    assert status("") == health_pb2.HealthCheckResponse.NOT_SERVING
    assert status(SERVICE_NAME) == health_pb2.HealthCheckResponse.NOT_SERVING
    with pytest.raises(grpc.RpcError) as error:
        stub.Generate(saguaro_pb2.GenerateRequest(prompt="hello", sampling=sampling()), timeout=10)
    assert error.value.code() == grpc.StatusCode.UNAVAILABLE

    with FakeVerifyWorker(settings, tiny_tokenizer):
        assert wait_until(lambda: status(SERVICE_NAME) == health_pb2.HealthCheckResponse.SERVING, timeout_s=5)
        assert status("") == health_pb2.HealthCheckResponse.SERVING
    # Heartbeat keys are deleted when the worker stops, so the next poll reports NOT_SERVING.
    assert wait_until(lambda: status(SERVICE_NAME) == health_pb2.HealthCheckResponse.NOT_SERVING, timeout_s=5)


def test_full_queue_is_resource_exhausted(grpc_gateway, tiny_tokenizer, redis_client):
    settings, channel, _server = grpc_gateway(max_queue_depth=1)
    stub = saguaro_pb2_grpc.GenerationStub(channel)
    with FakeVerifyWorker(settings, tiny_tokenizer):
        redis_client.sadd(keys.inflight(settings.namespace), "someone-else")
        with pytest.raises(grpc.RpcError) as error:
            stub.Generate(saguaro_pb2.GenerateRequest(prompt="hello", sampling=sampling()), timeout=10)
        assert error.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED


def test_client_cancel_sets_cancel_key(grpc_gateway, tiny_tokenizer, redis_client):
    settings, channel, _server = grpc_gateway()
    stub = saguaro_pb2_grpc.GenerationStub(channel)
    worker = FakeVerifyWorker(settings, tiny_tokenizer, step_delay_s=0.05, tokens_per_event=1)
    with worker:
        call = stub.GenerateStream(saguaro_pb2.GenerateRequest(prompt="hello", sampling=sampling(max_tokens=100)), timeout=30)
        first = next(call)
        assert first.text
        call.cancel()
        engine_id = worker.requests[0].request_id
        assert wait_until(lambda: redis_client.exists(keys.cancel(settings.namespace, engine_id)), timeout_s=2.0)
        assert wait_until(lambda: engine_id in worker.cancelled, timeout_s=3.0)

        # A unary call that reaches its deadline before the engine finishes is cancelled too.
        worker.step_delay_s = 0.5
        with pytest.raises(grpc.RpcError) as error:
            stub.Generate(saguaro_pb2.GenerateRequest(prompt="hello", sampling=sampling(max_tokens=100)), timeout=0.3)
        assert error.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
        engine_id = worker.requests[1].request_id
        assert wait_until(lambda: redis_client.exists(keys.cancel(settings.namespace, engine_id)), timeout_s=2.0)


def test_generated_code_is_current(tmp_path):
    sys.path.insert(0, str(REPO_ROOT / "scripts"))
    try:
        import gen_proto
    finally:
        sys.path.remove(str(REPO_ROOT / "scripts"))
    generated = gen_proto.generate(tmp_path)
    assert [path.name for path in generated] == ["saguaro_pb2.py", "saguaro_pb2.pyi", "saguaro_pb2_grpc.py"]
    for path in generated:
        committed = REPO_ROOT / "shared" / "proto" / path.name
        assert path.read_bytes() == committed.read_bytes(), f"{committed} is stale; run scripts/gen_proto.py"


def test_proto_service_name():
    service = saguaro_pb2.DESCRIPTOR.services_by_name["Generation"]
    assert service.full_name == SERVICE_NAME
    assert [method.name for method in service.methods] == ["Generate", "GenerateStream"]
    assert service.methods_by_name["GenerateStream"].server_streaming is True
