"""Process plumbing shared by the verify and draft services: logging, health/metrics server, heartbeats, Redis."""

from __future__ import annotations

import json
import logging
import os
import socket
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Callable

import redis
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from shared import keys
from shared.protocol import ReplicaInfo, decode, encode

logger = logging.getLogger("saguaro.service")


class JsonFormatter(logging.Formatter):
    """One JSON object per record: UTC time, level, logger, message, request id and exception if any."""

    def format(self, record: logging.LogRecord) -> str:
        entry = {
            "time": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created)) + f".{int(record.msecs):03d}Z",
            "level": record.levelname,
            "logger": record.name,
            "message": record.getMessage(),
        }
        request_id = getattr(record, "request_id", None)
        if request_id:
            entry["request_id"] = request_id
        if record.exc_info:
            entry["exception"] = self.formatException(record.exc_info)
        return json.dumps(entry, ensure_ascii=False)


def setup_logging(level: str, json_lines: bool) -> None:
    handler = logging.StreamHandler()
    if json_lines:
        handler.setFormatter(JsonFormatter())
    else:
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level.upper())


def default_replica_id(role: str) -> str:
    return f"{role}-{socket.gethostname()}-{os.getpid()}"


def connect_redis(url: str) -> redis.Redis:
    """Connect to Redis (redis://, rediss:// for TLS, passwords in the URL) and check that it responds."""
    # The socket timeout is explicit because redis-py's default changed (none up to 5.x, 5 s in 8.2).
    # No call of the services blocks longer than a second, so 30 s only catches a dead server.
    client = redis.Redis.from_url(url, socket_connect_timeout=5, socket_timeout=30, health_check_interval=30)
    try:
        client.ping()
    except redis.RedisError as exc:
        raise ConnectionError(f"cannot reach Redis at {redact_url(url)}: {exc}; start redis-server or set SAGUARO_REDIS_URL") from exc
    return client


def redact_url(url: str) -> str:
    """Hide the password of a Redis URL for logs and errors."""
    if "@" not in url or "//" not in url:
        return url
    scheme, rest = url.split("//", 1)
    credentials, host = rest.rsplit("@", 1)
    user = credentials.split(":", 1)[0]
    return f"{scheme}//{user}:***@{host}"


class Heartbeat(threading.Thread):
    """Writes this replica's ``ReplicaInfo`` to Redis every ``keys.HEARTBEAT_S`` seconds."""

    def __init__(self, client: redis.Redis, namespace: str, info: Callable[[], ReplicaInfo]):
        super().__init__(name="heartbeat", daemon=True)
        self.client = client
        self.namespace = namespace
        self.info = info
        self.stopped = threading.Event()
        self.healthy = False

    def beat(self) -> None:
        info = self.info()
        self.client.set(keys.replica(self.namespace, info.role, info.replica_id), encode(info), ex=keys.REPLICA_TTL_S)

    def run(self) -> None:
        failures = 0
        while not self.stopped.is_set():
            try:
                self.beat()
                self.healthy = True
                failures = 0
            except redis.RedisError as exc:
                self.healthy = False
                failures += 1
                if failures in (1, 10) or failures % 100 == 0:
                    logger.warning("heartbeat to Redis failed (%d in a row): %s", failures, exc)
            self.stopped.wait(keys.HEARTBEAT_S)

    def stop(self) -> None:
        self.stopped.set()
        info = self.info()
        try:
            self.client.delete(keys.replica(self.namespace, info.role, info.replica_id))
        except redis.RedisError as exc:
            logger.warning("could not remove the heartbeat key on shutdown: %s", exc)


def live_replicas(client: redis.Redis, namespace: str, role: str) -> list[ReplicaInfo]:
    found = []
    for key in client.scan_iter(match=keys.replica_pattern(namespace, role), count=100):
        value = client.get(key)
        if value is None:
            continue
        try:
            found.append(decode(value))
        except ValueError as exc:
            logger.warning("ignoring malformed replica record %s: %s", key, exc)
    return found


def start_health_server(host: str, port: int, readiness: Callable[[], tuple[bool, dict]]) -> ThreadingHTTPServer | None:
    """Serve ``/metrics``, ``/health/live`` and ``/health/ready`` on a background thread; port 0 disables it."""
    if port == 0:
        return None

    class Handler(BaseHTTPRequestHandler):
        def do_GET(self) -> None:  # noqa: N802 (http.server API)
            if self.path == "/metrics":
                self._send(200, generate_latest(), CONTENT_TYPE_LATEST)
            elif self.path in ("/health/live", "/livez"):
                self._send(200, b'{"status": "alive"}', "application/json")
            elif self.path in ("/health/ready", "/readyz", "/health"):
                ready, detail = readiness()
                body = json.dumps({"status": "ready" if ready else "not ready", **detail}).encode()
                self._send(200 if ready else 503, body, "application/json")
            else:
                self._send(404, b'{"error": "not found"}', "application/json")

        def _send(self, status: int, body: bytes, content_type: str) -> None:
            self.send_response(status)
            self.send_header("Content-Type", content_type)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, format: str, *args) -> None:  # noqa: A002 (http.server API)
            pass

    server = ThreadingHTTPServer((host, port), Handler)
    threading.Thread(target=server.serve_forever, name="health", daemon=True).start()
    logger.info("health and metrics on http://%s:%d", host, server.server_address[1])
    return server


def now() -> float:
    return time.time()
