"""Round trips and rejections of the wire protocol."""

import msgpack
import pytest

from shared.protocol import (
    PROTOCOL_VERSION,
    BuildCacheRequest,
    CacheEntry,
    CacheReady,
    DecodeStats,
    DraftReply,
    DraftRequest,
    ErrorEvent,
    ErrorReply,
    FinishEvent,
    GenerateRequest,
    PrefillRequest,
    ProtocolError,
    ReleaseRequest,
    ReplicaInfo,
    SamplingParams,
    TokenEvent,
    TokenLogprob,
    Usage,
    decode,
    encode,
)

MESSAGES = [
    GenerateRequest(request_id="r", prompt_token_ids=[1, 2], sampling=SamplingParams(temperature=0.5, stop=["\n"], logprobs=2), arrival_time=1.5),
    TokenEvent(request_id="r", token_ids=[3], text="x", logprobs=[TokenLogprob(token_id=3, logprob=-0.1, top={3: -0.1, 4: -2.5})]),
    FinishEvent(request_id="r", finish_reason="stop", usage=Usage(prompt_tokens=2, completion_tokens=1), stats=DecodeStats(mode="ssd", accepted_per_pos=[1, 0]), stop_reason="\n"),
    ErrorEvent(request_id="r", message="bad", code="invalid_request"),
    PrefillRequest(request_id="r", prompt_token_ids=[1, 2, 3], k=4),
    DraftRequest(request_id="r", step=3, base_len=10, tokens=[5], k=4),
    DraftReply(request_id="r", step=3, tokens=[1, 2, 3, 4], elapsed_s=0.01),
    BuildCacheRequest(request_id="r", step=2, base_len=9, tokens=[7, 1, 2, 3], root_offset=0, fanout=[2, 2, 1, 3], k=3, ttl_s=10.0),
    CacheReady(request_id="r", step=2, num_entries=8, glue_s=0.1, fork_s=0.0, tree_s=0.2, publish_s=0.001),
    ReleaseRequest(request_id="r"),
    ErrorReply(request_id="r", code="unknown_request", message="gone"),
    CacheEntry(tokens=[9, 8, 7]),
    ReplicaInfo(role="draft", replica_id="d1", address="tcp://127.0.0.1:5601", started_at=1.0),
]


@pytest.mark.parametrize("message", MESSAGES, ids=lambda m: m.type)
def test_round_trip(message):
    assert decode(encode(message)) == message


def test_frame_carries_version():
    payload = msgpack.unpackb(encode(ReleaseRequest(request_id="r")))
    assert payload["v"] == PROTOCOL_VERSION
    assert payload["type"] == "release"


@pytest.mark.parametrize(
    "frame, fragment",
    [
        (b"\xc1", "not valid msgpack"),
        (msgpack.packb([1, 2]), "expected a map"),
        (msgpack.packb({"v": 99, "type": "release", "request_id": "r"}), "version 99"),
        (msgpack.packb({"v": PROTOCOL_VERSION, "type": "nope"}), "invalid"),
        (msgpack.packb({"v": PROTOCOL_VERSION, "type": "release"}), "request_id"),
        (msgpack.packb({"v": PROTOCOL_VERSION, "type": "release", "request_id": "r", "extra": 1}), "extra"),
        (msgpack.packb({"v": PROTOCOL_VERSION, "type": "draft", "request_id": "r", "step": 0, "base_len": 0, "tokens": [], "k": 1}), "tokens"),
    ],
)
def test_invalid_frames_are_rejected(frame, fragment):
    with pytest.raises(ProtocolError, match=fragment):
        decode(frame)


def test_usage_total():
    assert Usage(prompt_tokens=3, completion_tokens=4).total_tokens == 7
