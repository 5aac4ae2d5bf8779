"""Target-side verification on a tiny model: greedy equality and the T > 0 output distribution."""

import numpy as np
import pytest
import torch
from scipy import stats

from services.verify.engine import TargetEngine
from shared.protocol import SamplingParams
from tests.tiny_models import tiny_qwen2

PROMPT = [5, 9, 33, 2, 71]


def greedy_reference(model, prompt: list[int], n: int) -> list[int]:
    ids = list(prompt)
    with torch.inference_mode():
        for _ in range(n):
            ids.append(int(torch.argmax(model(input_ids=torch.tensor([ids])).logits[0, -1])))
    return ids[len(prompt):]


def test_verify_greedy_matches_reference_with_any_drafts():
    model = tiny_qwen2(seed=11)
    engine = TargetEngine(model, torch.device("cpu"))
    reference = greedy_reference(model, PROMPT, 24)
    params = SamplingParams(temperature=0.0, max_tokens=24)
    seq = engine.prefill("g", PROMPT)
    out: list[int] = []
    step = 0
    while len(out) < 24:
        good = reference[len(out) : len(out) + 3]
        # Alternate right drafts, wrong drafts and a right prefix with a wrong tail.
        drafts = [good, [(t + 1) % 120 for t in good], good[:1] + [0, 0]][step % 3]
        result = engine.verify(seq, drafts[: max(0, min(3, 24 - len(out) - 1))], params)
        out.extend(result.committed)
        step += 1
    assert out[:24] == reference
    assert len(seq.ids) == len(PROMPT) + len(out) - 1


def test_prefill_runs_every_chunk():
    engine = TargetEngine(tiny_qwen2(seed=11), torch.device("cpu"), prefill_chunk=4)
    seq = engine.prefill("c", list(range(1, 14)))
    assert seq.cache.get_seq_length() == 12
    assert seq.root == 13


def test_prefill_job_runs_one_chunk_per_call():
    engine = TargetEngine(tiny_qwen2(seed=11), torch.device("cpu"), prefill_chunk=4)
    prompt = list(range(1, 14))
    job = engine.start_prefill("c", prompt)
    lengths = []
    while not engine.run_prefill_chunk(job):
        lengths.append(job.seq.cache.get_seq_length())
    lengths.append(job.seq.cache.get_seq_length())
    assert lengths == [4, 8, 12]
    assert job.prefilled_tokens == 12
    assert job.seq.ids == prompt[:-1]
    assert job.seq.root == 13

    whole = engine.prefill("w", prompt)
    for layer_job, layer_whole in zip(job.seq.cache.layers, whole.cache.layers):
        assert torch.equal(layer_job.keys, layer_whole.keys)
        assert torch.equal(layer_job.values, layer_whole.values)


def test_prefill_job_of_one_token_prompt():
    engine = TargetEngine(tiny_qwen2(seed=11), torch.device("cpu"), prefill_chunk=4)
    job = engine.start_prefill("one", [42])
    assert job.done
    assert job.seq.root == 42
    assert job.seq.ids == []
    assert engine.run_prefill_chunk(job)


def test_prefill_rejects_empty_prompt():
    engine = TargetEngine(tiny_qwen2(seed=11), torch.device("cpu"))
    with pytest.raises(ValueError, match="empty prompt"):
        engine.start_prefill("empty", [])


def test_verify_keeps_kv_of_accepted_prefix_only():
    model = tiny_qwen2(seed=11)
    engine = TargetEngine(model, torch.device("cpu"))
    reference = greedy_reference(model, PROMPT, 6)
    seq = engine.prefill("kv", PROMPT)
    # The root's KV is computed by the first verify; the root here is the prompt's last token.
    result = engine.verify(seq, [reference[0], 0, 0], SamplingParams(temperature=0.0))
    assert result.accepted == 1
    assert result.committed == reference[:2]
    assert seq.cache.get_seq_length() == len(seq.ids)
    assert seq.ids == PROMPT + [reference[0]]
    assert seq.root == reference[1]


@pytest.mark.slow
def test_second_token_distribution_at_temperature_one():
    """Verify two drafts that are the target's own argmax (the worst case for a biased test).

    The second committed token's marginal must equal sum_x p(x) p(y | x). Chi-square
    over the 9 likeliest outcomes plus the rest, N = 4000, alpha = 0.001. A sampler
    that commits the draft whenever it equals the argmax would concentrate on the
    argmax path and fail; ``test_argmax_acceptance_pitfall_is_detected`` shows the
    same test catching that bias.
    """
    model = tiny_qwen2(seed=11)
    engine = TargetEngine(model, torch.device("cpu"))
    with torch.inference_mode():
        first = torch.softmax(model(input_ids=torch.tensor([PROMPT])).logits[0, -1].double(), -1)
        second = torch.zeros_like(first)
        batch = torch.tensor([PROMPT[:-1] + [PROMPT[-1], x] for x in range(first.shape[0])])
        cond = torch.softmax(model(input_ids=batch).logits[:, -1].double(), -1)
        second = (first[:, None] * cond).sum(0)
    top = torch.argsort(second, descending=True)[:9].tolist()
    probs = np.array([float(second[t]) for t in top] + [1.0 - float(second[top].sum())])
    argmax_path = greedy_reference(model, PROMPT, 2)

    n = 4000
    counts = np.zeros(len(probs))
    for seed in range(n):
        seq = engine.prefill("d", PROMPT)
        params = SamplingParams(temperature=1.0, seed=seed)
        # Verify [r, d1, d2] with d1, d2 the argmax path; the first step may commit 1 to 3 tokens.
        result = engine.verify(seq, argmax_path, params)
        committed = result.committed
        if len(committed) < 2:
            committed = committed + engine.verify(seq, [], params).committed
        token = committed[1]
        counts[top.index(token) if token in top else len(top)] += 1
    pvalue = stats.chisquare(counts, probs * n).pvalue
    assert pvalue > 0.001
