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


@dataclass
class Stack:
    """Processes of one local deployment; use as a context manager or call ``start``/``stop``."""

    env: dict[str, str] = field(default_factory=dict)
    log_dir: Path = Path("logs")
    services: tuple[str, ...] = SERVICES
    start_timeout_s: float = 300.0
    redis_url: str | None = None
    gateway_port: int = 0
    processes: dict[str, subprocess.Popen] = field(default_factory=dict)
    _redis_process: subprocess.Popen | None = None

    def __enter__(self) -> "Stack":
        self.start()
        return self

    def __exit__(self, *exc) -> None:
        self.stop()

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.gateway_port}"

    def _resolve_redis(self) -> str:
        candidates = [self.redis_url, os.environ.get("REDIS_URL"), os.environ.get("SAGUARO_REDIS_URL"), "redis://127.0.0.1:6379/0"]
        for url in candidates:
            if url and redis_reachable(url):
                return url
        if self.redis_url or os.environ.get("REDIS_URL"):
            raise ConnectionError(f"Redis at {self.redis_url or os.environ['REDIS_URL']} is not reachable")
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
        self.log_dir.mkdir(parents=True, exist_ok=True)
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
        self.env = base_env
        try:
            for name in self.services:
                self.processes[name] = self._spawn(name, base_env)
            self.wait_ready()
        except BaseException:
            self.stop()
            raise

    def _spawn(self, name: str, env: dict[str, str]) -> subprocess.Popen:
        log_path = self.log_dir / f"{name}.log"
        log = open(log_path, "ab")
        logger.info("starting %s service (log: %s)", name, log_path)
        return subprocess.Popen(
            [sys.executable, "-m", f"services.{name}.main"],
            env=env,
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )

    def health_url(self, name: str) -> str:
        if name == "gateway":
            return f"{self.base_url}/health"
        port = self.env[f"SAGUARO_{name.upper()}_METRICS_PORT"]
        return f"http://127.0.0.1:{port}/health/ready"

    def wait_ready(self) -> None:
        deadline = time.monotonic() + self.start_timeout_s
        pending = list(self.services)
        while pending:
            for name in list(pending):
                process = self.processes[name]
                if process.poll() is not None:
                    tail = (self.log_dir / f"{name}.log").read_text(errors="replace")[-3000:]
                    raise RuntimeError(f"{name} service exited with code {process.returncode} during start-up; last log lines:\n{tail}")
                try:
                    with urllib.request.urlopen(self.health_url(name), timeout=2) as response:
                        if response.status == 200:
                            pending.remove(name)
                            logger.info("%s service is ready", name)
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
                logger.warning("%s service did not stop within 15 s; killing it", name)
                process.kill()
                process.wait()
        self.processes.clear()
        if self._redis_process is not None:
            self._redis_process.terminate()
            self._redis_process.wait(timeout=10)
            self._redis_process = None
