"""The OpenAI-compatible ``/v1`` routes: completions, chat completions and models.

Streaming responses are server-sent events in the OpenAI chunk format, ending
with ``data: [DONE]``. A failure after the stream has started is sent as one
``data: {"error": ...}`` event before ``[DONE]``, as vLLM does.
"""

from __future__ import annotations

import asyncio
import json
import logging
from collections.abc import AsyncIterator, Awaitable
from contextlib import aclosing
from typing import Any, TypeVar

import anyio
from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse
from starlette.responses import StreamingResponse
from starlette.types import Receive, Scope, Send

from shared.protocol import FinishEvent, TokenEvent, TokenLogprob
from services.gateway.engine_client import ChoiceResult
from services.gateway.errors import ClientDisconnected, GatewayError, ModelNotFound
from services.gateway.prompts import PromptProcessor
from services.gateway.schemas import (
    ChatChoiceLogprobs,
    ChatCompletionChoice,
    ChatCompletionRequest,
    ChatCompletionResponse,
    ChatResponseMessage,
    ChatTokenLogprob,
    ChatTopLogprob,
    CompletionChoice,
    CompletionLogprobs,
    CompletionRequest,
    CompletionResponse,
    ModelCard,
    ModelList,
    UsageInfo,
)
from services.gateway.service import GenerationService, PreparedGeneration

logger = logging.getLogger("saguaro.gateway")

router = APIRouter(prefix="/v1")

T = TypeVar("T")


class EventStreamResponse(StreamingResponse):
    """A server-sent events response that stops its body iterator as soon as the client disconnects.

    Starlette only watches for the disconnect on ASGI servers older than spec
    2.4 and otherwise notices it at the next write, which can be long after
    the client left while the engine request is still queued.
    """

    media_type = "text/event-stream"

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        async with anyio.create_task_group() as task_group:

            async def stream_then_stop() -> None:
                await self.stream_response(send)
                task_group.cancel_scope.cancel()

            task_group.start_soon(stream_then_stop)
            await self.listen_for_disconnect(receive)
            task_group.cancel_scope.cancel()


def sse_data(payload: Any) -> str:
    text = payload if isinstance(payload, str) else json.dumps(payload, separators=(",", ":"), ensure_ascii=False)
    return f"data: {text}\n\n"


async def call_until_disconnect(request: Request, awaitable: Awaitable[T]) -> T:
    """Await ``awaitable`` but cancel it and raise ``ClientDisconnected`` if the client disconnects first."""
    work = asyncio.ensure_future(awaitable)

    async def wait_for_disconnect() -> None:
        while True:
            message = await request.receive()
            if message["type"] == "http.disconnect":
                return

    watcher = asyncio.ensure_future(wait_for_disconnect())
    try:
        await asyncio.wait({work, watcher}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        if not work.done():
            work.cancel()
        watcher.cancel()
    if work.cancelled() or not work.done():
        raise ClientDisconnected()
    return work.result()


def _service(request: Request) -> GenerationService:
    return request.app.state.gateway.service


def _request_id(request: Request) -> tuple[str, bool]:
    return request.state.request_id, request.state.request_id_from_client


def _usage(prepared: PreparedGeneration, choices: list[ChoiceResult]) -> UsageInfo:
    # The prompt is shared by all choices, so it is counted once, as the OpenAI API does.
    prompt_tokens = next((c.prompt_tokens for c in choices if c.prompt_tokens), len(prepared.prompt_token_ids))
    completion_tokens = sum(choice.completion_tokens for choice in choices)
    return UsageInfo(
        prompt_tokens=prompt_tokens,
        completion_tokens=completion_tokens,
        total_tokens=prompt_tokens + completion_tokens,
    )


def decode_summary(choices: list[ChoiceResult]) -> dict | None:
    """Return the decoding statistics of the request's choices, summed: the ``saguaro`` response field."""
    stats = [choice.stats for choice in choices if choice.stats is not None]
    if not stats:
        return None
    steps = sum(s.steps for s in stats)
    hits = sum(s.cache_hits for s in stats)
    misses = sum(s.cache_misses for s in stats)
    completion = sum(choice.completion_tokens for choice in choices)
    decode_s = sum(s.decode_s for s in stats)
    # The first step's tokens arrive together, before decoding time starts.
    decoded = completion - sum(max(s.first_step_tokens, 1) for s in stats)
    return {
        "mode": stats[0].mode,
        "steps": steps,
        "mean_acceptance_length": completion / steps if steps else 0.0,
        "accepted_per_pos": [sum(values) for values in zip(*(s.accepted_per_pos for s in stats))],
        "cache_hits": hits,
        "cache_misses": misses,
        "cache_hit_rate": hits / (hits + misses) if hits + misses else None,
        "ttft_s": max(s.ttft_s for s in stats),
        "decode_tokens_per_s": decoded / decode_s if decoded > 0 and decode_s > 0 else None,
    }


# Log-probability rendering.


class CompletionLogprobRenderer:
    """Builder of the completions ``logprobs`` object, whose ``text_offset`` continues across streamed chunks."""

    def __init__(self, prompts: PromptProcessor, num_top: int) -> None:
        self.prompts = prompts
        self.num_top = num_top
        self.offset = 0

    def render(self, entries: list[TokenLogprob]) -> CompletionLogprobs:
        result = CompletionLogprobs()
        for entry in entries:
            token = self.prompts.token_text(entry.token_id)
            top = sorted(entry.top.items(), key=lambda item: item[1], reverse=True)[: self.num_top]
            top_texts = {self.prompts.token_text(token_id): logprob for token_id, logprob in top}
            # vLLM lists the sampled token among the alternatives even when it is not in the top N.
            top_texts.setdefault(token, entry.logprob)
            result.tokens.append(token)
            result.token_logprobs.append(entry.logprob)
            result.top_logprobs.append(top_texts)
            result.text_offset.append(self.offset)
            self.offset += len(token)
        return result


def render_chat_logprobs(prompts: PromptProcessor, entries: list[TokenLogprob], num_top: int) -> ChatChoiceLogprobs:
    content = []
    for entry in entries:
        token = prompts.token_text(entry.token_id)
        top = sorted(entry.top.items(), key=lambda item: item[1], reverse=True)[:num_top]
        content.append(
            ChatTokenLogprob(
                token=token,
                logprob=entry.logprob,
                bytes=list(token.encode("utf-8")),
                top_logprobs=[
                    ChatTopLogprob(
                        token=prompts.token_text(token_id),
                        logprob=logprob,
                        bytes=list(prompts.token_text(token_id).encode("utf-8")),
                    )
                    for token_id, logprob in top
                ],
            )
        )
    return ChatChoiceLogprobs(content=content)


# Routes.


@router.get("/models")
async def list_models(request: Request) -> ModelList:
    settings = request.app.state.gateway.settings
    return ModelList(data=[ModelCard(id=settings.model_id, max_model_len=settings.max_model_len)])


@router.get("/models/{model:path}")
async def retrieve_model(model: str, request: Request) -> ModelCard:
    settings = request.app.state.gateway.settings
    if model != settings.model_id:
        raise ModelNotFound(
            f"the model {model!r} does not exist; this server serves {settings.model_id!r}",
            param="model",
            code="model_not_found",
        )
    return ModelCard(id=settings.model_id, max_model_len=settings.max_model_len)


@router.post("/completions", response_model=None)
async def create_completion(body: CompletionRequest, request: Request) -> JSONResponse | EventStreamResponse:
    service = _service(request)
    request_id, from_client = _request_id(request)
    prepared = await service.prepare_completion(body, request_id, request_id_from_client=from_client)
    await service.admit(prepared)
    if prepared.stream:
        return EventStreamResponse(stream_completion(service, prepared), headers={"Cache-Control": "no-cache"})

    choices = await call_until_disconnect(request, service.collect(prepared))
    response = CompletionResponse(
        id=prepared.request_id,
        created=prepared.created,
        model=prepared.model,
        choices=[
            CompletionChoice(
                index=choice.index,
                text=choice.text,
                logprobs=(
                    CompletionLogprobRenderer(service.prompts, prepared.logprobs).render(choice.logprobs)
                    if prepared.logprobs is not None
                    else None
                ),
                finish_reason=choice.finish_reason,
                stop_reason=choice.stop_reason,
            )
            for choice in choices
        ],
        usage=_usage(prepared, choices),
        saguaro=decode_summary(choices),
    )
    return JSONResponse(response.model_dump())


@router.post("/chat/completions", response_model=None)
async def create_chat_completion(body: ChatCompletionRequest, request: Request) -> JSONResponse | EventStreamResponse:
    service = _service(request)
    request_id, from_client = _request_id(request)
    prepared = await service.prepare_chat(body, request_id, request_id_from_client=from_client)
    await service.admit(prepared)
    if prepared.stream:
        return EventStreamResponse(stream_chat(service, prepared), headers={"Cache-Control": "no-cache"})

    choices = await call_until_disconnect(request, service.collect(prepared))
    response = ChatCompletionResponse(
        id=prepared.request_id,
        created=prepared.created,
        model=prepared.model,
        choices=[
            ChatCompletionChoice(
                index=choice.index,
                message=ChatResponseMessage(content=choice.text),
                logprobs=(
                    render_chat_logprobs(service.prompts, choice.logprobs, prepared.logprobs)
                    if prepared.logprobs is not None
                    else None
                ),
                finish_reason=choice.finish_reason,
                stop_reason=choice.stop_reason,
            )
            for choice in choices
        ],
        usage=_usage(prepared, choices),
        saguaro=decode_summary(choices),
    )
    return JSONResponse(response.model_dump())


# Streaming.


async def stream_completion(service: GenerationService, prepared: PreparedGeneration) -> AsyncIterator[str]:
    base = {"id": prepared.request_id, "object": "text_completion", "created": prepared.created, "model": prepared.model}
    renderers = [
        CompletionLogprobRenderer(service.prompts, prepared.logprobs or 0) for _ in prepared.engine_requests
    ]

    def chunk(choice: dict) -> dict:
        payload = {**base, "choices": [choice]}
        if prepared.include_usage:
            payload["usage"] = None
        return payload

    async def body() -> AsyncIterator[dict]:
        choices: dict[int, ChoiceResult] = {}
        async with aclosing(service.run(prepared)) as events:
            async for choice, event in events:
                choices[choice.index] = choice
                if isinstance(event, TokenEvent):
                    if not event.text and prepared.logprobs is None:
                        continue
                    logprobs = None
                    if prepared.logprobs is not None:
                        logprobs = renderers[choice.index].render(event.logprobs or []).model_dump()
                    yield chunk(
                        {"index": choice.index, "text": event.text, "logprobs": logprobs, "finish_reason": None, "stop_reason": None}
                    )
                elif isinstance(event, FinishEvent):
                    yield chunk(
                        {
                            "index": choice.index,
                            "text": "",
                            "logprobs": None,
                            "finish_reason": event.finish_reason,
                            "stop_reason": event.stop_reason,
                        }
                    )
        if prepared.include_usage:
            ordered = [choices[index] for index in sorted(choices)]
            yield {**base, "choices": [], "usage": _usage(prepared, ordered).model_dump()}

    async for text in _sse(prepared, body()):
        yield text


async def stream_chat(service: GenerationService, prepared: PreparedGeneration) -> AsyncIterator[str]:
    base = {"id": prepared.request_id, "object": "chat.completion.chunk", "created": prepared.created, "model": prepared.model}

    def chunk(choice: dict) -> dict:
        payload = {**base, "choices": [choice]}
        if prepared.include_usage:
            payload["usage"] = None
        return payload

    async def body() -> AsyncIterator[dict]:
        for index in range(len(prepared.engine_requests)):
            yield chunk(
                {"index": index, "delta": {"role": "assistant", "content": ""}, "logprobs": None, "finish_reason": None}
            )
        choices: dict[int, ChoiceResult] = {}
        async with aclosing(service.run(prepared)) as events:
            async for choice, event in events:
                choices[choice.index] = choice
                if isinstance(event, TokenEvent):
                    if not event.text and prepared.logprobs is None:
                        continue
                    logprobs = None
                    if prepared.logprobs is not None:
                        logprobs = render_chat_logprobs(service.prompts, event.logprobs or [], prepared.logprobs).model_dump()
                    yield chunk(
                        {"index": choice.index, "delta": {"content": event.text}, "logprobs": logprobs, "finish_reason": None}
                    )
                elif isinstance(event, FinishEvent):
                    yield chunk(
                        {
                            "index": choice.index,
                            "delta": {},
                            "logprobs": None,
                            "finish_reason": event.finish_reason,
                            "stop_reason": event.stop_reason,
                        }
                    )
        if prepared.include_usage:
            ordered = [choices[index] for index in sorted(choices)]
            yield {**base, "choices": [], "usage": _usage(prepared, ordered).model_dump()}

    async for text in _sse(prepared, body()):
        yield text


async def _sse(prepared: PreparedGeneration, payloads: AsyncIterator[dict]) -> AsyncIterator[str]:
    """Format payloads as SSE events, turning a failure into an error event, and end with ``[DONE]``."""
    try:
        async with aclosing(payloads):
            async for payload in payloads:
                yield sse_data(payload)
    except GatewayError as exc:
        logger.warning("request %s failed while streaming: %s", prepared.request_id, exc.message)
        yield sse_data({**exc.to_body(), "status_code": exc.status_code})
    except Exception:
        logger.exception("request %s failed while streaming", prepared.request_id)
        yield sse_data({"error": {"message": "internal server error", "type": "internal_error", "param": None, "code": None}})
    yield sse_data("[DONE]")
