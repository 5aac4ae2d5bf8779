"""The verify loop: admit requests, verify speculation, commit tokens, fetch the next speculation.

One step of a request, in SSD mode:
1. Tell the draft which speculation [r, s1..sK] is about to be verified
   (``BuildCacheRequest``), so it builds the cache for that step's outcomes
   while the target runs.
2. Verify: one target forward, exact acceptance, commit.
3. Stream the committed tokens to the request's events stream, and stop if finished.
4. Once the draft reports the cache ready, look up the speculation for the
   outcome (j, c) in Redis. On a miss, run a backup speculation (see
   ``services.verify.backup``).
SD mode replaces steps 1 and 4 by a plain draft request after each step, and
AR mode verifies no drafts at all.

Continuous batching: every step runs one target forward for all running
requests (up to ``max_num_seqs``), each with its own KV cache, positions and
sampling parameters (``shared.packing``). Requests join and leave between
steps. A new request's prompt is prefilled one chunk per loop turn, between
two decode steps, so the running requests keep streaming meanwhile. The
number of drafts each request verifies follows the batch size
(``services.verify.scheduler``). The draft builds the caches of all requests
of a step, or drafts for all of them (SD steps and JIT backups), in one
batched request per draft replica. In SSD mode each step picks its kind of
speculation (cache, JIT drafts or none) from the measured costs at the
current batch size.
"""

from __future__ import annotations

import logging
import threading
import time
import uuid
from dataclasses import dataclass, field

import redis

from services.verify.backup import BackupChooser, Ema, jit_cost_prior, ngram_propose
from services.verify.draft_client import DraftClient
from services.verify.engine import PrefillJob, TargetEngine, TargetSequence
from services.verify.output import OutputState
from services.verify.scheduler import STEP_KINDS, ForwardCost, best_num_drafts, choose_step_kind, expected_committed, step_rates
from shared import keys, metrics
from shared.config import Settings
from shared.service import live_replicas
from shared.fanout import AcceptanceEstimate, AdaptiveFanout, GeometricFanout, geometric_fanout
from shared.protocol import (
    BuildCacheBatch,
    BuildCacheRequest,
    CacheEntry,
    CacheReady,
    DecodeStats,
    DraftBatch,
    DraftReply,
    DraftRequest,
    ErrorEvent,
    ErrorReply,
    FinishEvent,
    GenerateRequest,
    PrefillRequest,
    Proposal,
    ProposalParams,
    ProtocolError,
    ReleaseRequest,
    TokenEvent,
    TokenLogprob,
    Usage,
    decode,
    encode,
)

logger = logging.getLogger("saguaro.verify")

# How often a verify replica looks for requests left by replicas that died, seconds.
RECLAIM_INTERVAL_S = 2.0
# Steps after which a request's fan-out follows its own statistics instead of the replica's.
REQUEST_FANOUT_MIN_STEPS = 32
# Cache hit rate assumed before any lookup. While steps of another kind run, no lookup measures the
# hit rate. So each such step moves the estimate this share of the way back to the prior (half the
# gap in about 35 steps), and cache steps are tried again once the prior makes them look faster.
HIT_RATE_PRIOR = 0.75
HIT_RATE_RELAX = 0.02


@dataclass
class ActiveRequest:
    request: GenerateRequest
    message_id: bytes
    seq: TargetSequence
    output: OutputState
    stats: DecodeStats
    admitted_at: float
    draft_address: str | None = None
    # Committed tokens the draft is known to hold, counted from the start.
    draft_anchor: int = 0
    step: int = 0
    drafts: list[int] = field(default_factory=list)
    # The q each draft was sampled from, under rejection acceptance; [] means one-hot drafts.
    proposals: list[Proposal] = field(default_factory=list)
    cache_pending: bool = False
    first_token_at: float | None = None
    # Kind of the backup whose speculation the next step verifies, if any.
    pending_backup: str | None = None
    # This request's own fan-out statistics, for speculations that came from the cache.
    fanout: AdaptiveFanout | GeometricFanout | None = None
    # Where the speculation behind the pending cache build came from: "hit" (the cache) or "miss" (a backup).
    cache_source: str = "hit"
    # Drafts accepted in the latest step.
    accepted: int = 0
    # Step number of a draft reply sent for but not yet received.
    awaiting_draft: int | None = None

    @property
    def request_id(self) -> str:
        return self.request.request_id

    def committed(self) -> list[int]:
        return self.seq.ids + [self.seq.root]


@dataclass
class PendingPrefill:
    """An admitted request whose prompt the target is still prefilling, chunk by chunk."""

    request: GenerateRequest
    message_id: bytes
    job: PrefillJob
    # Output streamed before a takeover, prefilled after the prompt.
    generated: list[int]
    sent_text: str
    admitted_at: float
    draft_address: str | None


class VerifyWorker:
    def __init__(self, settings: Settings, engine: TargetEngine, tokenizer, eos_ids: set[int], client: redis.Redis, drafts: DraftClient | None, replica_id: str):
        self.settings = settings
        self.engine = engine
        self.tokenizer = tokenizer
        self.eos_ids = eos_ids
        self.redis = client
        self.drafts = drafts
        self.replica_id = replica_id
        self.ns = settings.namespace
        self.k = settings.num_speculative_tokens
        self.active: list[ActiveRequest] = []
        # Admitted requests in prefill, oldest first.
        self.prefilling: list[PendingPrefill] = []
        self.stopped = threading.Event()
        self.acceptance = AcceptanceEstimate(settings.fanout_acceptance_rate)
        # Separate fan-out statistics after a hit and after a miss: a backup speculation is often
        # weaker, so the next step's acceptance lengths are shorter.
        self.fanout_policies = {source: self.new_fanout_policy() for source in ("hit", "miss")}
        # Above the engine's largest invariant row count a decode forward reads the weights once per chunk.
        rows = getattr(engine, "rows", None)
        self.forward_cost = ForwardCost(chunk_tokens=rows.high if rows is not None else None)
        # Draft cache-build time of one step against the batch size. The prior makes a build for b requests
        # cost (1 + b) / 2 times one request's, as measured with the int8 Qwen2.5-Coder-0.5B draft on one
        # core (8 requests took 4.5 times one). Measurements at several batch sizes replace it.
        self.build_cost = ForwardCost(per_token_ratio=1.0)
        # Time of a step's batched JIT draft against the requests in it. The backup chooser shares this fit.
        self.jit_cost = jit_cost_prior()
        self.backups = BackupChooser(jit_cost=self.jit_cost)
        # Share of cache lookups that hit, recent ones weighing most.
        self.hit_rate = Ema(HIT_RATE_PRIOR, weight=0.05)
        self.draft_limit = self.k
        # How steps get their speculation: SSD caches, JIT drafts, or none (see ``services.verify.scheduler``).
        self.step_kind = {"ssd": "cache", "sd": "jit"}.get(settings.mode, "plain")
        if settings.mode != "ar" and settings.step_kind != "auto":
            self.step_kind = settings.step_kind
        # Draft requests of this step, per draft address, sent together by ``send_drafts``.
        self._outgoing: dict[str, list[DraftRequest]] = {}
        self._logged_fanout: list[int] = []
        self._fanout_logged_at = 0.0
        self.stream = keys.request_stream(self.ns)
        self._reclaimed_at = 0.0
        self.ensure_group()

    def new_fanout_policy(self) -> AdaptiveFanout | GeometricFanout:
        s = self.settings
        policy = AdaptiveFanout if s.fanout_policy == "adaptive" else GeometricFanout
        return policy(self.k, s.fanout_budget, s.fanout_acceptance_rate, s.fanout_miss_exponent)

    # -- admission ---------------------------------------------------------------

    def ensure_group(self) -> None:
        try:
            self.redis.xgroup_create(self.stream, keys.REQUEST_GROUP, id="0", mkstream=True)
        except redis.ResponseError as exc:
            if "BUSYGROUP" not in str(exc):
                raise

    def admit(self) -> None:
        free = self.settings.max_num_seqs - len(self.active) - len(self.prefilling)
        if free <= 0:
            return
        block_ms = None if self.active or self.prefilling else 500
        try:
            batches = self.redis.xreadgroup(keys.REQUEST_GROUP, self.replica_id, {self.stream: ">"}, count=free, block=block_ms)
        except redis.ResponseError as exc:
            if "NOGROUP" in str(exc):
                self.ensure_group()
                return
            raise
        for _, entries in batches or []:
            for message_id, fields in entries:
                self.start(message_id, fields)

    def start(self, message_id: bytes, fields: dict, resume: bool = False) -> None:
        try:
            request = decode(fields[b"msg"])
            if not isinstance(request, GenerateRequest):
                raise ProtocolError(f"expected a generate message, got {request.type}")
        except (KeyError, ProtocolError) as exc:
            logger.error("dropping invalid request stream entry %s: %s", message_id, exc)
            self.redis.xack(self.stream, keys.REQUEST_GROUP, message_id)
            return
        rid = request.request_id
        prompt_len = len(request.prompt_token_ids)
        if prompt_len >= self.settings.max_model_len:
            self.fail(rid, message_id, f"prompt has {prompt_len} tokens; the maximum context is {self.settings.max_model_len}", "invalid_request")
            return
        generated: list[int] = []
        sent_text = ""
        if resume:
            progress = self.read_progress(rid)
            if progress is None:
                logger.info("request %s had already finished; acknowledging it", rid, extra={"request_id": rid})
                self.redis.xack(self.stream, keys.REQUEST_GROUP, message_id)
                return
            generated, sent_text = progress
        logger.info(
            "request %s admitted: %d prompt tokens, max_tokens %d, %d tokens already generated",
            rid, prompt_len, request.sampling.max_tokens, len(generated), extra={"request_id": rid},
        )
        self.begin(request, message_id, generated, sent_text)

    def read_progress(self, rid: str) -> tuple[list[int], str] | None:
        """Return the tokens and text a request already streamed, or None if it has finished."""
        tokens: list[int] = []
        text = ""
        for _, fields in self.redis.xrange(keys.events(self.ns, rid)):
            event = decode(fields[b"msg"])
            if isinstance(event, (FinishEvent, ErrorEvent)):
                return None
            tokens.extend(event.token_ids)
            text += event.text
        return tokens, text

    def begin(self, request: GenerateRequest, message_id: bytes, generated: list[int], sent_text: str) -> None:
        """Queue the prefill of the prompt plus any tokens generated before a takeover, and start the draft's prefill."""
        rid = request.request_id
        prompt_len = len(request.prompt_token_ids)
        context = request.prompt_token_ids + generated
        admitted_at = time.time()

        draft_address = None
        if self.settings.mode != "ar" and self.drafts is not None:
            draft_address = self.drafts.assign()
            if draft_address is None:
                logger.warning("request %s: no draft replica is alive; decoding without speculation", rid, extra={"request_id": rid})
            else:
                self.drafts.track(rid)
                proposal = self.proposal_params(request.sampling, list(self.settings.fanout) or None)
                self.drafts.send(draft_address, PrefillRequest(request_id=rid, prompt_token_ids=context, k=self.k, proposal=proposal))

        state_key = keys.state(self.ns, rid)
        pipe = self.redis.pipeline(transaction=False)
        pipe.hset(state_key, mapping={"status": "running", "verify": self.replica_id, "draft": draft_address or ""})
        pipe.expire(state_key, keys.EVENTS_TTL_S)
        pipe.execute()
        job = self.engine.start_prefill(rid, context, prompt_len=prompt_len if generated else None)
        self.prefilling.append(PendingPrefill(request, message_id, job, generated, sent_text, admitted_at, draft_address))
        metrics.REQUESTS_PREFILLING.set(len(self.prefilling))

    def advance_prefill(self) -> None:
        """Run the next chunk of the oldest queued prefill, and start decoding its request once the prompt is done.

        The loop runs one chunk between two decode steps, so a long prompt delays
        the running requests' next step by one chunk's forward, not by its whole prefill.
        """
        if not self.prefilling:
            return
        pending = self.prefilling[0]
        rid = pending.request.request_id
        try:
            if self.redis.exists(keys.cancel(self.ns, rid)):
                self.prefilling.pop(0)
                logger.info(
                    "request %s cancelled by the client during prefill, %d of %d tokens prefilled",
                    rid, pending.job.prefilled_tokens, len(pending.job.body), extra={"request_id": rid},
                )
                self.finish(self.activate(pending), "abort", None)
                return
            done = self.engine.run_prefill_chunk(pending.job)
        except redis.ConnectionError:
            raise
        except Exception as exc:
            self.prefilling.pop(0)
            metrics.REQUESTS_PREFILLING.set(len(self.prefilling))
            logger.exception("request %s: prefill failed", rid, extra={"request_id": rid})
            self.fail(rid, pending.message_id, f"prefill failed: {type(exc).__name__}: {exc}", "internal_error")
            self.release_draft(rid, pending.draft_address)
            return
        if not done:
            return
        self.prefilling.pop(0)
        metrics.PROMPT_TOKENS.inc(len(pending.request.prompt_token_ids))
        active = self.activate(pending)
        if active.draft_address is not None:
            active.drafts = self.await_draft(active, 0)
        self.active.append(active)
        metrics.REQUESTS_RUNNING.set(len(self.active))

    def activate(self, pending: PendingPrefill) -> ActiveRequest:
        """Return the decoding state of a request whose prefill ended or was cancelled."""
        metrics.REQUESTS_PREFILLING.set(len(self.prefilling))
        request, generated = pending.request, pending.generated
        prompt_len = len(request.prompt_token_ids)
        output = OutputState(self.tokenizer, request.sampling, self.eos_ids, prompt_len, self.settings.max_model_len)
        if generated:
            # Streamed tokens are committed already; the last one is the root of the next step.
            output.token_ids = list(generated)
            output.text = self.tokenizer.decode(output.token_ids, skip_special_tokens=True)
            output.sent_chars = len(pending.sent_text)
        active = ActiveRequest(
            request=request,
            message_id=pending.message_id,
            seq=pending.job.seq,
            output=output,
            stats=DecodeStats(mode=self.settings.mode, accepted_per_pos=[0] * self.k),
            admitted_at=pending.admitted_at,
            draft_address=pending.draft_address,
            draft_anchor=prompt_len + len(generated) - 1,
            fanout=self.new_fanout_policy(),
        )
        if generated:
            active.first_token_at = pending.admitted_at
        return active

    def reclaim_orphans(self) -> None:
        """Take over requests whose verify replica stopped heartbeating before it finished them.

        The new owner prefills the prompt plus the tokens already streamed and
        continues from there, so the client sees no repeated and no lost tokens.
        """
        if time.monotonic() - self._reclaimed_at < RECLAIM_INTERVAL_S:
            return
        self._reclaimed_at = time.monotonic()
        free = self.settings.max_num_seqs - len(self.active) - len(self.prefilling)
        if free <= 0:
            return
        pending = self.redis.xpending_range(self.stream, keys.REQUEST_GROUP, min="-", max="+", count=100)
        if not pending:
            return
        live = {info.replica_id for info in live_replicas(self.redis, self.ns, "verify")}
        idle_ms = keys.REPLICA_TTL_S * 1000
        for entry in pending:
            consumer = entry["consumer"].decode() if isinstance(entry["consumer"], bytes) else entry["consumer"]
            if consumer in live or consumer == self.replica_id or entry["time_since_delivered"] < idle_ms:
                continue
            claimed = self.redis.xclaim(self.stream, keys.REQUEST_GROUP, self.replica_id, min_idle_time=idle_ms, message_ids=[entry["message_id"]])
            for message_id, fields in claimed:
                if not fields:
                    self.redis.xack(self.stream, keys.REQUEST_GROUP, message_id)
                    continue
                logger.warning("taking over request stream entry %s from verify replica %s, which is gone", message_id, consumer)
                self.start(message_id, fields, resume=True)
                free -= 1
            if free <= 0:
                return

    # -- the loop ------------------------------------------------------------------

    def run(self) -> None:
        logger.info("verify loop running in %s mode, K=%d", self.settings.mode, self.k)
        while not self.stopped.is_set():
            try:
                self.reclaim_orphans()
                self.admit()
                self.advance_prefill()
                self.step_batch()
            except redis.ConnectionError as exc:
                logger.error("lost Redis: %s; retrying in 1 s", exc)
                time.sleep(1.0)
        for active in list(self.active):
            self.hand_off(active)
        for pending in self.prefilling:
            logger.info("request %s left in prefill for another verify replica", pending.request.request_id, extra={"request_id": pending.request.request_id})
            self.release_draft(pending.request.request_id, pending.draft_address)
        self.prefilling.clear()
        metrics.REQUESTS_PREFILLING.set(0)

    def fail_active(self, active: ActiveRequest, exc: Exception) -> None:
        """Fail one request after an error in its step; the others keep running."""
        rid = active.request_id
        logger.error("request %s failed at step %d: %s: %s", rid, active.step, type(exc).__name__, exc, exc_info=exc, extra={"request_id": rid})
        self.remove(active)
        self.fail(rid, active.message_id, f"decoding failed: {type(exc).__name__}: {exc}", "internal_error")
        self.release_draft(rid, active.draft_address)

    def step_batch(self) -> None:
        """Run one verification step for every running request: one target forward, then commit and speculate per request."""
        batch: list[ActiveRequest] = []
        for active in list(self.active):
            rid = active.request_id
            if self.redis.exists(keys.cancel(self.ns, rid)):
                logger.info("request %s cancelled by the client", rid, extra={"request_id": rid})
                self.finish(active, "abort", None)
                continue
            batch.append(active)
        if not batch:
            return

        metrics.BATCH_SIZE.observe(len(batch))
        self.update_draft_limit(len(batch))
        metrics.VERIFY_STEPS.labels(self.step_kind).inc()
        for active in batch:
            self.trim_drafts(active)
        if self.settings.mode == "ssd" and self.step_kind == "cache":
            self.request_caches([active for active in batch if active.draft_address is not None])

        started = time.perf_counter()
        try:
            logits = self.engine.forward_batch([active.seq for active in batch], [[active.seq.root] + active.drafts for active in batch])
        except Exception as exc:  # a failed forward fails its requests, not the replica
            for active in batch:
                self.fail_active(active, exc)
            return
        verify_s = time.perf_counter() - started
        self.forward_cost.observe(sum(len(active.drafts) + 1 for active in batch), verify_s)

        running = []
        for active, rows in zip(batch, logits):
            try:
                if self.commit_step(active, rows, verify_s):
                    running.append(active)
            except Exception as exc:  # one failing request must not stop the others
                self.fail_active(active, exc)
        self.speculate(running)

    def update_draft_limit(self, batch_size: int) -> None:
        """Set how many drafts each request verifies this step, from the batch size and measured costs."""
        if self.settings.mode == "ar" or not self.settings.speculation_backoff:
            return
        limit = best_num_drafts(batch_size, self.k, self.acceptance.rate, self.forward_cost, current=self.draft_limit)
        self.seed_draft_costs()
        if self.settings.mode == "ssd" and self.step_kind != "cache":
            self.hit_rate.value += HIT_RATE_RELAX * (HIT_RATE_PRIOR - self.hit_rate.value)
        kinds = STEP_KINDS if self.settings.mode == "ssd" else ("jit", "plain")
        backup = None if self.settings.backup == "auto" else self.settings.backup
        miss_tokens, miss_stall_s = self.backups.miss_outcome(batch_size, expected_committed(self.acceptance.rate, limit), backup)
        rates = step_rates(
            batch_size, limit, self.acceptance.rate, self.hit_rate.value, self.forward_cost, self.build_cost, self.jit_cost, kinds, miss_tokens, miss_stall_s
        )
        kind = choose_step_kind(rates, self.step_kind) if self.settings.step_kind == "auto" else self.settings.step_kind
        if kind != self.step_kind:
            logger.info(
                "speculation now %s at batch size %d: predicted %s tokens/s; cache build %.0f ms, JIT draft %.0f ms, %d-token forward %.0f ms",
                kind, batch_size, ", ".join(f"{name} {rate:.1f}" for name, rate in rates.items()),
                1000 * self.build_cost.predict(batch_size), 1000 * self.jit_cost.predict(batch_size),
                batch_size * (limit + 1), 1000 * self.forward_cost.predict(batch_size * (limit + 1)),
            )
            self.step_kind = kind
        for name in STEP_KINDS:
            metrics.STEP_KIND.labels(name).set(1.0 if name == kind else 0.0)
        if kind == "plain":
            limit = 0
        if limit != self.draft_limit:
            base, per_token = self.forward_cost.coefficients()
            logger.info(
                "drafts per request now %d at batch size %d (acceptance rate %.2f, forward %.0f ms + %.1f ms per token)",
                limit, batch_size, self.acceptance.rate, base * 1000, per_token * 1000,
            )
            self.draft_limit = limit
        metrics.DRAFT_LIMIT.set(limit)

    def seed_draft_costs(self) -> None:
        """Until the draft's times are measured, predict a cache build or JIT draft for one request to take one verification.

        That is the design point of SSD: a build that fits inside the verification.
        """
        one_request = self.forward_cost.predict(self.k + 1)
        for cost in (self.build_cost, self.jit_cost):
            if cost.weight == 0.0:
                cost.default_s = one_request

    def trim_drafts(self, active: ActiveRequest) -> None:
        output = active.output
        remaining = min(active.request.sampling.max_tokens - len(output.token_ids), self.settings.max_model_len - output.prompt_len - len(output.token_ids))
        # A step commits at most len(drafts) + 1 tokens; drafts past the limit would be cut anyway.
        keep = min(self.draft_limit, max(0, remaining - 1))
        if len(active.drafts) > keep:
            active.drafts = active.drafts[:keep]
            active.proposals = active.proposals[:keep]

    def commit_step(self, active: ActiveRequest, logits, verify_s: float) -> bool:
        """Accept and commit one request's tokens from its rows of the batch forward; return whether it keeps running."""
        drafts = active.drafts
        proposals = active.proposals if self.settings.acceptance == "rejection" else None
        result = self.engine.accept(active.seq, drafts, logits, active.request.sampling, proposals)
        active.accepted = result.accepted
        self.record_step(active, len(drafts), result.accepted, verify_s)
        self.backups.observe_verify(verify_s)
        if active.pending_backup is not None:
            self.backups.observe_tokens(active.pending_backup, len(result.committed))
            metrics.BACKUP_TOKENS.labels(active.pending_backup).inc(len(result.committed))
            active.pending_backup = None

        finished = False
        committed: list[int] = []
        for token in result.committed:
            committed.append(token)
            if active.output.append(token):
                finished = True
                break
        if active.first_token_at is None:
            active.first_token_at = time.time()
            active.stats = active.stats.model_copy(update={"ttft_s": active.first_token_at - active.admitted_at, "first_step_tokens": len(committed)})
            metrics.TIME_TO_FIRST_TOKEN.observe(active.stats.ttft_s)
        metrics.GENERATION_TOKENS.inc(len(committed))
        self.emit(active, committed, result.logprobs[: len(committed)] if result.logprobs else None)
        active.step += 1
        if finished:
            finish = active.output.finish
            self.finish(active, finish.reason, finish.stop_reason)
            return False
        return True

    def speculate(self, batch: list[ActiveRequest]) -> None:
        """Get every request's speculation for the next step; draft requests go out first and are awaited together."""
        for active in batch:
            try:
                active.drafts = self.next_speculation(active, active.accepted)
            except Exception as exc:
                self.fail_active(active, exc)
        requested = self.send_drafts()
        started = time.perf_counter()
        all_replied = True
        for active in batch:
            if active.awaiting_draft is None or active not in self.active:
                continue
            try:
                step = active.awaiting_draft
                active.awaiting_draft = None
                active.drafts = self.await_draft(active, step)
                # await_draft drops the draft replica of a request whose reply failed or timed out.
                all_replied = all_replied and active.draft_address is not None
            except Exception as exc:
                all_replied = False
                self.fail_active(active, exc)
        # A draft reply that failed or timed out measures no drafting time, and would skew the fit for long.
        if requested and all_replied:
            self.jit_cost.observe(requested, time.perf_counter() - started)

    def send_drafts(self) -> int:
        """Send the step's draft requests, one message per draft replica, and return the largest number sent to one replica."""
        outgoing, self._outgoing = self._outgoing, {}
        for address, requests in outgoing.items():
            self.drafts.send(address, requests[0] if len(requests) == 1 else DraftBatch(requests=requests))
        return max((len(requests) for requests in outgoing.values()), default=0)

    def record_step(self, active: ActiveRequest, drafted: int, accepted: int, verify_s: float) -> None:
        stats = active.stats
        per_pos = list(stats.accepted_per_pos)
        for position in range(accepted):
            per_pos[position] += 1
            metrics.NUM_ACCEPTED_PER_POS.labels(str(position)).inc()
        active.stats = stats.model_copy(
            update={
                "steps": stats.steps + 1,
                "accepted_per_pos": per_pos,
                "drafted_tokens": stats.drafted_tokens + drafted,
                "accepted_tokens": stats.accepted_tokens + accepted,
                "verify_s": stats.verify_s + verify_s,
            }
        )
        metrics.VERIFY_TIME.observe(verify_s)
        if drafted:
            metrics.NUM_DRAFTS.inc()
            metrics.NUM_DRAFT_TOKENS.inc(drafted)
            metrics.NUM_ACCEPTED_TOKENS.inc(accepted)
            self.acceptance.observe(accepted, drafted)
            if drafted == self.k:
                source = "miss" if active.pending_backup is not None else "hit"
                self.fanout_policies[source].observe_outcome(accepted)
                if source == "hit":
                    active.fanout.observe_outcome(accepted)

    # -- speculation ----------------------------------------------------------------

    def fanout(self, active: ActiveRequest, num_drafts: int) -> list[int]:
        if num_drafts != self.k:
            # A backup speculation shorter than K: spread the budget by the geometric rule.
            return geometric_fanout(num_drafts, self.settings.fanout_budget, self.acceptance.rate, self.settings.fanout_miss_exponent)
        if self.settings.fanout:
            return list(self.settings.fanout)
        policy = self.fanout_policies[active.cache_source]
        if active.cache_source == "hit" and active.stats.steps >= REQUEST_FANOUT_MIN_STEPS:
            policy = active.fanout
        lists = policy.allocation()
        if lists != self._logged_fanout and time.monotonic() - self._fanout_logged_at > 30.0:
            logger.info("fan-out per acceptance length now %s (%s policy; %s)", lists, self.settings.fanout_policy, policy.describe())
            self._logged_fanout = lists
            self._fanout_logged_at = time.monotonic()
        return lists

    def proposal_params(self, sampling, top_f: list[int] | None) -> ProposalParams | None:
        """Return how the draft samples for a request, or None when it drafts the argmax (coupled test or T = 0).

        NOTE: with C < 1 the draft's q depends on ``top_f``, which follows the
        adaptive fan-out, and the backup chosen per step changes q too. So a
        seeded request repeats its output only with a fixed ``fanout`` and
        ``backup``. The output distribution is exact either way.
        """
        if self.settings.acceptance != "rejection" or sampling.temperature == 0.0:
            return None
        if top_f is None:
            top_f = list(self.settings.fanout) or geometric_fanout(self.k, self.settings.fanout_budget, self.acceptance.rate, self.settings.fanout_miss_exponent)
        return ProposalParams(
            temperature=sampling.temperature,
            top_k=sampling.top_k,
            top_p=sampling.top_p,
            seed=sampling.seed,
            # C only pays where a cache contains the top tokens.
            saguaro_c=self.settings.saguaro_c if self.settings.mode == "ssd" else 1.0,
            top_f=top_f,
            support=self.settings.proposal_support,
        )

    def _tail(self, active: ActiveRequest) -> tuple[int, list[int]]:
        """Return (base_len, tokens): the committed tokens the draft may lack, ending with the root."""
        committed = active.committed()
        base = min(active.draft_anchor, len(committed) - 1)
        return base, committed[base:]

    def request_caches(self, batch: list[ActiveRequest]) -> None:
        """Send the cache builds of a step, one message per draft replica."""
        by_address: dict[str, list[BuildCacheRequest]] = {}
        for active in batch:
            by_address.setdefault(active.draft_address, []).append(self.cache_request(active))
        for address, requests in by_address.items():
            message = requests[0] if len(requests) == 1 else BuildCacheBatch(requests=requests)
            self.drafts.send(address, message)

    def cache_request(self, active: ActiveRequest) -> BuildCacheRequest:
        base, tail = self._tail(active)
        active.cache_source = "miss" if active.pending_backup is not None else "hit"
        fanout = self.fanout(active, len(active.drafts))
        message = BuildCacheRequest(
            request_id=active.request_id,
            step=active.step,
            base_len=base,
            tokens=tail + active.drafts,
            root_offset=len(tail) - 1,
            fanout=fanout,
            k=self.k,
            ttl_s=self.settings.cache_ttl_s,
            # The branches' tokens are the next step's drafts: reshape q by the fan-out that caches their outcomes.
            proposal=self.proposal_params(active.request.sampling, fanout if len(fanout) == self.k + 1 else None),
        )
        active.draft_anchor = len(active.seq.ids)
        active.cache_pending = True
        return message

    def next_speculation(self, active: ActiveRequest, accepted: int) -> list[int]:
        mode = self.settings.mode
        if mode == "ar" or self.step_kind == "plain":
            return []
        if active.draft_address is None:
            return self.reattach_draft(active)
        if mode == "ssd" and active.cache_pending:
            active.cache_pending = False
            hit = self.lookup_cache(active, accepted)
            if hit is not None:
                return hit
            if active.draft_address is not None:
                return self.run_backup(active)
            return self.reattach_draft(active)
        return self.jit_draft(active)

    def run_backup(self, active: ActiveRequest) -> list[int]:
        """Return the speculation for the step after a cache miss, from the configured or chosen backup."""
        policy = self.settings.backup
        proposal = []
        if policy in ("auto", "ngram"):
            proposal = ngram_propose(active.committed(), self.k)
            self.backups.observe_ngram_lookup(bool(proposal))
        kind = self.backups.choose(len(self.active), bool(proposal)) if policy == "auto" else policy
        if kind == "ngram" and not proposal:
            kind = "none"
        active.pending_backup = kind
        runs = dict(active.stats.backup_runs)
        runs[kind] = runs.get(kind, 0) + 1
        active.stats = active.stats.model_copy(update={"backup_runs": runs})
        metrics.BACKUPS.labels(kind).inc()
        if kind == "jit":
            return self.jit_draft(active)
        # N-gram drafts are deterministic given the context: the rejection test treats their q as one-hot.
        active.proposals = []
        return proposal if kind == "ngram" else []

    def lookup_cache(self, active: ActiveRequest, accepted: int) -> list[int] | None:
        """Wait for the draft's cache of the step just verified and look up its outcome."""
        rid = active.request_id
        step = active.step - 1
        started = time.perf_counter()
        ready = self.drafts.wait(
            rid,
            lambda m: (isinstance(m, CacheReady) and m.step == step) or isinstance(m, ErrorReply),
            self.settings.cache_wait_s,
        )
        waited = time.perf_counter() - started
        self.add_wait(active, waited)
        if isinstance(ready, ErrorReply) or ready is None:
            self.draft_lost(active, ready)
            return None

        active.stats = active.stats.model_copy(update={"cache_build_s": active.stats.cache_build_s + ready.build_s})
        self.build_cost.observe(ready.batch_size, ready.build_s)
        value = self.redis.get(keys.spec_entry(self.ns, rid, step, accepted, active.seq.root))
        self.hit_rate.update(0.0 if value is None else 1.0)
        if accepted < len(ready.candidates) and len(ready.candidates) == self.k + 1:
            ranked = ready.candidates[accepted]
            rank = ranked.index(active.seq.root) if active.seq.root in ranked else None
            self.fanout_policies[active.cache_source].observe_rank(accepted, rank)
            if active.cache_source == "hit":
                active.fanout.observe_rank(accepted, rank)
            result = "miss" if value is None else "hit"
            # Rank 16 lies past the last bucket (15) and records "not among the candidates".
            observed_rank = 16 if rank is None else rank
            metrics.CACHE_COMMITTED_RANK.labels(str(accepted), result).observe(observed_rank)

        if value is None:
            metrics.CACHE_LOOKUPS.labels("miss").inc()
            active.stats = active.stats.model_copy(update={"cache_misses": active.stats.cache_misses + 1})
            return None
        metrics.CACHE_LOOKUPS.labels("hit").inc()
        active.stats = active.stats.model_copy(update={"cache_hits": active.stats.cache_hits + 1, "hit_wait_s": active.stats.hit_wait_s + waited})
        entry = decode(value)
        assert isinstance(entry, CacheEntry)
        active.proposals = list(entry.proposals)
        return list(entry.tokens)

    def jit_draft(self, active: ActiveRequest) -> list[int]:
        """Queue a draft request for the next step; ``speculate`` sends the step's requests together and awaits them."""
        base, tail = self._tail(active)
        proposal = self.proposal_params(active.request.sampling, self.fanout(active, self.k))
        # Drafts past the current limit would be trimmed unverified.
        k = max(1, min(self.k, self.draft_limit))
        message = DraftRequest(request_id=active.request_id, step=active.step, base_len=base, tokens=tail, k=k, proposal=proposal)
        self._outgoing.setdefault(active.draft_address, []).append(message)
        active.draft_anchor = len(active.seq.ids)
        active.awaiting_draft = active.step
        return []

    def await_draft(self, active: ActiveRequest, step: int) -> list[int]:
        started = time.perf_counter()
        reply = self.drafts.wait(
            active.request_id,
            lambda m: (isinstance(m, DraftReply) and m.step == step) or isinstance(m, ErrorReply),
            self.settings.draft_timeout_s,
        )
        self.add_wait(active, time.perf_counter() - started)
        if isinstance(reply, DraftReply):
            active.proposals = list(reply.proposals)
            return list(reply.tokens)
        self.draft_lost(active, reply)
        active.proposals = []
        return []

    def draft_lost(self, active: ActiveRequest, reply: ErrorReply | None) -> None:
        rid = active.request_id
        reason = reply.message if reply is not None else "no reply in time"
        logger.warning("request %s: draft replica %s failed (%s); decoding this step without speculation", rid, active.draft_address, reason, extra={"request_id": rid})
        self.drafts.unassign(active.draft_address)
        active.draft_address = None
        active.cache_pending = False

    def reattach_draft(self, active: ActiveRequest) -> list[int]:
        """Give a request that lost its draft a new one, rebuilt from the committed sequence."""
        address = self.drafts.assign()
        if address is None:
            return []
        active.draft_address = address
        committed = active.committed()
        proposal = self.proposal_params(active.request.sampling, self.fanout(active, self.k))
        self.drafts.send(address, PrefillRequest(request_id=active.request_id, prompt_token_ids=committed, k=self.k, step=active.step, proposal=proposal))
        active.draft_anchor = len(committed) - 1
        return self.await_draft(active, active.step)

    def add_wait(self, active: ActiveRequest, seconds: float) -> None:
        metrics.DRAFT_WAIT_TIME.observe(seconds)
        active.stats = active.stats.model_copy(update={"wait_draft_s": active.stats.wait_draft_s + seconds})

    # -- output ---------------------------------------------------------------------

    def emit(self, active: ActiveRequest, tokens: list[int], logprobs) -> None:
        text = active.output.take_delta()
        if not tokens and not text:
            return
        entries = None
        if logprobs is not None:
            entries = [TokenLogprob(token_id=t, logprob=lp, top=top) for t, (lp, top) in zip(tokens, logprobs)]
        event = TokenEvent(request_id=active.request_id, token_ids=tokens, text=text, logprobs=entries)
        events_key = keys.events(self.ns, active.request_id)
        pipe = self.redis.pipeline(transaction=False)
        pipe.xadd(events_key, {"msg": encode(event)})
        pipe.expire(events_key, keys.EVENTS_TTL_S)
        pipe.hset(keys.state(self.ns, active.request_id), mapping={"steps": active.stats.steps, "completion_tokens": len(active.output.token_ids)})
        pipe.execute()

    def finish(self, active: ActiveRequest, reason: str, stop_reason) -> None:
        rid = active.request_id
        self.remove(active)
        now = time.time()
        first = active.first_token_at or now
        completion = len(active.output.token_ids)
        stats = active.stats.model_copy(update={"decode_s": now - first})
        if completion > 1:
            metrics.TIME_PER_OUTPUT_TOKEN.observe((now - first) / (completion - 1))

        # Flush text held back while it could still have become a stop string.
        tail = active.output.take_delta() if active.output.finish is not None else ""
        events_key = keys.events(self.ns, rid)
        pipe = self.redis.pipeline(transaction=False)
        if tail:
            pipe.xadd(events_key, {"msg": encode(TokenEvent(request_id=rid, token_ids=[], text=tail))})
        finish = FinishEvent(
            request_id=rid,
            finish_reason=reason,
            usage=Usage(prompt_tokens=len(active.request.prompt_token_ids), completion_tokens=completion),
            stats=stats,
            stop_reason=stop_reason,
        )
        pipe.xadd(events_key, {"msg": encode(finish)})
        pipe.expire(events_key, keys.EVENTS_TTL_S)
        pipe.hset(keys.state(self.ns, rid), mapping={
            "status": "finished",
            "finish_reason": reason,
            "steps": stats.steps,
            "hits": stats.cache_hits,
            "misses": stats.cache_misses,
            "completion_tokens": completion,
        })
        pipe.expire(keys.state(self.ns, rid), keys.EVENTS_TTL_S)
        pipe.srem(keys.inflight(self.ns), rid)
        pipe.xack(self.stream, keys.REQUEST_GROUP, active.message_id)
        pipe.execute()
        self.release_draft(rid, active.draft_address)
        metrics.REQUESTS_FINISHED.labels(reason).inc()
        logger.info(
            "request %s finished (%s): %d tokens in %d steps, %d hits, %d misses",
            rid, reason, completion, stats.steps, stats.cache_hits, stats.cache_misses, extra={"request_id": rid},
        )

    def hand_off(self, active: ActiveRequest) -> None:
        """Leave an unfinished request pending in the stream, so another replica takes it over on shutdown."""
        logger.info("request %s left for another verify replica to continue", active.request_id, extra={"request_id": active.request_id})
        self.remove(active)
        self.release_draft(active.request_id, active.draft_address)

    def remove(self, active: ActiveRequest) -> None:
        if active in self.active:
            self.active.remove(active)
        metrics.REQUESTS_RUNNING.set(len(self.active))

    def release_draft(self, rid: str, address: str | None) -> None:
        if self.drafts is None:
            return
        if address is not None:
            self.drafts.send(address, ReleaseRequest(request_id=rid))
            self.drafts.unassign(address)
        # The draft deletes the request's cache entries when it handles the release.
        self.drafts.forget(rid)

    def fail(self, rid: str, message_id: bytes, message: str, code: str) -> None:
        logger.error("request %s failed: %s", rid, message, extra={"request_id": rid})
        events_key = keys.events(self.ns, rid)
        pipe = self.redis.pipeline(transaction=False)
        pipe.xadd(events_key, {"msg": encode(ErrorEvent(request_id=rid, message=message, code=code))})
        pipe.expire(events_key, keys.EVENTS_TTL_S)
        pipe.hset(keys.state(self.ns, rid), mapping={"status": "failed", "finish_reason": "error"})
        pipe.expire(keys.state(self.ns, rid), keys.EVENTS_TTL_S)
        pipe.srem(keys.inflight(self.ns), rid)
        pipe.xack(self.stream, keys.REQUEST_GROUP, message_id)
        pipe.execute()
        metrics.REQUESTS_FINISHED.labels("error").inc()


def new_request_id() -> str:
    return f"req-{uuid.uuid4().hex}"
