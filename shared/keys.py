"""Redis key layout.

Every key starts with the deployment's namespace (``Settings.namespace``,
``saguaro`` by default), written ``{ns}`` below.

| key | type | written by | read by | lifetime |
|---|---|---|---|---|
| ``{ns}:requests`` | stream, field ``msg`` = encoded ``GenerateRequest`` | gateway (XADD) | verify replicas through consumer group ``verify`` (XREADGROUP, XACK when finished) | trimmed to about 10,000 entries |
| ``{ns}:req:{rid}:events`` | stream, field ``msg`` = encoded ``TokenEvent``/``FinishEvent``/``ErrorEvent`` | verify | gateway (XREAD BLOCK) | ``EVENTS_TTL_S`` after the last write |
| ``{ns}:req:{rid}:state`` | hash: ``status``, ``verify``, ``draft``, ``steps``, ``hits``, ``misses``, ``completion_tokens`` | verify | gateway, operators | ``EVENTS_TTL_S`` after the last write |
| ``{ns}:req:{rid}:cancel`` | string ``1`` | gateway, when the client disconnects or times out | verify, before every step | ``EVENTS_TTL_S`` |
| ``{ns}:spec:{rid}:{step}:{j}:{c}`` | string, encoded ``CacheEntry`` | draft | verify, after step ``step`` ended with ``j`` accepted drafts and committed token ``c`` | ``Settings.cache_ttl_s`` |
| ``{ns}:replica:{role}:{id}`` | string, encoded ``ReplicaInfo`` | each verify and draft replica, every ``HEARTBEAT_S`` | gateway (readiness), verify (draft discovery) | ``REPLICA_TTL_S`` |
| ``{ns}:inflight`` | set of request ids admitted and not finished | gateway adds, verify removes | gateway (queue depth) | permanent |
"""

from __future__ import annotations

EVENTS_TTL_S = 600
HEARTBEAT_S = 1.0
REPLICA_TTL_S = 5
REQUEST_GROUP = "verify"
REQUEST_STREAM_MAXLEN = 10_000


def request_stream(ns: str) -> str:
    return f"{ns}:requests"


def events(ns: str, request_id: str) -> str:
    return f"{ns}:req:{request_id}:events"


def state(ns: str, request_id: str) -> str:
    return f"{ns}:req:{request_id}:state"


def cancel(ns: str, request_id: str) -> str:
    return f"{ns}:req:{request_id}:cancel"


def spec_entry(ns: str, request_id: str, step: int, accepted: int, token: int) -> str:
    return f"{ns}:spec:{request_id}:{step}:{accepted}:{token}"


def spec_pattern(ns: str, request_id: str) -> str:
    return f"{ns}:spec:{request_id}:*"


def replica(ns: str, role: str, replica_id: str) -> str:
    return f"{ns}:replica:{role}:{replica_id}"


def replica_pattern(ns: str, role: str) -> str:
    return f"{ns}:replica:{role}:*"


def inflight(ns: str) -> str:
    return f"{ns}:inflight"
