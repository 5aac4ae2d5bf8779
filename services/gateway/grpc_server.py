"""gRPC front end (``saguaro.v1.Generation`` and ``grpc.health.v1.Health``) on grpc.aio.

It runs on the event loop of the REST app and uses the same
``GenerationService``, so validation, limits, metrics and the engine client
are shared. A gRPC request is converted to the matching OpenAI request model
and validated like a REST request.
"""

from __future__ import annotations

import asyncio
import logging
from contextlib import aclosing
from typing import Any

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from pydantic import ValidationError

from shared.config import Settings
from shared.proto import saguaro_pb2, saguaro_pb2_grpc
from shared.protocol import FinishEvent, TokenEvent, TokenLogprob
from services.gateway.auth import check_api_key
from services.gateway.engine_client import ChoiceResult
from services.gateway.errors import GatewayError, InvalidRequest, invalid_request_from_validation
from services.gateway.schemas import ChatCompletionRequest, CompletionRequest
from services.gateway.service import GenerationService, PreparedGeneration, accept_request_id

logger = logging.getLogger("saguaro.gateway")

SERVICE_NAME = saguaro_pb2.DESCRIPTOR.services_by_name["Generation"].full_name
HEALTH_POLL_S = 1.0

_STATUS_BY_HTTP = {
    400: grpc.StatusCode.INVALID_ARGUMENT,
    401: grpc.StatusCode.UNAUTHENTICATED,
    404: grpc.StatusCode.NOT_FOUND,
    413: grpc.StatusCode.INVALID_ARGUMENT,
    429: grpc.StatusCode.RESOURCE_EXHAUSTED,
    503: grpc.StatusCode.UNAVAILABLE,
    504: grpc.StatusCode.DEADLINE_EXCEEDED,
}


def grpc_status(error: GatewayError) -> grpc.StatusCode:
    return _STATUS_BY_HTTP.get(error.status_code, grpc.StatusCode.INTERNAL)


def _rounded(value: float) -> float:
    # Proto floats are 32-bit, so 0.7 arrives as 0.699999988. Rounding to six digits restores the value the client wrote.
    return round(value, 6)


def request_to_model(request: saguaro_pb2.GenerateRequest) -> CompletionRequest | ChatCompletionRequest:
    """Convert a proto request to the OpenAI request model, or raise ``InvalidRequest`` if it is invalid."""
    sampling = request.sampling
    fields: dict[str, Any] = {}
    if request.model:
        fields["model"] = request.model
    if sampling.n:
        fields["n"] = sampling.n
    if sampling.HasField("temperature"):
        fields["temperature"] = _rounded(sampling.temperature)
    if sampling.HasField("top_p"):
        fields["top_p"] = _rounded(sampling.top_p)
    if sampling.HasField("top_k"):
        fields["top_k"] = sampling.top_k
    if sampling.HasField("seed"):
        fields["seed"] = sampling.seed
    if sampling.HasField("max_tokens"):
        fields["max_tokens"] = sampling.max_tokens
    if sampling.stop:
        fields["stop"] = list(sampling.stop)
    if sampling.stop_token_ids:
        fields["stop_token_ids"] = list(sampling.stop_token_ids)
    fields["ignore_eos"] = sampling.ignore_eos

    kind = request.WhichOneof("input")
    try:
        if kind == "chat":
            fields["messages"] = [{"role": m.role, "content": m.content} for m in request.chat.messages]
            if sampling.HasField("logprobs"):
                fields["logprobs"] = True
                fields["top_logprobs"] = sampling.logprobs
            return ChatCompletionRequest.model_validate(fields)
        if kind == "prompt":
            fields["prompt"] = request.prompt
        elif kind == "prompt_token_ids":
            fields["prompt"] = list(request.prompt_token_ids.ids)
        else:
            raise InvalidRequest("one of prompt, prompt_token_ids or chat is required", param="input")
        if sampling.HasField("logprobs"):
            fields["logprobs"] = sampling.logprobs
        return CompletionRequest.model_validate(fields)
    except ValidationError as exc:
        raise invalid_request_from_validation(exc.errors()) from exc


def _logprobs_to_proto(entries: list[TokenLogprob]) -> list[saguaro_pb2.TokenLogprob]:
    return [
        saguaro_pb2.TokenLogprob(
            token_id=entry.token_id,
            logprob=entry.logprob,
            top=[saguaro_pb2.TopLogprob(token_id=token_id, logprob=logprob) for token_id, logprob in entry.top.items()],
        )
        for entry in entries
    ]


def _usage(prompt_tokens: int, completion_tokens: int) -> saguaro_pb2.Usage:
    return saguaro_pb2.Usage(
        prompt_tokens=prompt_tokens,
        completion_tokens=completion_tokens,
        total_tokens=prompt_tokens + completion_tokens,
    )


def _stop_reason(value: str | int | None) -> str:
    return "" if value is None else str(value)


class GenerationServicer(saguaro_pb2_grpc.GenerationServicer):
    def __init__(self, service: GenerationService, settings: Settings) -> None:
        self.service = service
        self.settings = settings

    async def Generate(self, request: saguaro_pb2.GenerateRequest, context: grpc.aio.ServicerContext):
        status = "OK"
        try:
            prepared = await self._prepare(request, context)
            choices = await self.service.collect(prepared)
            return self._response(prepared, choices)
        except GatewayError as exc:
            status = grpc_status(exc).name
            await context.abort(grpc_status(exc), exc.message)
        except asyncio.CancelledError:
            status = "CANCELLED"
            raise
        except Exception:
            status = "INTERNAL"
            logger.exception("gRPC Generate failed")
            await context.abort(grpc.StatusCode.INTERNAL, "internal server error")
        finally:
            self.service.metrics.count_request("grpc.Generate", status)

    async def GenerateStream(self, request: saguaro_pb2.GenerateRequest, context: grpc.aio.ServicerContext):
        status = "OK"
        try:
            prepared = await self._prepare(request, context)
            seeds = [engine_request.sampling.seed for engine_request in prepared.engine_requests]
            async with aclosing(self.service.run(prepared)) as events:
                async for choice, event in events:
                    if isinstance(event, TokenEvent):
                        yield saguaro_pb2.GenerateStreamResponse(
                            request_id=prepared.request_id,
                            index=choice.index,
                            text=event.text,
                            token_ids=event.token_ids,
                            logprobs=_logprobs_to_proto(event.logprobs or []),
                        )
                    elif isinstance(event, FinishEvent):
                        yield saguaro_pb2.GenerateStreamResponse(
                            request_id=prepared.request_id,
                            index=choice.index,
                            finish_reason=event.finish_reason,
                            stop_reason=_stop_reason(event.stop_reason),
                            usage=_usage(event.usage.prompt_tokens, event.usage.completion_tokens),
                            seed=seeds[choice.index],
                        )
        except GatewayError as exc:
            status = grpc_status(exc).name
            await context.abort(grpc_status(exc), exc.message)
        except asyncio.CancelledError:
            status = "CANCELLED"
            raise
        except Exception:
            status = "INTERNAL"
            logger.exception("gRPC GenerateStream failed")
            await context.abort(grpc.StatusCode.INTERNAL, "internal server error")
        finally:
            self.service.metrics.count_request("grpc.GenerateStream", status)

    async def _prepare(self, request: saguaro_pb2.GenerateRequest, context: grpc.aio.ServicerContext) -> PreparedGeneration:
        metadata = {key.lower(): value for key, value in (context.invocation_metadata() or ())}
        check_api_key(metadata.get("authorization"), self.settings.api_keys)
        body = request_to_model(request)
        is_chat = isinstance(body, ChatCompletionRequest)
        request_id, from_client = accept_request_id(request.request_id or None, "chatcmpl" if is_chat else "cmpl")
        if is_chat:
            prepared = await self.service.prepare_chat(body, request_id, request_id_from_client=from_client)
        else:
            prepared = await self.service.prepare_completion(body, request_id, request_id_from_client=from_client)
        await self.service.admit(prepared)
        return prepared

    @staticmethod
    def _response(prepared: PreparedGeneration, choices: list[ChoiceResult]) -> saguaro_pb2.GenerateResponse:
        prompt_tokens = next((c.prompt_tokens for c in choices if c.prompt_tokens), len(prepared.prompt_token_ids))
        return saguaro_pb2.GenerateResponse(
            request_id=prepared.request_id,
            model=prepared.model,
            choices=[
                saguaro_pb2.Choice(
                    index=choice.index,
                    text=choice.text,
                    token_ids=choice.token_ids,
                    finish_reason=choice.finish_reason or "",
                    stop_reason=_stop_reason(choice.stop_reason),
                    logprobs=_logprobs_to_proto(choice.logprobs),
                    usage=_usage(choice.prompt_tokens, choice.completion_tokens),
                    seed=prepared.engine_requests[choice.index].sampling.seed,
                )
                for choice in choices
            ],
            usage=_usage(prompt_tokens, sum(choice.completion_tokens for choice in choices)),
        )


class GrpcGateway:
    """A started gRPC server plus the task that keeps its health status current."""

    def __init__(self, server: grpc.aio.Server, port: int, health_servicer: health.aio.HealthServicer, poller: asyncio.Task) -> None:
        self.server = server
        self.port = port
        self.health_servicer = health_servicer
        self._poller = poller

    async def stop(self, grace: float | None = None) -> None:
        self._poller.cancel()
        await self.health_servicer.enter_graceful_shutdown()
        await self.server.stop(grace)
        logger.info("gRPC server on port %d stopped", self.port)


async def start_grpc_server(
    service: GenerationService, settings: Settings, *, host: str | None = None, port: int | None = None
) -> GrpcGateway:
    """Start the gRPC server on ``host:port``, by default ``gateway_host:grpc_port``. Port 0 picks a free port."""
    host = settings.gateway_host if host is None else host
    port = settings.grpc_port if port is None else port
    server = grpc.aio.server(
        options=[
            ("grpc.max_receive_message_length", settings.max_request_bytes),
            ("grpc.max_send_message_length", 64 * 1024 * 1024),
        ]
    )
    saguaro_pb2_grpc.add_GenerationServicer_to_server(GenerationServicer(service, settings), server)
    health_servicer = health.aio.HealthServicer()
    for name in ("", SERVICE_NAME):
        await health_servicer.set(name, health_pb2.HealthCheckResponse.NOT_SERVING)
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)

    bound_port = server.add_insecure_port(f"{host}:{port}")
    if bound_port == 0:
        raise RuntimeError(f"the gRPC server could not bind {host}:{port}")
    await server.start()
    poller = asyncio.create_task(_poll_readiness(service, health_servicer))
    logger.info("gRPC server listening on %s:%d (service %s)", host, bound_port, SERVICE_NAME)
    return GrpcGateway(server, bound_port, health_servicer, poller)


async def _poll_readiness(service: GenerationService, health_servicer: health.aio.HealthServicer) -> None:
    """Set the health status of the server and the Generation service from readiness, every ``HEALTH_POLL_S``."""
    last_status = None
    while True:
        try:
            readiness = await service.engine.readiness(use_cache=False)
            serving = readiness.ready
        except Exception as exc:  # polling continues, with NOT_SERVING until Redis responds again
            logger.warning("gRPC health: readiness check failed: %s", exc)
            serving = False
        status = health_pb2.HealthCheckResponse.SERVING if serving else health_pb2.HealthCheckResponse.NOT_SERVING
        if status != last_status:
            for name in ("", SERVICE_NAME):
                await health_servicer.set(name, status)
            logger.info("gRPC health status is %s", health_pb2.HealthCheckResponse.ServingStatus.Name(status))
            last_status = status
        await asyncio.sleep(HEALTH_POLL_S)
