"""The default Qwen pair, served for real: SSD output equals the target's own greedy output (fp32 and bf16).

Needs the models built by ``make models``; skipped with that instruction when they are missing.
SAGUARO_REAL_PROMPTS and SAGUARO_REAL_TOKENS enlarge the check (defaults 2 and 32).
"""

from __future__ import annotations

import gc
import json
import os
import uuid
from pathlib import Path

import pytest
import redis
import torch

from bench.direct_client import collect, generate, submit
from services.launcher import Stack
from shared.config import Settings
from tests.tiny_models import target_greedy_one_token

pytestmark = [pytest.mark.slow, pytest.mark.integration]

ROOT = Path(__file__).resolve().parent.parent
NUM_PROMPTS = int(os.environ.get("SAGUARO_REAL_PROMPTS", "2"))
NUM_TOKENS = int(os.environ.get("SAGUARO_REAL_TOKENS", "32"))


def qwen_prompts(settings: Settings) -> list[list[int]]:
    """Return the first NUM_PROMPTS HumanEval prompts as target token ids; skip the test if the models are not built."""
    for path in (settings.target_model, settings.draft_model):
        if not (Path(path) / "config.json").is_file():
            pytest.skip(f"model {path} is not built; run `make models`")
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(settings.target_model)
    rows = [json.loads(line) for line in (ROOT / "bench" / "data" / "humaneval.jsonl").read_text().splitlines()][:NUM_PROMPTS]
    return [tokenizer(row["prompt"])["input_ids"] for row in rows]


def test_qwen_ssd_equals_target_greedy(tmp_path):
    settings = Settings()
    prompts = qwen_prompts(settings)
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(settings.target_model, dtype=torch.float32, use_kernels=False)
    expected = []
    with torch.inference_mode():
        for ids in prompts:
            out = model.generate(torch.tensor([ids]), attention_mask=torch.ones(1, len(ids), dtype=torch.long), max_new_tokens=NUM_TOKENS, min_new_tokens=NUM_TOKENS, do_sample=False, eos_token_id=None, pad_token_id=0)
            expected.append(out[0, len(ids):].tolist())
    del model
    gc.collect()

    namespace = f"real-{uuid.uuid4().hex[:8]}"
    env = {"SAGUARO_NAMESPACE": namespace, "SAGUARO_MODE": "ssd", "SAGUARO_DTYPE": "float32"}
    with Stack(env=env, services=("draft", "verify"), log_dir=tmp_path / "logs", start_timeout_s=600) as stack:
        client = redis.Redis.from_url(stack.redis_url)
        hits = 0
        for ids, reference in zip(prompts, expected):
            result = generate(client, namespace, ids, temperature=0.0, max_tokens=NUM_TOKENS, ignore_eos=True, timeout_s=1800)
            assert result.finish is not None, result.error
            assert result.token_ids == reference
            hits += result.finish.stats.cache_hits
        assert hits > 0


def test_qwen_bf16_batched_ssd_equals_one_token_decoding(tmp_path):
    """In bf16, SSD with every prompt's request in one batch gives the target's own one-token-per-step greedy output."""
    settings = Settings()
    prompts = qwen_prompts(settings)
    expected = target_greedy_one_token(Path(settings.target_model), prompts, NUM_TOKENS, torch.bfloat16)
    gc.collect()

    namespace = f"real-bf16-{uuid.uuid4().hex[:8]}"
    env = {"SAGUARO_NAMESPACE": namespace, "SAGUARO_MODE": "ssd", "SAGUARO_DTYPE": "bfloat16", "SAGUARO_MAX_NUM_SEQS": str(NUM_PROMPTS)}
    with Stack(env=env, services=("draft", "verify"), log_dir=tmp_path / "logs", start_timeout_s=600) as stack:
        client = redis.Redis.from_url(stack.redis_url)
        request_ids = [submit(client, namespace, ids, temperature=0.0, max_tokens=NUM_TOKENS, ignore_eos=True) for ids in prompts]
        results = [collect(client, namespace, request_id, timeout_s=1800) for request_id in request_ids]
    for index, (result, reference) in enumerate(zip(results, expected)):
        assert result.finish is not None, result.error
        assert result.token_ids == reference, f"prompt {index}"
