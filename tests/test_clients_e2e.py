"""The official openai client and the gRPC client against the real services (tiny pair, SSD)."""

from __future__ import annotations

import uuid

import grpc
import openai
import pytest

from services.launcher import Stack, free_port
from shared.proto import saguaro_pb2, saguaro_pb2_grpc
from tests.tiny_models import save_tiny_pair, target_greedy, tiny_stack_env

pytestmark = pytest.mark.integration

PROMPT = [5, 9, 33, 2, 71]
MAX_TOKENS = 24


def words(token_ids: list[int]) -> str:
    return " ".join(f"w{t}" for t in token_ids)


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    target, draft = save_tiny_pair(tmp_path_factory.mktemp("models"), draft_noise=0.1)
    expected = target_greedy(target, [PROMPT], MAX_TOKENS)[0]
    grpc_port = free_port()
    env = tiny_stack_env(target, draft, f"clients-{uuid.uuid4().hex[:8]}", mode="ssd", grpc_port=grpc_port)
    stack = Stack(env=env, log_dir=tmp_path_factory.mktemp("logs"), start_timeout_s=120)
    stack.start()
    yield stack, grpc_port, expected
    stack.stop()


def test_openai_completions(served):
    stack, _, expected = served
    client = openai.OpenAI(base_url=f"{stack.base_url}/v1", api_key="unused")
    model = client.models.list().data[0].id
    completion = client.completions.create(model=model, prompt=words(PROMPT), max_tokens=MAX_TOKENS, temperature=0, extra_body={"ignore_eos": True})
    assert completion.choices[0].text == words(expected)
    assert completion.usage.completion_tokens == MAX_TOKENS

    stream = client.completions.create(model=model, prompt=words(PROMPT), max_tokens=MAX_TOKENS, temperature=0, stream=True, extra_body={"ignore_eos": True})
    assert "".join(chunk.choices[0].text for chunk in stream if chunk.choices) == words(expected)


def test_openai_chat_completions(served):
    stack, _, _ = served
    client = openai.OpenAI(base_url=f"{stack.base_url}/v1", api_key="unused")
    model = client.models.list().data[0].id
    messages = [{"role": "user", "content": words(PROMPT)}]
    chat = client.chat.completions.create(model=model, messages=messages, max_tokens=MAX_TOKENS, temperature=0, extra_body={"ignore_eos": True})
    assert chat.choices[0].message.role == "assistant"
    assert chat.usage.completion_tokens == MAX_TOKENS

    stream = client.chat.completions.create(model=model, messages=messages, max_tokens=MAX_TOKENS, temperature=0, stream=True, extra_body={"ignore_eos": True})
    streamed = "".join(chunk.choices[0].delta.content or "" for chunk in stream if chunk.choices)
    assert streamed == chat.choices[0].message.content


def test_grpc_generate_and_stream(served):
    _, grpc_port, expected = served
    with grpc.insecure_channel(f"127.0.0.1:{grpc_port}") as channel:
        stub = saguaro_pb2_grpc.GenerationStub(channel)
        request = saguaro_pb2.GenerateRequest(
            prompt_token_ids=saguaro_pb2.TokenIds(ids=PROMPT),
            sampling=saguaro_pb2.SamplingParams(max_tokens=MAX_TOKENS, temperature=0.0, ignore_eos=True),
        )
        response = stub.Generate(request, timeout=60)
        assert list(response.choices[0].token_ids) == expected
        assert response.choices[0].finish_reason == "length"

        streamed: list[int] = []
        for message in stub.GenerateStream(request, timeout=60):
            streamed.extend(message.token_ids)
        assert streamed == expected
