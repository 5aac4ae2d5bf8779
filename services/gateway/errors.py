"""Errors the gateway returns to clients, shared by the REST and gRPC front ends.

Each error carries the HTTP status and the OpenAI error body fields. The gRPC
server maps the HTTP status to a gRPC status code.
"""

from __future__ import annotations

import json
from typing import Any


class GatewayError(Exception):
    """An error with the HTTP status and the OpenAI error ``type``, ``param`` and ``code``."""

    status_code = 500
    error_type = "internal_error"

    def __init__(
        self,
        message: str,
        *,
        param: str | None = None,
        code: str | None = None,
        headers: dict[str, str] | None = None,
    ) -> None:
        super().__init__(message)
        self.message = message
        self.param = param
        self.code = code
        self.headers = headers or {}

    def to_body(self) -> dict[str, Any]:
        return error_body(self.message, self.error_type, param=self.param, code=self.code)


def error_body(message: str, error_type: str, *, param: str | None = None, code: str | None = None) -> dict[str, Any]:
    """Build the OpenAI error object ``{"error": {...}}``."""
    return {"error": {"message": message, "type": error_type, "param": param, "code": code}}


class InvalidRequest(GatewayError):
    status_code = 400
    error_type = "invalid_request_error"


class AuthenticationFailed(GatewayError):
    status_code = 401
    error_type = "invalid_request_error"


class ModelNotFound(GatewayError):
    status_code = 404
    error_type = "invalid_request_error"


class RequestTooLarge(GatewayError):
    status_code = 413
    error_type = "invalid_request_error"


class Overloaded(GatewayError):
    """The request queue is full, so the client should retry after ``Retry-After`` seconds."""

    status_code = 429
    error_type = "rate_limit_error"


class NotReady(GatewayError):
    """No verify (or draft) replica is alive, so nothing could serve the request."""

    status_code = 503
    error_type = "service_unavailable"


class RequestTimeout(GatewayError):
    status_code = 504
    error_type = "timeout_error"


class EngineFailed(GatewayError):
    """The verify service reported an ``ErrorEvent`` or sent an unreadable event."""

    status_code = 500
    error_type = "internal_error"


class ClientDisconnected(Exception):
    """The client closed the connection before the response was complete."""


def validation_param(location: tuple) -> str | None:
    """Turn a pydantic error location like ``("body", "messages", 0, "content")`` into ``messages[0].content``."""
    parts = list(location[1:]) if location and location[0] == "body" else list(location)
    param = ""
    for part in parts:
        if isinstance(part, int):
            param += f"[{part}]"
        else:
            param += f".{part}" if param else str(part)
    return param or None


def validation_message(error: dict) -> str:
    message = str(error.get("msg", "invalid value"))
    message = message.removeprefix("Value error, ")
    if error.get("type") == "json_invalid":
        detail = (error.get("ctx") or {}).get("error", "")
        return f"the request body is not valid JSON ({detail}); send a JSON object"
    location = error.get("loc", ())
    param = validation_param(location)
    if param is None:
        if error.get("type") == "missing":
            return "the request body is missing; send a JSON object"
        if isinstance(error.get("input"), (bytes, str)):
            # FastAPI parses the body as JSON only under a JSON content type; otherwise it passes the raw bytes on.
            return "the request body was not read as JSON because its Content-Type is not application/json; send a JSON object with the header Content-Type: application/json"
        return f"invalid request body: {message}; send a JSON object"
    if error.get("type") == "missing":
        return f"{param} is required"
    if "input" in error and error["type"] not in ("value_error", "assertion_error"):
        shown = json.dumps(error["input"], default=str)
        if len(shown) > 80:
            shown = shown[:77] + "..."
        return f"invalid value for {param}: {message[0].lower() + message[1:]} (got {shown})"
    return f"invalid value for {param}: {message}"


def invalid_request_from_validation(errors: list[dict]) -> InvalidRequest:
    """Convert pydantic validation errors into one ``InvalidRequest`` naming the first invalid field."""
    first = errors[0] if errors else {"msg": "invalid request", "loc": ()}
    message = validation_message(first)
    if len(errors) > 1:
        message += f" (and {len(errors) - 1} more invalid field{'s' if len(errors) > 2 else ''})"
    param = None if first.get("type") == "json_invalid" else validation_param(tuple(first.get("loc", ())))
    return InvalidRequest(message, param=param)
