"""Submit requests straight to the Redis request stream and read their events back, bypassing the gateway (benchmarks and tests)."""

from __future__ import annotations

import time
import uuid
from dataclasses import dataclass, field

import redis

from shared import keys
from shared.protocol import ErrorEvent, FinishEvent, GenerateRequest, SamplingParams, TokenEvent, decode, encode


@dataclass
class Completion:
    token_ids: list[int] = field(default_factory=list)
    text: str = ""
    deltas: list[str] = field(default_factory=list)
    finish: FinishEvent | None = None
    error: ErrorEvent | None = None


def submit(client: redis.Redis, namespace: str, prompt_ids: list[int], request_id: str | None = None, **sampling) -> str:
    request_id = request_id or f"test-{uuid.uuid4().hex[:12]}"
    request = GenerateRequest(request_id=request_id, prompt_token_ids=prompt_ids, sampling=SamplingParams(**sampling), arrival_time=time.time())
    client.sadd(keys.inflight(namespace), request_id)
    client.xadd(keys.request_stream(namespace), {"msg": encode(request)})
    return request_id


def collect(client: redis.Redis, namespace: str, request_id: str, timeout_s: float = 120.0) -> Completion:
    result = Completion()
    last_id = "0-0"
    deadline = time.monotonic() + timeout_s
    stream = keys.events(namespace, request_id)
    while time.monotonic() < deadline:
        batches = client.xread({stream: last_id}, block=1000, count=100)
        for _, entries in batches or []:
            for entry_id, fields in entries:
                last_id = entry_id
                event = decode(fields[b"msg"])
                if isinstance(event, TokenEvent):
                    result.token_ids.extend(event.token_ids)
                    result.text += event.text
                    result.deltas.append(event.text)
                elif isinstance(event, FinishEvent):
                    result.finish = event
                    return result
                elif isinstance(event, ErrorEvent):
                    result.error = event
                    return result
    raise TimeoutError(f"request {request_id} did not finish within {timeout_s} s")


def generate(client: redis.Redis, namespace: str, prompt_ids: list[int], timeout_s: float = 120.0, **sampling) -> Completion:
    return collect(client, namespace, submit(client, namespace, prompt_ids, **sampling), timeout_s)
