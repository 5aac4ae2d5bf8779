"""Redis side of the gateway: admission, submission, event streaming and cancellation.

One ``EngineClient`` per gateway process is shared by the REST and gRPC front
ends. For each engine request it

1. adds the request id to ``keys.inflight(ns)`` and XADDs the encoded
   ``GenerateRequest`` to ``keys.request_stream(ns)``, in one MULTI/EXEC
   transaction so the verify service can never remove the id before it was
   added;
2. reads ``keys.events(ns, rid)`` with XREAD BLOCK until a ``FinishEvent`` or
   an ``ErrorEvent`` arrives;
3. sets ``keys.cancel(ns, rid)`` when the reader stops early (client
   disconnect, error) or the deadline passes.

Each waiting reader holds one pooled Redis connection while it blocks, so the
pool grows to the number of concurrent engine requests (see ``EngineClient``
for its size).
"""

from __future__ import annotations

import asyncio
import inspect
import logging
import time
from collections.abc import AsyncIterator, Sequence
from contextlib import aclosing
from dataclasses import dataclass, field

import redis.asyncio as aioredis
from redis.exceptions import RedisError

from shared import keys
from shared.config import Settings
from shared.protocol import (
    DecodeStats,
    ErrorEvent,
    FinishEvent,
    GenerateRequest,
    ProtocolError,
    ReplicaInfo,
    TokenEvent,
    decode,
    encode,
)
from services.gateway.errors import EngineFailed, NotReady, Overloaded, RequestTimeout

logger = logging.getLogger("saguaro.gateway")

EngineEvent = TokenEvent | FinishEvent | ErrorEvent

OVERLOADED_RETRY_AFTER_S = 1
# Socket timeout of the gateway's Redis connections. Set here because the default differs between
# redis-py releases (none up to 5.x, 5 s in 8.2).
REDIS_SOCKET_TIMEOUT_S = 30.0
# Maximum time one blocking read of a request's events waits. A read blocking longer than the socket
# timeout would fail as a Redis error, so each read blocks for at most half of it.
EVENTS_BLOCK_S = 2.0
NOT_READY_RETRY_AFTER_S = keys.REPLICA_TTL_S


@dataclass(frozen=True)
class Readiness:
    """Alive replicas as seen in their Redis heartbeats, and what is missing for serving."""

    verify_replicas: list[str]
    verify_modes: dict[str, str]
    draft_replicas: list[str]
    missing: list[str]
    checked_at: float

    @property
    def ready(self) -> bool:
        return not self.missing

    def to_dict(self) -> dict:
        return {
            "ready": self.ready,
            "verify_replicas": self.verify_replicas,
            "verify_modes": self.verify_modes,
            "draft_replicas": self.draft_replicas,
            "missing": self.missing,
        }


@dataclass
class RequestTiming:
    """Monotonic timestamps of one engine request, for the latency metrics."""

    submitted_at: float = 0.0
    first_token_at: float | None = None
    last_token_at: float | None = None
    finished_at: float | None = None


@dataclass
class ChoiceResult:
    """Everything one engine request produced, accumulated from its events."""

    index: int
    request_id: str
    text_parts: list[str] = field(default_factory=list)
    token_ids: list[int] = field(default_factory=list)
    logprobs: list = field(default_factory=list)
    finish_reason: str | None = None
    stop_reason: str | int | None = None
    prompt_tokens: int = 0
    completion_tokens: int = 0
    stats: DecodeStats | None = None
    timing: RequestTiming = field(default_factory=RequestTiming)

    @property
    def text(self) -> str:
        return "".join(self.text_parts)

    def add(self, event: EngineEvent) -> None:
        if isinstance(event, TokenEvent):
            self.text_parts.append(event.text)
            self.token_ids.extend(event.token_ids)
            if event.logprobs:
                self.logprobs.extend(event.logprobs)
        elif isinstance(event, FinishEvent):
            self.finish_reason = event.finish_reason
            self.stop_reason = event.stop_reason
            self.prompt_tokens = event.usage.prompt_tokens
            self.completion_tokens = event.usage.completion_tokens
            self.stats = event.stats


def events_block_s(redis: aioredis.Redis) -> float:
    """Return how long one read of a request's events may block on ``redis``: EVENTS_BLOCK_S, or half its socket timeout if that is shorter."""
    pool = redis.connection_pool
    if "socket_timeout" in pool.connection_kwargs:
        socket_timeout = pool.connection_kwargs["socket_timeout"]
    else:
        # from_url leaves the timeout to the connection class's default.
        parameter = inspect.signature(pool.connection_class.__init__).parameters.get("socket_timeout")
        socket_timeout = None if parameter is None or parameter.default is inspect.Parameter.empty else parameter.default
    if socket_timeout is None:
        return EVENTS_BLOCK_S
    return min(EVENTS_BLOCK_S, socket_timeout / 2)


class EngineClient:
    """Submits ``GenerateRequest`` messages through Redis and streams their events back.

    ``readiness_cache_s`` is how long a readiness result is reused, which keeps
    the SCAN of heartbeat keys off the per-request path under load.
    """

    def __init__(
        self,
        settings: Settings,
        redis: aioredis.Redis | None = None,
        *,
        readiness_cache_s: float = 0.5,
    ) -> None:
        self.settings = settings
        self.namespace = settings.namespace
        if redis is None:
            # Every streamed engine request holds a connection while XREAD blocks, and redis-py's async
            # pool allows only 100 by default (redis-py 8.2). Admission overshoot and the short admission, submit and
            # cancel calls get the headroom above max_queue_depth.
            redis = aioredis.from_url(
                settings.redis_url,
                decode_responses=False,
                max_connections=2 * settings.max_queue_depth + 64,
                socket_timeout=REDIS_SOCKET_TIMEOUT_S,
            )
            self._owns_redis = True
        else:
            self._owns_redis = False
        self.redis = redis
        self.events_block_s = events_block_s(redis)
        self.readiness_cache_s = readiness_cache_s
        self._readiness: Readiness | None = None
        self._background: set[asyncio.Task] = set()

    async def close(self) -> None:
        """Wait for pending cancellations, then close the Redis connections this client opened."""
        if self._background:
            await asyncio.wait(set(self._background), timeout=5)
        if self._owns_redis:
            await self.redis.aclose()

    # Admission.

    async def readiness(self, *, use_cache: bool = True) -> Readiness:
        """Return which replicas are alive and what is missing. Results are cached for ``readiness_cache_s``."""
        now = time.monotonic()
        cached = self._readiness
        if use_cache and cached is not None and now - cached.checked_at < self.readiness_cache_s:
            return cached

        verify = await self._alive_replicas("verify")
        draft = await self._alive_replicas("draft")
        missing = []
        if not verify:
            missing.append(f"no verify replica has sent a heartbeat in the last {keys.REPLICA_TTL_S} s")
        elif not draft and not any(info.mode == "ar" for info in verify.values()):
            modes = sorted({info.mode or "unknown" for info in verify.values()})
            missing.append(
                f"verify replicas run mode {', '.join(modes)}, which needs a draft replica, "
                f"but no draft replica has sent a heartbeat in the last {keys.REPLICA_TTL_S} s"
            )
        result = Readiness(
            verify_replicas=sorted(verify),
            verify_modes={replica_id: info.mode for replica_id, info in sorted(verify.items())},
            draft_replicas=sorted(draft),
            missing=missing,
            checked_at=now,
        )
        self._readiness = result
        return result

    async def _alive_replicas(self, role: str) -> dict[str, ReplicaInfo]:
        names = [name async for name in self.redis.scan_iter(match=keys.replica_pattern(self.namespace, role), count=100)]
        if not names:
            return {}
        replicas = {}
        for name, value in zip(names, await self.redis.mget(names)):
            if value is None:  # expired between SCAN and MGET
                continue
            try:
                info = decode(value)
            except ProtocolError as exc:
                logger.warning("ignoring unreadable heartbeat at %s: %s", name, exc)
                continue
            if isinstance(info, ReplicaInfo):
                replicas[info.replica_id] = info
        return replicas

    async def queue_depth(self) -> int:
        """Return the number of admitted, unfinished engine requests (the size of the inflight set)."""
        return int(await self.redis.scard(keys.inflight(self.namespace)))

    async def check_admission(self, num_requests: int = 1) -> None:
        """Raise ``NotReady`` or ``Overloaded`` unless ``num_requests`` more engine requests can be queued.

        NOTE: the check and the later submission are separate Redis calls, so
        concurrent admissions can overshoot ``max_queue_depth`` by the number
        of requests admitted at the same moment.
        """
        try:
            readiness = await self.readiness()
            depth = await self.queue_depth()
        except RedisError as exc:
            logger.error("admission check failed because Redis is unreachable: %s", exc)
            raise NotReady(
                f"the gateway cannot reach Redis ({type(exc).__name__}); retry later",
                headers={"Retry-After": str(NOT_READY_RETRY_AFTER_S)},
            ) from exc
        if not readiness.ready:
            raise NotReady(
                "the service is not ready: " + "; ".join(readiness.missing) + ". Retry later.",
                headers={"Retry-After": str(NOT_READY_RETRY_AFTER_S)},
            )
        limit = self.settings.max_queue_depth
        if depth + num_requests > limit:
            raise Overloaded(
                f"the server is overloaded: {depth} requests are queued or running and the limit is {limit}. "
                f"Retry after {OVERLOADED_RETRY_AFTER_S} s.",
                headers={"Retry-After": str(OVERLOADED_RETRY_AFTER_S)},
            )

    # Submission and streaming.

    async def submit(self, request: GenerateRequest) -> None:
        """Add the request id to the inflight set and XADD the request, atomically."""
        async with self.redis.pipeline(transaction=True) as pipe:
            pipe.sadd(keys.inflight(self.namespace), request.request_id)
            pipe.xadd(
                keys.request_stream(self.namespace),
                {"msg": encode(request)},
                maxlen=keys.REQUEST_STREAM_MAXLEN,
                approximate=True,
            )
            await pipe.execute()

    async def stream(self, request: GenerateRequest, deadline: float) -> AsyncIterator[EngineEvent]:
        """Submit ``request`` and yield its events until the ``FinishEvent`` or ``ErrorEvent``, inclusive.

        ``deadline`` is a ``time.monotonic()`` value. When it passes, the request
        is cancelled and ``RequestTimeout`` is raised. When the consumer stops
        early (closes the generator or is cancelled) the request is cancelled
        too. Consume it inside ``contextlib.aclosing`` so that happens at once.
        """
        request_id = request.request_id
        finished = False
        try:
            try:
                await self.submit(request)
            except RedisError as exc:
                finished = True
                logger.error("submitting request %s failed: %s", request_id, exc)
                raise EngineFailed(f"submitting request {request_id} to Redis failed: {exc}") from exc
            async with aclosing(self._read_events(request_id, deadline)) as events:
                async for event in events:
                    if isinstance(event, (FinishEvent, ErrorEvent)):
                        finished = True
                    yield event
                    if finished:
                        return
        except RequestTimeout:
            finished = True
            logger.warning("request %s timed out after %.1f s; cancelling it", request_id, self.settings.request_timeout_s)
            # Verify may be gone, so the gateway also removes the id from the inflight set.
            self._spawn(self.cancel(request_id, remove_inflight=True))
            raise
        finally:
            if not finished:
                # Runs inside a cancelled task or scope, where an await would be cancelled at once,
                # so the cancellation is written from a separate task.
                self._spawn(self.cancel(request_id))

    async def _read_events(self, request_id: str, deadline: float) -> AsyncIterator[EngineEvent]:
        events_key = keys.events(self.namespace, request_id)
        last_id = b"0-0"
        while True:
            remaining_s = deadline - time.monotonic()
            if remaining_s <= 0:
                raise RequestTimeout(
                    f"request {request_id} timed out: it did not finish within {self.settings.request_timeout_s:g} s "
                    "(SAGUARO_REQUEST_TIMEOUT_S); lower max_tokens, or stream the response to receive tokens as they come",
                )
            try:
                block_s = min(remaining_s, self.events_block_s)
                reply = await self.redis.xread({events_key: last_id}, block=max(1, int(block_s * 1000)))
            except RedisError as exc:
                logger.error("reading events of request %s failed: %s", request_id, exc)
                raise EngineFailed(f"reading the events of request {request_id} from Redis failed: {exc}") from exc
            for _stream, entries in reply or []:
                for entry_id, fields in entries:
                    last_id = entry_id
                    yield self._decode_event(request_id, fields)

    @staticmethod
    def _decode_event(request_id: str, fields: dict) -> EngineEvent:
        try:
            event = decode(fields[b"msg"])
        except (KeyError, ProtocolError) as exc:
            logger.error("request %s: unreadable event: %s", request_id, exc)
            raise EngineFailed(f"the engine sent an unreadable event for request {request_id}") from exc
        if not isinstance(event, (TokenEvent, FinishEvent, ErrorEvent)):
            logger.error("request %s: unexpected %s message in the events stream", request_id, event.type)
            raise EngineFailed(f"the engine sent an unexpected {event.type} message for request {request_id}")
        return event

    async def stream_many(
        self, requests: Sequence[GenerateRequest], deadline: float
    ) -> AsyncIterator[tuple[int, EngineEvent]]:
        """Run several engine requests at once and yield ``(index, event)`` in arrival order.

        The first failure (timeout, engine failure) cancels the other requests
        and is raised.
        """
        if len(requests) == 1:
            async with aclosing(self.stream(requests[0], deadline)) as events:
                async for event in events:
                    yield 0, event
            return

        queue: asyncio.Queue = asyncio.Queue()
        done = object()

        async def pump(index: int, request: GenerateRequest) -> None:
            try:
                async with aclosing(self.stream(request, deadline)) as events:
                    async for event in events:
                        queue.put_nowait((index, event))
            except Exception as exc:  # handed to the consumer, which re-raises it
                queue.put_nowait((index, exc))
            finally:
                queue.put_nowait((index, done))

        tasks = [asyncio.create_task(pump(index, request)) for index, request in enumerate(requests)]
        running = len(tasks)
        try:
            while running:
                index, item = await queue.get()
                if item is done:
                    running -= 1
                elif isinstance(item, Exception):
                    raise item
                else:
                    yield index, item
        finally:
            for task in tasks:
                task.cancel()

    async def cancel(self, request_id: str, *, remove_inflight: bool = False) -> None:
        """Set the cancel key so verify aborts the request at its next step. Redis errors are logged, not raised."""
        try:
            async with self.redis.pipeline(transaction=False) as pipe:
                pipe.set(keys.cancel(self.namespace, request_id), "1", ex=keys.EVENTS_TTL_S)
                if remove_inflight:
                    pipe.srem(keys.inflight(self.namespace), request_id)
                await pipe.execute()
        except RedisError as exc:
            logger.error("cancelling request %s failed: %s", request_id, exc)
            return
        logger.info("request %s cancelled", request_id)

    def _spawn(self, coroutine) -> None:
        task = asyncio.get_running_loop().create_task(coroutine)
        self._background.add(task)
        task.add_done_callback(self._background.discard)
