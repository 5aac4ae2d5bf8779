"""Entry point of the gateway (``saguaro-gateway``): HTTP API on gateway_host:gateway_port, gRPC on grpc_port."""

from __future__ import annotations

import argparse
import json
import logging
import sys
import time

import uvicorn

from shared.config import Settings, add_settings_flags, settings_from_args
from services.gateway.app import create_app

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


class JsonFormatter(logging.Formatter):
    """One JSON object per record: time, level, logger, message and the exception if any."""

    def format(self, record: logging.LogRecord) -> str:
        entry = {
            "time": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created)) + f".{int(record.msecs):03d}Z",
            "level": record.levelname,
            "logger": record.name,
            "message": record.getMessage(),
        }
        if record.exc_info:
            entry["exception"] = self.formatException(record.exc_info)
        return json.dumps(entry, ensure_ascii=False)


def setup_logging(settings: Settings) -> None:
    handler = logging.StreamHandler(sys.stderr)
    if settings.log_json:
        handler.setFormatter(JsonFormatter())
    else:
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(settings.log_level.upper())


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="saguaro-gateway",
        description="OpenAI-compatible HTTP and gRPC gateway in front of the Saguaro verify service.",
    )
    add_settings_flags(parser, GATEWAY_FLAGS)
    args = parser.parse_args(argv)
    settings = settings_from_args(args)
    setup_logging(settings)

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
