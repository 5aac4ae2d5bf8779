"""Prometheus metrics of the verify and draft services.

Speculative-decoding counters carry the names vLLM uses, under the ``saguaro:``
prefix: ``saguaro:spec_decode_num_drafts_total`` and so on.
"""

from __future__ import annotations

from prometheus_client import Counter, Gauge, Histogram

STEP_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.2, 0.3, 0.5, 0.75, 1.0, 2.0, 5.0, 10.0)

# verify
NUM_DRAFTS = Counter("saguaro:spec_decode_num_drafts", "Verification steps that checked at least one draft token")
NUM_DRAFT_TOKENS = Counter("saguaro:spec_decode_num_draft_tokens", "Draft tokens proposed to the verifier")
NUM_ACCEPTED_TOKENS = Counter("saguaro:spec_decode_num_accepted_tokens", "Draft tokens the verifier accepted")
NUM_ACCEPTED_PER_POS = Counter(
    "saguaro:spec_decode_num_accepted_tokens_per_pos", "Accepted draft tokens by draft position (0-based)", ["position"]
)
CACHE_COMMITTED_RANK = Histogram(
    "saguaro:spec_cache_committed_rank",
    "Rank of the committed token among the draft's candidates at each cache lookup after a K-draft speculation, "
    "by acceptance length and lookup result (beyond the last bucket: not among the candidates)",
    ["accepted", "result"],
    buckets=tuple(float(rank) for rank in range(16)),
)
CACHE_LOOKUPS = Counter("saguaro:spec_cache_lookups", "Speculation-cache lookups after a step, by result", ["result"])
BACKUPS = Counter("saguaro:spec_backup_runs", "Backup speculations run after an SSD cache miss, or when no cache was pending, by kind", ["kind"])
BACKUP_TOKENS = Counter("saguaro:spec_backup_committed_tokens", "Tokens committed by the steps that verified a backup speculation, by kind", ["kind"])
VERIFY_TIME = Histogram("saguaro:verify_step_seconds", "Target forward time of one verification step", buckets=STEP_BUCKETS)
DRAFT_WAIT_TIME = Histogram(
    "saguaro:verify_draft_wait_seconds", "Time the verifier waited for the draft in one step", buckets=STEP_BUCKETS
)
GENERATION_TOKENS = Counter("saguaro:generation_tokens", "Committed output tokens")
PROMPT_TOKENS = Counter("saguaro:prompt_tokens", "Prefilled prompt tokens")
TIME_TO_FIRST_TOKEN = Histogram(
    "saguaro:time_to_first_token_seconds", "Time from admission to the first committed token", buckets=STEP_BUCKETS + (20.0, 60.0)
)
TIME_PER_OUTPUT_TOKEN = Histogram(
    "saguaro:time_per_output_token_seconds", "Decode time divided by output tokens after the first", buckets=STEP_BUCKETS
)
DRAFT_LIMIT = Gauge("saguaro:spec_decode_draft_limit", "Drafts per request the verifier checks at the current batch size (backs off as the batch grows)")
VERIFY_STEPS = Counter("saguaro:verify_steps", "Batched verification steps by kind of speculation (cache, jit or plain)", ["kind"])
STEP_KIND = Gauge("saguaro:verify_step_kind", "1 for the kind of speculation verify steps use now (cache, jit or plain), 0 for the others", ["kind"])
BATCH_SIZE = Histogram("saguaro:verify_batch_size", "Requests in one batched verification step", buckets=(1, 2, 4, 8, 16, 32, 64, 128))
REQUESTS_RUNNING = Gauge("saguaro:num_requests_running", "Requests this verify replica is decoding")
REQUESTS_PREFILLING = Gauge("saguaro:num_requests_prefilling", "Admitted requests whose prompt this verify replica is still prefilling")
REQUESTS_FINISHED = Counter("saguaro:request_success", "Finished requests by finish reason", ["finished_reason"])

# draft
CACHE_BUILD_TIME = Histogram(
    "saguaro:draft_cache_build_seconds", "Draft time to build the speculation cache of one step", ["phase"], buckets=STEP_BUCKETS
)
CACHE_ENTRIES = Counter("saguaro:draft_cache_entries", "Speculation-cache entries published")
DRAFT_REQUESTS = Counter("saguaro:draft_requests", "Messages the draft service handled, by type", ["type"])
DRAFT_SEQUENCES = Gauge("saguaro:draft_sequences", "Requests whose KV the draft service holds")
