"""FastAPI application of the gateway: OpenAI-compatible API, health, metrics and the gRPC server.

``create_app(settings)`` builds the app. Its lifespan loads the target model's
tokenizer, opens the Redis engine client and, when ``settings.grpc_port`` > 0,
starts the gRPC server on the same event loop, sharing the engine client.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from prometheus_client import CONTENT_TYPE_LATEST
from redis.exceptions import RedisError
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from shared.config import Settings
from services.gateway.engine_client import NOT_READY_RETRY_AFTER_S, EngineClient
from services.gateway.auth import check_api_key
from services.gateway.errors import (
    AuthenticationFailed,
    ClientDisconnected,
    GatewayError,
    RequestTooLarge,
    error_body,
    invalid_request_from_validation,
)
from services.gateway.metrics import GatewayMetrics
from services.gateway.openai_api import router as openai_router
from services.gateway.prompts import PromptProcessor, load_tokenizer
from services.gateway.service import GenerationService, accept_request_id

logger = logging.getLogger("saguaro.gateway")

REQUEST_ID_HEADER = "x-request-id"
REQUEST_ID_PREFIXES = {"/v1/completions": "cmpl", "/v1/chat/completions": "chatcmpl"}
# Endpoint label values of the request counter. Other /v1 paths count as "other", which bounds the label set.
COUNTED_ENDPOINTS = ("/v1/completions", "/v1/chat/completions", "/v1/models")


@dataclass
class GatewayState:
    """Objects shared by the routes, stored at ``app.state.gateway``."""

    settings: Settings
    engine: EngineClient
    prompts: PromptProcessor
    metrics: GatewayMetrics
    service: GenerationService


def create_app(
    settings: Settings,
    *,
    engine: EngineClient | None = None,
    tokenizer: Any = None,
    readiness_cache_s: float = 0.5,
) -> FastAPI:
    """Build the gateway app.

    ``engine`` and ``tokenizer`` default to an ``EngineClient`` on
    ``settings.redis_url`` and the tokenizer of ``settings.target_model``,
    both created when the app starts. A given engine is not closed on
    shutdown.
    """
    metrics = GatewayMetrics(settings.model_id)

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        loaded_tokenizer = tokenizer
        if loaded_tokenizer is None:
            logger.info("loading the tokenizer of %s", settings.target_model)
            loaded_tokenizer = await asyncio.to_thread(load_tokenizer, settings.target_model)
        engine_client = engine or EngineClient(settings, readiness_cache_s=readiness_cache_s)
        prompts = PromptProcessor(loaded_tokenizer)
        service = GenerationService(settings, engine_client, prompts, metrics)
        app.state.gateway = GatewayState(settings, engine_client, prompts, metrics, service)

        grpc_server = None
        if settings.grpc_port > 0:
            from services.gateway.grpc_server import start_grpc_server

            grpc_server = await start_grpc_server(service, settings)
        logger.info(
            "gateway started: model %s, namespace %s, max_model_len %d, authentication %s",
            settings.model_id,
            settings.namespace,
            settings.max_model_len,
            "on" if settings.api_keys else "off",
        )
        try:
            yield
        finally:
            if grpc_server is not None:
                await grpc_server.stop(grace=2.0)
            if engine is None:
                await engine_client.close()
            prompts.close()
            logger.info("gateway stopped")

    app = FastAPI(title="Saguaro gateway", lifespan=lifespan)
    app.state.metrics = metrics
    app.include_router(openai_router)
    _add_operational_routes(app)
    _add_exception_handlers(app)
    app.add_middleware(GatewayMiddleware, settings=settings, metrics=metrics)
    return app


def _add_operational_routes(app: FastAPI) -> None:
    @app.get("/health")
    async def health(request: Request) -> JSONResponse:
        engine = request.app.state.gateway.engine
        try:
            readiness = await engine.readiness(use_cache=False)
        except RedisError as exc:
            logger.error("health check failed because Redis is unreachable: %s", exc)
            body = {"status": "not ready", "ready": False, "missing": [f"Redis is unreachable: {type(exc).__name__}"]}
            return JSONResponse(body, status_code=503, headers={"Retry-After": str(NOT_READY_RETRY_AFTER_S)})
        body = {"status": "ready" if readiness.ready else "not ready", **readiness.to_dict()}
        if readiness.ready:
            return JSONResponse(body)
        return JSONResponse(body, status_code=503, headers={"Retry-After": str(NOT_READY_RETRY_AFTER_S)})

    @app.get("/health/live")
    async def live() -> dict:
        return {"status": "alive"}

    @app.get("/metrics")
    async def metrics(request: Request) -> Response:
        gateway: GatewayState = request.app.state.gateway
        try:
            depth = await gateway.engine.queue_depth()
        except RedisError as exc:
            logger.warning("metrics: reading the queue depth failed: %s", exc)
            depth = None
        return Response(gateway.metrics.render(depth), media_type=CONTENT_TYPE_LATEST)


def _add_exception_handlers(app: FastAPI) -> None:
    @app.exception_handler(GatewayError)
    async def gateway_error(request: Request, exc: GatewayError) -> JSONResponse:
        return JSONResponse(exc.to_body(), status_code=exc.status_code, headers=exc.headers)

    @app.exception_handler(RequestValidationError)
    async def validation_error(request: Request, exc: RequestValidationError) -> JSONResponse:
        error = invalid_request_from_validation(list(exc.errors()))
        return JSONResponse(error.to_body(), status_code=error.status_code)

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        error_type = "not_found_error" if exc.status_code == 404 else "invalid_request_error"
        return JSONResponse(
            error_body(f"{exc.detail}: {request.method} {request.url.path}", error_type),
            status_code=exc.status_code,
            headers=exc.headers,
        )

    @app.exception_handler(ClientDisconnected)
    async def client_disconnected(request: Request, exc: ClientDisconnected) -> Response:
        logger.info("request %s: client disconnected before the response; the engine request was cancelled", request.state.request_id)
        # 499 is nginx's status for a request closed by the client. The client never receives this response.
        return Response(status_code=499)

    @app.exception_handler(Exception)
    async def unexpected_error(request: Request, exc: Exception) -> JSONResponse:
        logger.exception("request %s failed", getattr(request.state, "request_id", "?"))
        return JSONResponse(error_body("internal server error", "internal_error"), status_code=500)


class GatewayMiddleware:
    """Request ids, authentication, the body size limit and the request counter, as plain ASGI.

    Order per HTTP request: assign the request id, check the API key on
    ``/v1/*``, then read the whole body (413 above ``max_request_bytes``) and
    pass it to the app. Buffering is bounded by the same limit.
    """

    def __init__(self, app: ASGIApp, settings: Settings, metrics: GatewayMetrics) -> None:
        self.app = app
        self.settings = settings
        self.metrics = metrics

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return

        path: str = scope["path"]
        headers = {name.decode("latin-1").lower(): value.decode("latin-1") for name, value in scope["headers"]}
        request_id, from_client = accept_request_id(headers.get(REQUEST_ID_HEADER), REQUEST_ID_PREFIXES.get(path, "req"))
        scope.setdefault("state", {})
        scope["state"]["request_id"] = request_id
        scope["state"]["request_id_from_client"] = from_client

        status_holder: dict[str, int] = {}

        async def send_with_request_id(message: Message) -> None:
            if message["type"] == "http.response.start":
                status_holder["status"] = message["status"]
                message.setdefault("headers", [])
                message["headers"] = [*message["headers"], (b"x-request-id", request_id.encode())]
            await send(message)

        try:
            error = self._check_auth(path, headers)
            if error is None:
                body, error = await self._read_body(headers, receive)
            if error is not None:
                await self._send_error(error, send_with_request_id)
                return
            await self.app(scope, self._replay(body, receive), send_with_request_id)
        finally:
            if path.startswith("/v1/"):
                endpoint = path if path in COUNTED_ENDPOINTS else "other"
                self.metrics.count_request(endpoint, status_holder.get("status", "disconnected"))

    def _check_auth(self, path: str, headers: dict[str, str]) -> GatewayError | None:
        if not path.startswith("/v1/"):
            return None
        try:
            check_api_key(headers.get("authorization"), self.settings.api_keys)
        except AuthenticationFailed as exc:
            return exc
        return None

    async def _read_body(self, headers: dict[str, str], receive: Receive) -> tuple[bytes, GatewayError | None]:
        limit = self.settings.max_request_bytes
        too_large = RequestTooLarge(
            f"the request body is larger than the limit of {limit} bytes; send a smaller request",
            code="request_too_large",
        )
        declared = headers.get("content-length")
        if declared is not None and declared.isdigit() and int(declared) > limit:
            return b"", too_large
        chunks = []
        size = 0
        while True:
            message = await receive()
            if message["type"] == "http.disconnect":
                break
            chunk = message.get("body", b"")
            size += len(chunk)
            if size > limit:
                return b"", too_large
            chunks.append(chunk)
            if not message.get("more_body", False):
                break
        return b"".join(chunks), None

    @staticmethod
    def _replay(body: bytes, receive: Receive) -> Receive:
        sent = False

        async def replay() -> Message:
            nonlocal sent
            if not sent:
                sent = True
                return {"type": "http.request", "body": body, "more_body": False}
            return await receive()

        return replay

    @staticmethod
    async def _send_error(error: GatewayError, send: Send) -> None:
        response = JSONResponse(error.to_body(), status_code=error.status_code, headers=error.headers)
        await response({"type": "http"}, _no_receive, send)


async def _no_receive() -> Message:
    return {"type": "http.disconnect"}
