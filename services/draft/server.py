"""Draft service: serves verify replicas over ZeroMQ and publishes the speculation cache to Redis."""

from __future__ import annotations

import logging
import threading
import time

import redis
import zmq

from services.draft.engine import DraftEngine
from shared import keys, metrics
from shared.protocol import (
    BuildCacheRequest,
    CacheEntry,
    CacheReady,
    DraftReply,
    DraftRequest,
    ErrorReply,
    PrefillRequest,
    ProtocolError,
    ReleaseRequest,
    decode,
    encode,
)

logger = logging.getLogger("saguaro.draft")

# A sequence no verify replica touched for this long is dropped; a verify
# replica that comes back for it gets ``unknown_request`` and prefills again.
IDLE_SEQUENCE_S = 300.0


class UnknownRequest(LookupError):
    pass


class DraftServer:
    def __init__(self, engine: DraftEngine, client: redis.Redis, namespace: str, bind: str):
        self.engine = engine
        self.redis = client
        self.namespace = namespace
        self.context = zmq.Context.instance()
        self.socket = self.context.socket(zmq.ROUTER)
        self.socket.setsockopt(zmq.LINGER, 0)
        self.socket.bind(bind)
        self.address = self.socket.getsockopt_string(zmq.LAST_ENDPOINT)
        self.stopped = threading.Event()
        logger.info("draft service listening on %s", self.address)

    def serve_forever(self) -> None:
        poller = zmq.Poller()
        poller.register(self.socket, zmq.POLLIN)
        while not self.stopped.is_set():
            if not poller.poll(500):
                self.evict_idle()
                continue
            identity, frame = self.socket.recv_multipart()
            reply = self.handle_frame(frame)
            if reply is not None:
                self.socket.send_multipart([identity, encode(reply)])
        self.socket.close()

    def handle_frame(self, frame: bytes):
        try:
            message = decode(frame)
        except ProtocolError as exc:
            logger.error("dropping invalid frame: %s", exc)
            return None
        request_id = getattr(message, "request_id", "")
        metrics.DRAFT_REQUESTS.labels(message.type).inc()
        try:
            return self.handle(message)
        except UnknownRequest as exc:
            logger.info("request %s: %s", request_id, exc, extra={"request_id": request_id})
            return ErrorReply(request_id=request_id, code="unknown_request", message=str(exc))
        except Exception as exc:  # one bad request must not stop the service
            logger.exception("request %s: %s failed", request_id, message.type, extra={"request_id": request_id})
            self.engine.release(request_id)
            return ErrorReply(request_id=request_id, code="internal", message=f"{type(exc).__name__}: {exc}")
        finally:
            metrics.DRAFT_SEQUENCES.set(len(self.engine.sequences))

    def handle(self, message):
        if isinstance(message, PrefillRequest):
            return self.prefill(message)
        if isinstance(message, DraftRequest):
            return self.draft(message)
        if isinstance(message, BuildCacheRequest):
            return self.build_cache(message)
        if isinstance(message, ReleaseRequest):
            seq = self.engine.sequences.get(message.request_id)
            if seq is not None and seq.published_keys:
                self.redis.delete(*seq.published_keys)
            self.engine.release(message.request_id)
            return None
        return ErrorReply(request_id=getattr(message, "request_id", ""), code="invalid", message=f"the draft service does not handle {message.type} messages")

    def _sequence(self, request_id: str, base_len: int):
        seq = self.engine.sequences.get(request_id)
        if seq is None:
            raise UnknownRequest("request not found: this draft replica has no state for it")
        if base_len > len(seq.ids):
            self.engine.release(request_id)
            raise UnknownRequest(f"invalid base_len {base_len}: this draft replica has only {len(seq.ids)} tokens of the request")
        return seq

    def prefill(self, message: PrefillRequest):
        started = time.perf_counter()
        self.engine.release(message.request_id)
        seq = self.engine.prefill(message.request_id, message.prompt_token_ids)
        seq.proposal = message.proposal
        if message.k == 0:
            return None
        tokens, proposals = self.engine.draft(seq, message.k)
        return DraftReply(request_id=message.request_id, step=message.step, tokens=tokens, proposals=proposals, elapsed_s=time.perf_counter() - started)

    def draft(self, message: DraftRequest) -> DraftReply:
        started = time.perf_counter()
        seq = self._sequence(message.request_id, message.base_len)
        seq.proposal = message.proposal
        self.engine.sync(seq, message.base_len, message.tokens)
        tokens, proposals = self.engine.draft(seq, message.k)
        self.drop_published(seq)
        return DraftReply(request_id=message.request_id, step=message.step, tokens=tokens, proposals=proposals, elapsed_s=time.perf_counter() - started)

    def build_cache(self, message: BuildCacheRequest) -> CacheReady:
        seq = self._sequence(message.request_id, message.base_len)
        seq.proposal = message.proposal
        build = self.engine.build_cache(seq, message.base_len, message.tokens, message.fanout, message.k, message.root_offset)
        started = time.perf_counter()
        ttl_ms = max(1, int(message.ttl_s * 1000))
        pipe = self.redis.pipeline(transaction=False)
        # A new step makes the previous step's entries unreachable: replace them.
        if seq.published_keys:
            pipe.delete(*seq.published_keys)
        seq.published_keys = []
        for branch in build.branches:
            key = keys.spec_entry(self.namespace, message.request_id, message.step, branch.accepted, branch.token)
            pipe.set(key, encode(CacheEntry(tokens=branch.tokens, proposals=branch.proposals)), px=ttl_ms)
            seq.published_keys.append(key)
        pipe.execute()
        publish_s = time.perf_counter() - started
        metrics.CACHE_ENTRIES.inc(len(build.branches))
        for phase, seconds in (("glue", build.glue_s), ("fork", build.fork_s), ("tree", build.tree_s), ("publish", publish_s)):
            metrics.CACHE_BUILD_TIME.labels(phase).observe(seconds)
        return CacheReady(
            request_id=message.request_id,
            step=message.step,
            num_entries=len(build.branches),
            glue_s=build.glue_s,
            fork_s=build.fork_s,
            tree_s=build.tree_s,
            publish_s=publish_s,
            candidates=build.candidates,
        )

    def drop_published(self, seq) -> None:
        if seq.published_keys:
            self.redis.delete(*seq.published_keys)
            seq.published_keys = []

    def evict_idle(self) -> None:
        cutoff = time.monotonic() - IDLE_SEQUENCE_S
        for request_id, seq in list(self.engine.sequences.items()):
            if seq.last_used < cutoff:
                logger.info("dropping idle sequence of request %s", request_id, extra={"request_id": request_id})
                self.drop_published(seq)
                self.engine.release(request_id)
        metrics.DRAFT_SEQUENCES.set(len(self.engine.sequences))
