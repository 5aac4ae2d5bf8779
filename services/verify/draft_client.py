"""Verify-side link to the draft replicas: discovery, assignment and ZeroMQ messaging."""

from __future__ import annotations

import logging
import random
import time
from collections import defaultdict
from typing import Callable

import redis
import zmq

from shared.protocol import ProtocolError, decode, encode
from shared.service import live_replicas

logger = logging.getLogger("saguaro.verify.draft")

REFRESH_S = 1.0


class DraftClient:
    """Sends messages to draft replicas and files their replies per request.

    One DEALER socket per draft address; replies are decoded on arrival and
    kept in a per-request inbox until a ``wait`` call takes them.
    """

    def __init__(self, client: redis.Redis, namespace: str, tokenizer_hash: str):
        self.redis = client
        self.namespace = namespace
        self.tokenizer_hash = tokenizer_hash
        self.context = zmq.Context.instance()
        self.sockets: dict[str, zmq.Socket] = {}
        self.poller = zmq.Poller()
        self.inbox: dict[str, list] = {}
        self.live: list[str] = []
        self.assigned: dict[str, int] = defaultdict(int)
        self._refreshed = 0.0
        # A random start keeps verify replicas that start together from picking the same draft in step.
        self._rotation = random.randrange(1 << 16)
        self._warned_hashes: set[str] = set()

    # -- discovery and assignment -------------------------------------------

    def refresh(self, force: bool = False) -> list[str]:
        if not force and time.monotonic() - self._refreshed < REFRESH_S:
            return self.live
        self._refreshed = time.monotonic()
        try:
            replicas = live_replicas(self.redis, self.namespace, "draft")
        except redis.RedisError as exc:
            logger.warning("cannot list draft replicas: %s", exc)
            return self.live
        live = []
        for info in replicas:
            if info.tokenizer_hash and info.tokenizer_hash != self.tokenizer_hash:
                if info.replica_id not in self._warned_hashes:
                    logger.error(
                        "ignoring draft replica %s at %s: its tokenizer differs from the target's (hash %s, expected %s)",
                        info.replica_id, info.address, info.tokenizer_hash[:12], self.tokenizer_hash[:12],
                    )
                    self._warned_hashes.add(info.replica_id)
                continue
            live.append(info.address)
        self.live = sorted(set(live))
        return self.live

    def assign(self) -> str | None:
        """Pick the live draft replica with the fewest requests from this verify replica.

        Ties rotate from one assignment to the next. Without the rotation a
        verify replica that runs one request at a time would send every
        request to the same draft, and so would every other verify replica.
        """
        live = self.refresh()
        if not live:
            live = self.refresh(force=True)
        if not live:
            return None
        fewest = min(self.assigned[a] for a in live)
        candidates = [a for a in live if self.assigned[a] == fewest]
        address = candidates[self._rotation % len(candidates)]
        self._rotation += 1
        self.assigned[address] += 1
        return address

    def unassign(self, address: str | None) -> None:
        if address is not None and self.assigned[address] > 0:
            self.assigned[address] -= 1

    # -- messaging -------------------------------------------------------------

    def _socket(self, address: str) -> zmq.Socket:
        sock = self.sockets.get(address)
        if sock is None:
            sock = self.context.socket(zmq.DEALER)
            sock.setsockopt(zmq.LINGER, 0)
            sock.setsockopt(zmq.SNDHWM, 10_000)
            sock.connect(address)
            self.sockets[address] = sock
            self.poller.register(sock, zmq.POLLIN)
        return sock

    def send(self, address: str, message) -> None:
        self._socket(address).send(encode(message))

    def _drain(self, timeout_ms: int) -> None:
        for sock, _ in self.poller.poll(timeout_ms):
            while True:
                try:
                    frame = sock.recv(zmq.NOBLOCK)
                except zmq.Again:
                    break
                try:
                    message = decode(frame)
                except ProtocolError as exc:
                    logger.error("dropping invalid frame from a draft replica: %s", exc)
                    continue
                messages = self.inbox.get(message.request_id)
                if messages is None:
                    continue  # a late reply for a request that has finished
                messages.append(message)

    def take(self, request_id: str, match: Callable[[object], bool]):
        """Return and remove the first message for ``request_id`` that ``match`` accepts, or None."""
        messages = self.inbox.get(request_id)
        if not messages:
            return None
        for index, message in enumerate(messages):
            if match(message):
                del messages[index]
                return message
        return None

    def wait(self, request_id: str, match: Callable[[object], bool], timeout_s: float):
        """Wait up to ``timeout_s`` for a message for ``request_id`` that ``match`` accepts."""
        deadline = time.monotonic() + timeout_s
        while True:
            found = self.take(request_id, match)
            if found is not None:
                return found
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                return None
            self._drain(max(1, int(remaining * 1000)))

    def track(self, request_id: str) -> None:
        """Start keeping replies for ``request_id``."""
        self.inbox.setdefault(request_id, [])

    def forget(self, request_id: str) -> None:
        self.inbox.pop(request_id, None)

    def close(self) -> None:
        for sock in self.sockets.values():
            sock.close()
        self.sockets.clear()
