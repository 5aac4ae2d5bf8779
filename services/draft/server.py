"""Draft service: serves verify replicas over ZeroMQ and publishes the speculation cache to Redis."""

from __future__ import annotations

import logging
import threading
import time
from dataclasses import dataclass

import redis
import zmq

from services.draft.engine import BuildJob, CacheBuild, DraftEngine, DraftJob, DraftSequence
from shared import keys, metrics
from shared.protocol import (
    BuildCacheBatch,
    BuildCacheRequest,
    CacheEntry,
    CacheReady,
    DraftBatch,
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


@dataclass
class PendingPrefill:
    """A prompt the server prefills one chunk per loop turn, and the verify replica that waits for its reply."""

    identity: bytes
    message: PrefillRequest
    seq: DraftSequence
    started: float
    done_tokens: int = 0


class DraftServer:
    def __init__(self, engine: DraftEngine, client: redis.Redis, namespace: str, bind: str, prefill_chunk: int = 256):
        self.engine = engine
        # Prompts longer than this are prefilled in chunks of it, between the handling of other messages.
        self.prefill_chunk = prefill_chunk
        self.pending: dict[str, PendingPrefill] = {}
        self.redis = client
        self.namespace = namespace
        self.context = zmq.Context.instance()
        self.socket = self.context.socket(zmq.ROUTER)
        self.socket.setsockopt(zmq.LINGER, 0)
        self.socket.bind(bind)
        self.address = self.socket.getsockopt_string(zmq.LAST_ENDPOINT)
        self.stopped = threading.Event()
        # Set once the first cache build shared by several requests is logged.
        self.batching_logged = False
        logger.info("draft service listening on %s", self.address)

    def serve_forever(self) -> None:
        """Handle messages until stopped; long prompts advance one chunk after each message, or while none arrives."""
        poller = zmq.Poller()
        poller.register(self.socket, zmq.POLLIN)
        while not self.stopped.is_set():
            received = poller.poll(0 if self.pending else 500)
            if received:
                identity, frame = self.socket.recv_multipart()
                self.dispatch(identity, frame)
            if self.pending:
                self.advance_prefill()
            elif not received:
                self.evict_idle()
        self.socket.close()

    def send(self, identity: bytes, replies) -> None:
        if replies is None:
            return
        for reply in replies if isinstance(replies, list) else [replies]:
            self.socket.send_multipart([identity, encode(reply)])

    def dispatch(self, identity: bytes, frame: bytes) -> None:
        """Handle one frame from ``identity`` now, or queue a long prompt's prefill."""
        try:
            message = decode(frame)
        except ProtocolError as exc:
            logger.error("dropping invalid frame: %s", exc)
            return
        if isinstance(message, PrefillRequest) and len(message.prompt_token_ids) > self.prefill_chunk:
            self.queue_prefill(identity, message)
            return
        for request_id in self.request_ids(message):
            pending = self.pending.get(request_id)
            if pending is None:
                continue
            if isinstance(message, (ReleaseRequest, PrefillRequest)):
                # The new message replaces the prefill; the verifier no longer waits for its reply.
                del self.pending[request_id]
            else:
                # The message needs the whole prompt; finish it first, in order.
                while request_id in self.pending:
                    self.advance_prefill(request_id)
        self.send(identity, self.handle_message(message))

    def queue_prefill(self, identity: bytes, message: PrefillRequest) -> None:
        metrics.DRAFT_REQUESTS.labels(message.type).inc()
        request_id = message.request_id
        self.pending.pop(request_id, None)
        self.engine.release(request_id)
        seq = self.engine.start_prefill(request_id, message.prompt_token_ids)
        self.pending[request_id] = PendingPrefill(identity=identity, message=message, seq=seq, started=time.perf_counter())
        metrics.DRAFT_SEQUENCES.set(len(self.engine.sequences))

    def advance_prefill(self, request_id: str | None = None) -> None:
        """Prefill the next chunk of ``request_id``'s prompt (default: the oldest queued), and reply once it is complete."""
        pending = self.pending[request_id] if request_id is not None else next(iter(self.pending.values()))
        message = pending.message
        rid = message.request_id
        prompt = message.prompt_token_ids
        try:
            end = min(pending.done_tokens + self.prefill_chunk, len(prompt))
            self.engine.prefill_chunk(pending.seq, prompt[pending.done_tokens : end])
            pending.done_tokens = end
            if end < len(prompt):
                return
            del self.pending[rid]
            reply = self.finish_prefill(pending.seq, message, pending.started)
        except Exception as exc:  # one bad request must not stop the service
            logger.exception("request %s: prefill failed", rid, extra={"request_id": rid})
            self.pending.pop(rid, None)
            self.engine.release(rid)
            reply = ErrorReply(request_id=rid, code="internal", message=f"{type(exc).__name__}: {exc}")
        metrics.DRAFT_SEQUENCES.set(len(self.engine.sequences))
        self.send(pending.identity, reply)

    @staticmethod
    def request_ids(message) -> list[str]:
        if isinstance(message, (BuildCacheBatch, DraftBatch)):
            return [request.request_id for request in message.requests]
        return [getattr(message, "request_id", "")]

    def handle_frame(self, frame: bytes):
        """Decode and handle one frame; return its reply, a list of replies (``BuildCacheBatch``, ``DraftBatch``) or None."""
        try:
            message = decode(frame)
        except ProtocolError as exc:
            logger.error("dropping invalid frame: %s", exc)
            return None
        return self.handle_message(message)

    def handle_message(self, message):
        """Handle one decoded message; return its reply, a list of replies or None."""
        batched = isinstance(message, (BuildCacheBatch, DraftBatch))
        request_ids = self.request_ids(message)
        request_id = ",".join(request_ids)
        metrics.DRAFT_REQUESTS.labels(message.type).inc()
        try:
            return self.handle(message)
        except UnknownRequest as exc:
            logger.info("request %s: %s", request_id, exc, extra={"request_id": request_id})
            errors = [ErrorReply(request_id=rid, code="unknown_request", message=str(exc)) for rid in request_ids]
        except Exception as exc:  # one bad request must not stop the service
            logger.exception("request %s: %s failed", request_id, message.type, extra={"request_id": request_id})
            for rid in request_ids:
                self.engine.release(rid)
            errors = [ErrorReply(request_id=rid, code="internal", message=f"{type(exc).__name__}: {exc}") for rid in request_ids]
        finally:
            metrics.DRAFT_SEQUENCES.set(len(self.engine.sequences))
        return errors if batched else errors[0]

    def handle(self, message):
        if isinstance(message, PrefillRequest):
            return self.prefill(message)
        if isinstance(message, DraftRequest):
            return self.draft(message)
        if isinstance(message, BuildCacheRequest):
            return self.build_cache(message)
        if isinstance(message, BuildCacheBatch):
            return self.build_cache_batch(message)
        if isinstance(message, DraftBatch):
            return self.draft_batch(message)
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
        """Prefill a whole prompt now; ``serve_forever`` queues prompts longer than one chunk instead."""
        started = time.perf_counter()
        self.engine.release(message.request_id)
        seq = self.engine.prefill(message.request_id, message.prompt_token_ids)
        return self.finish_prefill(seq, message, started)

    def finish_prefill(self, seq: DraftSequence, message: PrefillRequest, started: float) -> DraftReply | None:
        """Return the first speculation of a prefilled request, or None when the verifier asked for none (k = 0)."""
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

    def draft_batch(self, message: DraftBatch) -> list[DraftReply | ErrorReply]:
        """Draft for all requests in shared forwards and return one reply per request, in order.

        A request that is unknown, has an invalid base_len or repeats an earlier
        request id gets its own ``ErrorReply``. The others are drafted together.
        """
        started = time.perf_counter()
        replies, valid = self._admit_batch(message.requests)

        requests = [message.requests[i] for i in valid]
        jobs = [DraftJob(seq=self.engine.sequences[r.request_id], base_len=r.base_len, tokens=r.tokens, k=r.k) for r in requests]
        try:
            drafts = self.engine.draft_batch(jobs) if jobs else []
            for job in jobs:
                self.drop_published(job.seq)
        except Exception as exc:  # fail the drafted requests, not the service
            joined = ",".join(r.request_id for r in requests)
            logger.exception("requests %s: batched draft failed", joined, extra={"request_id": joined})
            for index, request in zip(valid, requests):
                self.engine.release(request.request_id)
                replies[index] = ErrorReply(request_id=request.request_id, code="internal", message=f"{type(exc).__name__}: {exc}")
            return [replies[index] for index in range(len(message.requests))]
        elapsed = time.perf_counter() - started
        for index, request, (tokens, proposals) in zip(valid, requests, drafts):
            replies[index] = DraftReply(
                request_id=request.request_id, step=request.step, tokens=tokens, proposals=proposals, elapsed_s=elapsed, batch_size=len(jobs)
            )
        return [replies[index] for index in range(len(message.requests))]

    def _admit_batch(self, requests: list[DraftRequest] | list[BuildCacheRequest]) -> tuple[dict[int, ErrorReply], list[int]]:
        """Check every request of a batch message and set the proposal parameters of the valid ones.

        Returns the error replies by request index and the indices of the valid requests.
        """
        errors: dict[int, ErrorReply] = {}
        valid: list[int] = []
        for index, request in enumerate(requests):
            error = self._batch_error(request.request_id, request.base_len, requests[:index])
            if error is not None:
                errors[index] = error
                continue
            self.engine.sequences[request.request_id].proposal = request.proposal
            valid.append(index)
        return errors, valid

    def _batch_error(self, request_id: str, base_len: int, earlier) -> ErrorReply | None:
        """Return the error reply for one request of a batch message, or None if it can run."""
        if any(other.request_id == request_id for other in earlier):
            logger.error("request %s: repeated in one batch message, handling only its first occurrence", request_id, extra={"request_id": request_id})
            return ErrorReply(
                request_id=request_id,
                code="invalid",
                message=f"request {request_id} appears more than once in one batch message; send at most one per request",
            )
        try:
            self._sequence(request_id, base_len)
        except UnknownRequest as exc:
            logger.info("request %s: %s", request_id, exc, extra={"request_id": request_id})
            return ErrorReply(request_id=request_id, code="unknown_request", message=str(exc))
        return None

    def build_cache(self, message: BuildCacheRequest) -> CacheReady:
        seq = self._sequence(message.request_id, message.base_len)
        seq.proposal = message.proposal
        build = self.engine.build_cache(seq, message.base_len, message.tokens, message.fanout, message.k, message.root_offset)
        started = time.perf_counter()
        pipe = self.redis.pipeline(transaction=False)
        self._queue_entries(pipe, seq, message, build)
        pipe.execute()
        publish_s = time.perf_counter() - started
        self._observe_build(build, publish_s, len(build.branches))
        return self._cache_ready(message, build, publish_s, batch_size=1)

    def build_cache_batch(self, message: BuildCacheBatch) -> list[CacheReady | ErrorReply]:
        """Build the caches of all requests in shared forwards; return one reply per request, in order.

        A request that is unknown, has an invalid base_len or repeats an earlier
        request id gets its own ``ErrorReply``. The others are built in one
        ``build_cache_batch`` per distinct k, because the tree forwards need a common depth.
        """
        replies, valid = self._admit_batch(message.requests)
        groups: dict[int, list[int]] = {}  # k -> indices of the requests to build
        for index in valid:
            groups.setdefault(message.requests[index].k, []).append(index)

        for indices in groups.values():
            replies.update(self._build_group([message.requests[i] for i in indices], indices))
        return [replies[index] for index in range(len(message.requests))]

    def _build_group(self, requests: list[BuildCacheRequest], indices: list[int]) -> dict[int, CacheReady | ErrorReply]:
        """Build and publish the caches of ``requests``, which share k; return their replies keyed by ``indices``."""
        request_ids = [request.request_id for request in requests]
        sequences = [self.engine.sequences[request_id] for request_id in request_ids]
        jobs = [
            BuildJob(seq=seq, base_len=request.base_len, tokens=request.tokens, fanout=request.fanout, k=request.k, root_offset=request.root_offset)
            for seq, request in zip(sequences, requests)
        ]
        try:
            builds = self.engine.build_cache_batch(jobs)
            started = time.perf_counter()
            pipe = self.redis.pipeline(transaction=False)
            for seq, request, build in zip(sequences, requests, builds):
                self._queue_entries(pipe, seq, request, build)
            pipe.execute()
            publish_s = time.perf_counter() - started
        except Exception as exc:  # the failure of one group must not fail the other groups
            joined = ",".join(request_ids)
            logger.exception("requests %s: batched cache build failed", joined, extra={"request_id": joined})
            for request_id in request_ids:
                self.engine.release(request_id)
            error = f"{type(exc).__name__}: {exc}"
            return {index: ErrorReply(request_id=request_id, code="internal", message=error) for index, request_id in zip(indices, request_ids)}

        if len(jobs) > 1 and not self.batching_logged:
            self.batching_logged = True
            logger.info("built the speculation caches of %d requests in shared draft forwards (logged for the first batch only)", len(jobs))
        # Every build of the batch carries the batch's phase times: observe them once.
        self._observe_build(builds[0], publish_s, sum(len(build.branches) for build in builds))
        return {
            index: self._cache_ready(request, build, publish_s, batch_size=len(jobs))
            for index, request, build in zip(indices, requests, builds)
        }

    def _queue_entries(self, pipe, seq: DraftSequence, request: BuildCacheRequest, build: CacheBuild) -> None:
        """Queue on ``pipe`` the cache entries of ``build`` and the deletion of the previous step's entries."""
        ttl_ms = max(1, int(request.ttl_s * 1000))
        # A new step makes the previous step's entries unreachable: replace them.
        if seq.published_keys:
            pipe.delete(*seq.published_keys)
        seq.published_keys = []
        for branch in build.branches:
            key = keys.spec_entry(self.namespace, request.request_id, request.step, branch.accepted, branch.token)
            pipe.set(key, encode(CacheEntry(tokens=branch.tokens, proposals=branch.proposals)), px=ttl_ms)
            seq.published_keys.append(key)

    @staticmethod
    def _observe_build(build: CacheBuild, publish_s: float, num_entries: int) -> None:
        metrics.CACHE_ENTRIES.inc(num_entries)
        for phase, seconds in (("glue", build.glue_s), ("fork", build.fork_s), ("tree", build.tree_s), ("publish", publish_s)):
            metrics.CACHE_BUILD_TIME.labels(phase).observe(seconds)

    @staticmethod
    def _cache_ready(request: BuildCacheRequest, build: CacheBuild, publish_s: float, batch_size: int) -> CacheReady:
        return CacheReady(
            request_id=request.request_id,
            step=request.step,
            num_entries=len(build.branches),
            batch_size=batch_size,
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
