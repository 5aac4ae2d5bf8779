"""Every message the three services exchange, as typed, versioned schemas.

A message is a msgpack map with the protocol version ``v``, a ``type`` tag and
the fields of its schema. ``encode`` and ``decode`` are the only ways messages
enter or leave a socket or a Redis value, so every frame is validated by
pydantic on the way in.

Paths:
- gateway -> verify: ``GenerateRequest`` in the Redis request stream.
- verify -> gateway: ``TokenEvent``, ``FinishEvent``, ``ErrorEvent`` in the
  request's Redis events stream.
- verify <-> draft over ZeroMQ (verify DEALER, draft ROUTER):
  ``PrefillRequest``/``DraftRequest`` -> ``DraftReply``;
  ``BuildCacheRequest`` -> ``CacheReady``; ``BuildCacheBatch`` -> one
  ``CacheReady`` or ``ErrorReply`` per request; ``ReleaseRequest`` (no reply);
  any request -> ``ErrorReply`` when it cannot be served.
- draft -> Redis -> verify: ``CacheEntry`` values of the speculation cache.
- every replica -> Redis: ``ReplicaInfo`` heartbeats.
"""

from __future__ import annotations

from typing import Annotated, Literal, Union

import msgpack
from pydantic import BaseModel, ConfigDict, Field, TypeAdapter

PROTOCOL_VERSION = 1


class ProtocolError(ValueError):
    """A frame that is not a valid message of this protocol version."""


class _Message(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class SamplingParams(_Message):
    temperature: float = Field(1.0, ge=0.0)
    top_p: float = Field(1.0, gt=0.0, le=1.0)
    top_k: int = Field(0, ge=0, description="0 disables top-k")
    seed: int = Field(0, ge=0, description="seed of the per-position sampling noise")
    max_tokens: int = Field(16, ge=1)
    stop: list[str] = Field(default_factory=list)
    stop_token_ids: list[int] = Field(default_factory=list)
    ignore_eos: bool = False
    logprobs: int | None = Field(None, ge=0, le=20, description="number of top log-probabilities per token; None returns none")


# gateway -> verify


class GenerateRequest(_Message):
    type: Literal["generate"] = "generate"
    request_id: str
    prompt_token_ids: list[int] = Field(min_length=1)
    sampling: SamplingParams
    arrival_time: float


# verify -> gateway


class TokenLogprob(_Message):
    token_id: int
    logprob: float
    top: dict[int, float] = Field(default_factory=dict)


class TokenEvent(_Message):
    type: Literal["tokens"] = "tokens"
    request_id: str
    token_ids: list[int]
    text: str
    logprobs: list[TokenLogprob] | None = None


class Usage(_Message):
    prompt_tokens: int
    completion_tokens: int

    @property
    def total_tokens(self) -> int:
        return self.prompt_tokens + self.completion_tokens


class DecodeStats(_Message):
    """Per-request counters of the verify loop."""

    mode: str
    steps: int = 0
    # accepted_per_pos[i]: steps in which draft position i (0-based) was accepted.
    accepted_per_pos: list[int] = Field(default_factory=list)
    drafted_tokens: int = 0
    accepted_tokens: int = 0
    cache_hits: int = 0
    cache_misses: int = 0
    ttft_s: float = 0.0
    # Tokens the first step committed; decoding speed counts the tokens after them (0: unknown, after a takeover).
    first_step_tokens: int = 0
    # Time from the first step's tokens to the finish.
    decode_s: float = 0.0
    verify_s: float = 0.0
    wait_draft_s: float = 0.0
    # Part of wait_draft_s spent waiting for caches that then hit: a hit step's overhead over a pure verify.
    hit_wait_s: float = 0.0
    # Draft time to build the speculation cache, summed over the steps whose cache was looked up.
    cache_build_s: float = 0.0
    # Backup speculations run after misses, by kind (jit, ngram, none).
    backup_runs: dict[str, int] = Field(default_factory=dict)


class FinishEvent(_Message):
    type: Literal["finish"] = "finish"
    request_id: str
    finish_reason: Literal["stop", "length", "abort"]
    usage: Usage
    stats: DecodeStats
    stop_reason: str | int | None = None


class ErrorEvent(_Message):
    type: Literal["error"] = "error"
    request_id: str
    message: str
    code: str = "internal_error"


# verify <-> draft


class ProposalParams(_Message):
    """Sampling settings of the draft when the verifier runs the rejection test with the draft's q.

    The draft's proposal distribution q at a position is its softmax after
    ``temperature``, ``top_k`` and ``top_p``, cut to its ``support`` likeliest
    tokens and renormalised. Saguaro sampling then multiplies the probability of
    the ``top_f[i]`` likeliest tokens at draft index i by ``saguaro_c`` and
    renormalises again. The draft samples from that q and sends q with every
    token, so the verifier tests exactly the distribution the token came from.
    """

    temperature: float = Field(gt=0.0)
    top_p: float = Field(1.0, gt=0.0, le=1.0)
    top_k: int = Field(0, ge=0)
    seed: int = Field(0, ge=0)
    saguaro_c: float = Field(1.0, ge=0.0, le=1.0)
    top_f: list[int] = Field(default_factory=list, description="tokens downweighted by saguaro_c at draft index i; missing entries mean 0")
    support: int = Field(32, ge=1, le=4096, description="tokens q keeps per position")


class Proposal(_Message):
    """The sparse proposal distribution q of one draft token: ``probs[i]`` is q(``ids[i]``), zero elsewhere."""

    ids: list[int]
    probs: list[float]


class PrefillRequest(_Message):
    """Prefill ``prompt_token_ids[:-1]``; if ``k`` > 0, then draft ``k`` tokens after the full prompt (step 0)."""

    type: Literal["prefill"] = "prefill"
    request_id: str
    prompt_token_ids: list[int] = Field(min_length=1)
    k: int = Field(ge=0)
    step: int = Field(0, ge=0, description="step number of the draft reply; nonzero when a lost sequence is rebuilt mid-request")
    proposal: ProposalParams | None = Field(None, description="sample drafts as described; None drafts the argmax")


class DraftRequest(_Message):
    """Draft ``k`` tokens after the committed sequence whose tail from ``base_len`` is ``tokens``."""

    type: Literal["draft"] = "draft"
    request_id: str
    step: int = Field(ge=0)
    base_len: int = Field(ge=0)
    tokens: list[int] = Field(min_length=1)
    k: int = Field(ge=1)
    proposal: ProposalParams | None = None


class DraftReply(_Message):
    type: Literal["draft_reply"] = "draft_reply"
    request_id: str
    step: int
    tokens: list[int]
    elapsed_s: float
    # One q per token when the request carried proposal parameters, else empty (argmax drafts).
    proposals: list[Proposal] = Field(default_factory=list)
    batch_size: int = Field(1, ge=1, description="requests the draft drafted for in the same forwards, this one included")


class DraftBatch(_Message):
    """Draft for several requests together, sharing the draft's forwards.

    The draft replies once per request, in the order of ``requests``, with
    ``DraftReply`` or ``ErrorReply``. A request that fails does not fail the others.
    """

    type: Literal["draft_batch"] = "draft_batch"
    requests: list[DraftRequest] = Field(min_length=1)


class BuildCacheRequest(_Message):
    """Build the speculation cache for every likely outcome of verifying [r, s1..sK].

    ``tokens`` starts at position ``base_len``, and the draft has seen every
    token before it in earlier messages. ``tokens[root_offset:]`` is
    [r, s1..sK]; any tokens before it are committed ones the draft may lack.
    """

    type: Literal["build_cache"] = "build_cache"
    request_id: str
    step: int = Field(ge=0)
    base_len: int = Field(ge=0)
    tokens: list[int] = Field(min_length=1)
    root_offset: int = Field(0, ge=0)
    fanout: list[int] = Field(description="f_j for j = 0..K")
    k: int = Field(ge=1, description="draft tokens per cached speculation")
    ttl_s: float = Field(gt=0)
    proposal: ProposalParams | None = None


class BuildCacheBatch(_Message):
    """Build the speculation caches of several requests together, sharing the draft's forwards.

    The draft replies once per request, in the order of ``requests``, with
    ``CacheReady`` or ``ErrorReply``. A request that fails does not fail the others.
    """

    type: Literal["build_cache_batch"] = "build_cache_batch"
    requests: list[BuildCacheRequest] = Field(min_length=1)


class CacheReady(_Message):
    type: Literal["cache_ready"] = "cache_ready"
    request_id: str
    step: int
    num_entries: int
    batch_size: int = Field(1, ge=1, description="requests whose caches the draft built in the same forwards, this one included")
    glue_s: float
    fork_s: float
    tree_s: float
    publish_s: float
    # candidates[j]: the draft's ranked candidates for the token committed after j accepted drafts.
    candidates: list[list[int]] = Field(default_factory=list)

    @property
    def build_s(self) -> float:
        return self.glue_s + self.fork_s + self.tree_s + self.publish_s


class ReleaseRequest(_Message):
    type: Literal["release"] = "release"
    request_id: str


class ErrorReply(_Message):
    type: Literal["error_reply"] = "error_reply"
    request_id: str
    code: Literal["unknown_request", "invalid", "internal"]
    message: str


# draft -> Redis -> verify


class CacheEntry(_Message):
    type: Literal["cache_entry"] = "cache_entry"
    tokens: list[int]
    proposals: list[Proposal] = Field(default_factory=list)


# heartbeats


class ReplicaInfo(_Message):
    type: Literal["replica"] = "replica"
    role: Literal["gateway", "verify", "draft"]
    replica_id: str
    address: str = ""
    model: str = ""
    mode: str = ""
    running: int = 0
    tokenizer_hash: str = Field("", description="sha256 of the tokenizer vocabulary; a verify replica only uses drafts whose hash equals its own")
    started_at: float


Message = Annotated[
    Union[
        GenerateRequest,
        TokenEvent,
        FinishEvent,
        ErrorEvent,
        PrefillRequest,
        DraftRequest,
        DraftReply,
        DraftBatch,
        BuildCacheRequest,
        BuildCacheBatch,
        CacheReady,
        ReleaseRequest,
        ErrorReply,
        CacheEntry,
        ReplicaInfo,
    ],
    Field(discriminator="type"),
]
_adapter: TypeAdapter = TypeAdapter(Message)


def encode(message: _Message) -> bytes:
    payload = message.model_dump(mode="python")
    payload["v"] = PROTOCOL_VERSION
    return msgpack.packb(payload, use_bin_type=True)


def decode(frame: bytes) -> _Message:
    """Decode and validate one frame; raise ``ProtocolError`` on anything else."""
    try:
        payload = msgpack.unpackb(frame, raw=False, strict_map_key=False)
    except (msgpack.UnpackException, ValueError) as exc:
        raise ProtocolError(f"frame is not valid msgpack: {exc}") from exc
    if not isinstance(payload, dict):
        raise ProtocolError(f"frame is a msgpack {type(payload).__name__}, expected a map")
    version = payload.pop("v", None)
    if version != PROTOCOL_VERSION:
        raise ProtocolError(f"protocol version {version!r} is not supported; this build speaks version {PROTOCOL_VERSION}")
    try:
        return _adapter.validate_python(payload)
    except ValueError as exc:
        raise ProtocolError(f"invalid {payload.get('type', 'untyped')} message: {exc}") from exc
