"""Entry point of the gateway (``saguaro-gateway``): HTTP API on gateway_host:gateway_port, gRPC on grpc_port."""

from __future__ import annotations

import argparse
import sys

import uvicorn

from shared.config import add_settings_flags, settings_from_args
from services.gateway.app import create_app
from shared.service import setup_logging

GATEWAY_FLAGS = [
    "redis_url",
    "namespace",
    "log_level",
    "log_json",
    "target_model",
    "served_model_name",
    "max_model_len",
    "gateway_host",
    "gateway_port",
    "grpc_port",
    "api_keys",
    "max_tokens_limit",
    "max_request_bytes",
    "max_queue_depth",
    "request_timeout_s",
]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="saguaro-gateway",
        description="OpenAI-compatible HTTP and gRPC gateway in front of the Saguaro verify service.",
    )
    add_settings_flags(parser, GATEWAY_FLAGS)
    args = parser.parse_args(argv)
    settings = settings_from_args(args)
    setup_logging(settings.log_level, settings.log_json)

    app = create_app(settings)
    uvicorn.run(
        app,
        host=settings.gateway_host,
        port=settings.gateway_port,
        log_config=None,  # keep the handlers set up above, so uvicorn's logs share their format
        log_level=settings.log_level.lower(),
        timeout_graceful_shutdown=5,
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
