"""A verify replica that dies mid-request: another replica takes the request over and finishes it exactly."""

import signal
import time
import uuid

import pytest
import redis

from bench.direct_client import collect, submit
from services.launcher import Stack
from shared import keys
from tests.tiny_models import save_tiny_pair, target_greedy, tiny_stack_env

pytestmark = pytest.mark.integration

PROMPT = [40, 41, 42, 43, 44, 45, 46]
MAX_TOKENS = 200


def test_killed_verify_replica_is_taken_over(tmp_path):
    target, draft = save_tiny_pair(tmp_path / "models", draft_noise=0.1)
    expected = target_greedy(target, [PROMPT], MAX_TOKENS)[0]
    namespace = f"recover-{uuid.uuid4().hex[:8]}"
    env = tiny_stack_env(target, draft, namespace, mode="ssd", max_num_seqs=1)
    with Stack(env=env, services=("draft", "verify"), replicas={"verify": 2}, log_dir=tmp_path / "logs", start_timeout_s=120) as stack:
        client = redis.Redis.from_url(stack.redis_url)
        request_id = submit(client, namespace, PROMPT, temperature=0.0, max_tokens=MAX_TOKENS, ignore_eos=True)

        # Wait until some tokens are out, then kill the replica that owns the request.
        deadline = time.monotonic() + 30
        while client.xlen(keys.events(namespace, request_id)) < 3:
            assert time.monotonic() < deadline, "the request produced no tokens"
            time.sleep(0.01)
        owner = client.hget(keys.state(namespace, request_id), "verify").decode()
        process = stack.processes["verify" if owner == "verify-1" else "verify-2"]
        process.send_signal(signal.SIGKILL)
        process.wait()

        result = collect(client, namespace, request_id, timeout_s=60)
        assert result.finish is not None, result.error
        assert result.token_ids == expected
        # Special tokens (126 and the EOS 127, ignored here) are not part of the text.
        assert result.text == " ".join(f"w{t}" for t in expected if t < 126)
        assert result.finish.usage.completion_tokens == MAX_TOKENS
        new_owner = client.hget(keys.state(namespace, request_id), "verify").decode()
        assert new_owner != owner
