"""Local launcher: Redis (if needed) plus the draft, verify and gateway services as separate processes."""

from __future__ import annotations

import logging
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path

import redis

from shared.service import redact_url

logger = logging.getLogger("saguaro.launcher")

SERVICES = ("draft", "verify", "gateway")


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def redis_reachable(url: str) -> bool:
    try:
        return bool(redis.Redis.from_url(url, socket_connect_timeout=1).ping())
    except redis.RedisError:
        return False


def default_cpu_split() -> tuple[str, str]:
    """Return (verify_cpus, draft_cpus): one core each when at least two are available."""
    cpus = sorted(os.sched_getaffinity(0))
    if len(cpus) < 2:
        return "", ""
    return str(cpus[0]), str(cpus[1])


def replica_name(service: str, index: int) -> str:
    """Return the process name of replica ``index`` (1-based): the service name for the first, ``{service}-{index}`` after it."""
    return service if index == 1 else f"{service}-{index}"


def service_of(process_name: str) -> str:
    return process_name.split("-", 1)[0]


def replica_overrides(service: str, index: int, count: int, base_env: dict[str, str]) -> dict[str, str]:
    """Return the settings that replica ``index`` of ``count`` changes in the stack's base environment.

    A service with one replica keeps the base environment. With several, each
    replica gets the replica id ``{id}-{index}``, where ``id`` is the base
    SAGUARO_REPLICA_ID or the service name. Replicas after the first get
    their own free ports: the metrics port for verify and draft, the HTTP
    port and (when enabled) the gRPC port for the gateway. Such a draft
    binds ZeroMQ on 127.0.0.1 at a free port and advertises that address,
    because SAGUARO_DRAFT_ADVERTISE is cleared for it.
    """
    if count == 1:
        return {}
    overrides = {"SAGUARO_REPLICA_ID": f"{base_env.get('SAGUARO_REPLICA_ID') or service}-{index}"}
    if index == 1:
        return overrides
    if service in ("verify", "draft"):
        overrides[f"SAGUARO_{service.upper()}_METRICS_PORT"] = str(free_port())
    if service == "draft":
        overrides["SAGUARO_DRAFT_BIND"] = f"tcp://127.0.0.1:{free_port()}"
        overrides["SAGUARO_DRAFT_ADVERTISE"] = ""
    if service == "gateway":
        overrides["SAGUARO_GATEWAY_PORT"] = str(free_port())
        if int(base_env.get("SAGUARO_GRPC_PORT", 0) or 0):
            overrides["SAGUARO_GRPC_PORT"] = str(free_port())
    return overrides


@dataclass
class Stack:
    """Processes of one local deployment; use as a context manager or call ``start``/``stop``.

    ``replicas`` sets how many processes of a service to start, e.g.
    ``{"verify": 2, "draft": 2}``; a service it omits gets one. Processes are
    keyed by ``replica_name``: ``processes["verify"]`` is the first verify
    replica and ``processes["verify-2"]`` the second. ``env`` is the base
    environment. The first replica of each service runs with it unchanged,
    except for a replica id when the service has several replicas.
    ``replica_envs`` contains the full environment of each process.

    NOTE: all replicas of a service are pinned to the same cores
    (SAGUARO_VERIFY_CPUS or SAGUARO_DRAFT_CPUS, one core each by default),
    so extra replicas share those cores instead of using more.
    """

    env: dict[str, str] = field(default_factory=dict)
    log_dir: Path = Path("logs")
    services: tuple[str, ...] = SERVICES
    start_timeout_s: float = 300.0
    redis_url: str | None = None
    gateway_port: int = 0
    replicas: dict[str, int] = field(default_factory=dict)
    processes: dict[str, subprocess.Popen] = field(default_factory=dict)
    replica_envs: dict[str, dict[str, str]] = field(default_factory=dict)
    _redis_process: subprocess.Popen | None = None

    def __enter__(self) -> "Stack":
        self.start()
        return self

    def __exit__(self, *exc) -> None:
        self.stop()

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.gateway_port}"

    def replica_count(self, service: str) -> int:
        count = self.replicas.get(service, 1)
        if count < 1:
            raise ValueError(f"replicas[{service!r}] is {count}; a started service needs at least 1 replica")
        return count

    def _resolve_redis(self) -> str:
        explicit = self.redis_url or os.environ.get("REDIS_URL") or os.environ.get("SAGUARO_REDIS_URL")
        if explicit:
            if redis_reachable(explicit):
                return explicit
            raise ConnectionError(f"Redis at {redact_url(explicit)} is not reachable; start it or unset the URL to use a private redis-server")
        if redis_reachable("redis://127.0.0.1:6379/0"):
            return "redis://127.0.0.1:6379/0"
        server = shutil.which("redis-server")
        if server is None:
            raise FileNotFoundError("no Redis is reachable and redis-server is not installed; install it or set REDIS_URL")
        port = free_port()
        logger.info("starting a private redis-server on port %d", port)
        self._redis_process = subprocess.Popen(
            [server, "--port", str(port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no"],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        url = f"redis://127.0.0.1:{port}/0"
        deadline = time.monotonic() + 10
        while not redis_reachable(url):
            if time.monotonic() > deadline:
                raise TimeoutError("the private redis-server did not start within 10 s")
            time.sleep(0.1)
        return url

    def start(self) -> None:
        unknown = sorted(set(self.replicas) - set(SERVICES))
        if unknown:
            raise ValueError(f"replicas contains unknown services {', '.join(unknown)}; valid services are {', '.join(SERVICES)}")
        for service in self.services:
            self.replica_count(service)
        self.log_dir.mkdir(parents=True, exist_ok=True)
        self.env = self._base_env()
        try:
            for service in self.services:
                count = self.replica_count(service)
                for index in range(1, count + 1):
                    self._start_replica(service, index, count)
            self.wait_ready()
        except BaseException:
            self.stop()
            raise

    def _base_env(self) -> dict[str, str]:
        base_env = dict(os.environ)
        base_env.update(self.env)
        base_env["SAGUARO_REDIS_URL"] = self._resolve_redis()
        self.redis_url = base_env["SAGUARO_REDIS_URL"]
        if not self.gateway_port:
            self.gateway_port = int(base_env.get("SAGUARO_GATEWAY_PORT", 0)) or free_port()
        base_env["SAGUARO_GATEWAY_PORT"] = str(self.gateway_port)
        verify_cpus, draft_cpus = default_cpu_split()
        base_env.setdefault("SAGUARO_VERIFY_CPUS", verify_cpus)
        base_env.setdefault("SAGUARO_DRAFT_CPUS", draft_cpus)
        base_env.setdefault("SAGUARO_DRAFT_BIND", f"tcp://127.0.0.1:{free_port()}")
        base_env.setdefault("SAGUARO_VERIFY_METRICS_PORT", str(free_port()))
        base_env.setdefault("SAGUARO_DRAFT_METRICS_PORT", str(free_port()))
        return base_env

    def _start_replica(self, service: str, index: int, count: int) -> str:
        name = replica_name(service, index)
        if name in self.processes:
            raise ValueError(f"a process named {name!r} already belongs to this stack")
        env = {**self.env, **replica_overrides(service, index, count, self.env)}
        self.replica_envs[name] = env
        self.processes[name] = self._spawn(name, service, env)
        return name

    def add_replica(self, service: str) -> str:
        """Start one more replica of ``service`` in the running stack, wait until it is ready and return its process name."""
        if service not in SERVICES:
            raise ValueError(f"unknown service {service!r}; expected one of {', '.join(SERVICES)}")
        if not self.redis_url:
            raise RuntimeError("the stack is not running; call start() first")
        index = sum(1 for name in self.processes if service_of(name) == service) + 1
        name = self._start_replica(service, index, max(index, 2))
        self.wait_ready([name])
        return name

    def _spawn(self, name: str, service: str, env: dict[str, str]) -> subprocess.Popen:
        log_path = self.log_dir / f"{name}.log"
        log = open(log_path, "ab")
        logger.info("starting %s (log: %s)", name, log_path)
        return subprocess.Popen(
            [sys.executable, "-m", f"services.{service}.main"],
            env=env,
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )

    def http_base_url(self, name: str) -> str:
        """Return the base URL of a process's HTTP server: the gateway API or the verify/draft health and metrics server."""
        service = service_of(name)
        env = self.replica_envs.get(name, self.env)
        if service == "gateway":
            return f"http://127.0.0.1:{env['SAGUARO_GATEWAY_PORT']}"
        return f"http://127.0.0.1:{env[f'SAGUARO_{service.upper()}_METRICS_PORT']}"

    def health_url(self, name: str) -> str:
        """Return the readiness URL of process ``name`` (a service name or a replica name like ``verify-2``)."""
        if service_of(name) == "gateway":
            return f"{self.http_base_url(name)}/health"
        return f"{self.http_base_url(name)}/health/ready"

    def metrics_url(self, name: str) -> str:
        return f"{self.http_base_url(name)}/metrics"

    def wait_ready(self, names: list[str] | None = None) -> None:
        """Wait until every process in ``names`` (by default all) returns 200 from its readiness URL."""
        deadline = time.monotonic() + self.start_timeout_s
        pending = list(self.processes) if names is None else list(names)
        while pending:
            for name in list(pending):
                process = self.processes[name]
                if process.poll() is not None:
                    tail = (self.log_dir / f"{name}.log").read_text(errors="replace")[-3000:]
                    raise RuntimeError(f"{name} exited with code {process.returncode} during start-up; last log lines:\n{tail}")
                try:
                    with urllib.request.urlopen(self.health_url(name), timeout=2) as response:
                        if response.status == 200:
                            pending.remove(name)
                            logger.info("%s is ready", name)
                except (urllib.error.URLError, ConnectionError, TimeoutError):
                    pass
            if pending and time.monotonic() > deadline:
                raise TimeoutError(f"services not ready after {self.start_timeout_s:.0f} s: {', '.join(pending)}; see {self.log_dir}")
            if pending:
                time.sleep(0.3)

    def stop(self) -> None:
        for name in reversed(list(self.processes)):
            process = self.processes[name]
            if process.poll() is None:
                process.send_signal(signal.SIGTERM)
        for name, process in self.processes.items():
            try:
                process.wait(timeout=15)
            except subprocess.TimeoutExpired:
                logger.warning("%s did not stop within 15 s; killing it", name)
                process.kill()
                process.wait()
        self.processes.clear()
        self.replica_envs.clear()
        if self._redis_process is not None:
            self._redis_process.terminate()
            self._redis_process.wait(timeout=10)
            self._redis_process = None
