"""Continuous batching through the real services: concurrent greedy requests equal their solo outputs.

Requests with different prompts and max_tokens run together, so the batch
changes size as they join and leave. The verify service's batch-size
histogram shows that steps really carried several requests.
"""

from __future__ import annotations

import time

import httpx
import pytest
import torch

from bench.direct_client import collect, generate, submit
from tests.test_integration import PROMPTS, redis_of, start_stack, tiny_pair  # noqa: F401 (fixture)
from shared import keys
from tests.test_metrics import Scrape
from tests.tiny_models import target_greedy, target_greedy_one_token

pytestmark = pytest.mark.integration

JOBS = [(PROMPTS[0], 40), (PROMPTS[1], 25), (PROMPTS[2], 33), (PROMPTS[0][:3], 12), (PROMPTS[2][5:], 30), (PROMPTS[1] + [7], 18)]


@pytest.fixture(scope="module")
def solo(tiny_pair):  # noqa: F811
    return [target_greedy(tiny_pair[0], [prompt], max_tokens)[0] for prompt, max_tokens in JOBS]


@pytest.fixture(scope="module")
def solo_bf16(tiny_pair):  # noqa: F811
    return [target_greedy_one_token(tiny_pair[0], [prompt], max_tokens, torch.bfloat16)[0] for prompt, max_tokens in JOBS]


# Case -> (SAGUARO_MODE, other settings). ssd-jit runs SSD with every step drafted just in time;
# ssd-geometric allocates the fan-out from the fitted capped geometric model; ssd-bf16 runs the
# models in bf16 and compares with the target's bf16 one-token-per-forward output. The tiny models'
# bf16 argmaxes are far from ties, so this case checks the plumbing. tests/test_row_attention.py
# compares logits bit for bit, and the bf16 Qwen test in tests/test_real_models.py compares outputs.
MODES = {
    "ar": ("ar", {}),
    "sd": ("sd", {}),
    "ssd": ("ssd", {}),
    "ssd-jit": ("ssd", {"step_kind": "jit"}),
    "ssd-geometric": ("ssd", {"fanout_policy": "geometric"}),
    "ssd-bf16": ("ssd", {"dtype": "bfloat16"}),
}


@pytest.mark.parametrize("mode", list(MODES))
def test_concurrent_requests_equal_solo(mode, tiny_pair, tmp_path_factory, request):  # noqa: F811
    decode_mode, settings = MODES[mode]
    solo = request.getfixturevalue("solo_bf16" if settings.get("dtype") == "bfloat16" else "solo")
    deployment = start_stack(tiny_pair, tmp_path_factory, decode_mode, max_num_seqs=4, **settings)
    try:
        client, ns = redis_of(deployment)
        ids = [submit(client, ns, prompt, temperature=0.0, max_tokens=max_tokens, ignore_eos=True) for prompt, max_tokens in JOBS]
        results = [collect(client, ns, request_id, timeout_s=120) for request_id in ids]
        metrics = Scrape(httpx.get(deployment.metrics_url("verify"), timeout=10).text)
        draft_metrics = Scrape(httpx.get(deployment.metrics_url("draft"), timeout=10).text) if mode != "ar" else None
    finally:
        deployment.stop()
    for index, (result, expected) in enumerate(zip(results, solo)):
        assert result.finish is not None, result.error
        assert result.token_ids == expected, f"request {index}"
    steps = metrics.value("saguaro:verify_batch_size_count")
    requests_in_steps = metrics.value("saguaro:verify_batch_size_sum")
    assert requests_in_steps / steps > 1.5, "steps did not batch several requests"
    if mode in ("sd", "ssd-jit"):
        # The drafts of a step's requests went out as one batched message.
        assert draft_metrics.value("saguaro:draft_requests_total", type="draft_batch") > 5
        assert draft_metrics.value("saguaro:draft_requests_total", type="build_cache_batch") == 0


def test_sampled_request_is_unchanged_by_batch_company(tiny_pair, tmp_path_factory):  # noqa: F811
    """A seeded T > 0 request gives the same tokens alone and next to other requests (coupled test)."""
    deployment = start_stack(tiny_pair, tmp_path_factory, "ssd", max_num_seqs=4)
    try:
        client, ns = redis_of(deployment)
        alone = generate(client, ns, PROMPTS[2], temperature=0.8, seed=11, max_tokens=30, ignore_eos=True).token_ids
        others = [submit(client, ns, prompt, temperature=0.0, max_tokens=max_tokens, ignore_eos=True) for prompt, max_tokens in JOBS[:3]]
        together = generate(client, ns, PROMPTS[2], temperature=0.8, seed=11, max_tokens=30, ignore_eos=True).token_ids
        for request_id in others:
            collect(client, ns, request_id, timeout_s=120)
    finally:
        deployment.stop()
    assert together == alone


def test_long_prefill_runs_between_decode_steps(tiny_pair, tmp_path_factory):  # noqa: F811
    """A long prompt is prefilled one chunk per loop turn, so a running request keeps streaming, and both stay exact."""
    long_prompt = [(7 * i + 3) % 100 + 1 for i in range(600)]
    chunk = 40
    chunks = -(-(len(long_prompt) - 1) // chunk)
    expected_running = target_greedy(tiny_pair[0], [PROMPTS[0]], 300)[0]
    expected_long = target_greedy(tiny_pair[0], [long_prompt], 10)[0]
    deployment = start_stack(tiny_pair, tmp_path_factory, "ssd", max_num_seqs=4, prefill_chunk_size=chunk)
    try:
        client, ns = redis_of(deployment)
        running = submit(client, ns, PROMPTS[0], temperature=0.0, max_tokens=300, ignore_eos=True)
        # Wait until the first request decodes, so the long prefill starts while it runs.
        while not client.xlen(keys.events(ns, running)):
            time.sleep(0.01)
        submitted_ms = int(client.time()[0] * 1000 + client.time()[1] // 1000)
        long_id = submit(client, ns, long_prompt, temperature=0.0, max_tokens=10, ignore_eos=True)
        long_result = collect(client, ns, long_id, timeout_s=120)
        running_result = collect(client, ns, running, timeout_s=120)
        first_long_ms = int(client.xrange(keys.events(ns, long_id), count=1)[0][0].split(b"-")[0])
        running_ids = [int(entry_id.split(b"-")[0]) for entry_id, _ in client.xrange(keys.events(ns, running))]
    finally:
        deployment.stop()
    assert long_result.token_ids == expected_long
    assert running_result.token_ids == expected_running
    # One decode step of the running request per chunk. Prefilled in one go, the prompt would
    # let at most a step or two through between its admission and its first token.
    steps_during_prefill = sum(1 for ms in running_ids if submitted_ms < ms < first_long_ms)
    assert running_ids[-1] > first_long_ms, "the running request finished before the long prefill ended"
    assert steps_during_prefill >= chunks // 2, f"{steps_during_prefill} steps during {chunks} prefill chunks"
