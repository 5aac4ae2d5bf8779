"""Batch-invariant target forwards: a position's logits are the same bits in every kind of forward, in bf16 and fp32.

The reference is the target decoding one token per step. A (K + 1)-token
verification, a packed batch with other sequences and a prefill that replays
streamed output must give bit-identical logits and KV, so greedy output cannot
depend on the mode or on the batch.
"""

from __future__ import annotations

import pytest
import torch

from services.verify.engine import TargetEngine
from shared import row_attention
from shared.packing import PackedBatch
from shared.config import default_model_dir
from tests.tiny_models import decode_one_token_steps, tiny_qwen2

PROMPTS = [[5, 17, 33, 2, 90, 41, 7], [9, 8], [3, 1, 4, 1, 5, 9, 2, 6, 5, 3, 5, 8, 9, 7, 9], [60, 61, 62, 63]]
STEPS = 12
DTYPES = {"bfloat16": torch.bfloat16, "float32": torch.float32}


def tiny_model(arch: str = "qwen2", dtype: str = "bfloat16", seed: int = 31):
    return tiny_qwen2(seed=seed, arch=arch, layers=3).to(DTYPES[dtype])


def one_token_logits(engine: TargetEngine, prompt: list[int], steps: int) -> tuple[list[int], list[torch.Tensor]]:
    """Decode greedily one token per forward; return the tokens and the logits row of each step."""
    return decode_one_token_steps(engine, engine.prefill("reference", prompt), steps)


def chunked_logits(engine: TargetEngine, prompt: list[int], tokens: list[int], chunk: int) -> list[torch.Tensor]:
    """Feed the reference tokens ``chunk`` per forward, as verifications that accept every draft."""
    seq = engine.prefill("chunked", prompt)
    rows = []
    done = 0
    while done < len(tokens):
        drafts = tokens[done : done + chunk - 1]
        logits = engine.forward_batch([seq], [[seq.root] + drafts])[0]
        rows.extend(logits[: len(drafts) + 1])
        done += len(drafts) + 1
        if done >= len(tokens):
            break
        seq.ids.append(seq.root)
        seq.ids.extend(drafts)
        seq.root = tokens[done - 1]
    return rows[: len(tokens)]


def packed_logits(engine: TargetEngine, prompts: list[list[int]], tokens: list[list[int]]) -> list[list[torch.Tensor]]:
    """Feed every sequence's reference tokens in shared forwards, a different count per sequence and step."""
    seqs = [engine.prefill(f"packed{i}", prompt) for i, prompt in enumerate(prompts)]
    rows: list[list[torch.Tensor]] = [[] for _ in prompts]
    done = [0] * len(prompts)
    step = 0
    while min(done) < STEPS:
        drafts = [tokens[i][done[i] : done[i] + (i + step) % 4] for i in range(len(prompts))]
        logits = engine.forward_batch(seqs, [[seq.root] + d for seq, d in zip(seqs, drafts)])
        for i, seq in enumerate(seqs):
            rows[i].extend(logits[i])
            seq.ids.append(seq.root)
            seq.ids.extend(drafts[i])
            seq.root = tokens[i][done[i] + len(drafts[i])] if done[i] + len(drafts[i]) < len(tokens[i]) else 0
            done[i] += len(drafts[i]) + 1
        step += 1
    return [r[:STEPS] for r in rows]


def differing_rows(rows: list[torch.Tensor], reference: list[torch.Tensor]) -> list[int]:
    return [i for i, (row, ref) in enumerate(zip(rows, reference)) if not torch.equal(row, ref)]


@pytest.mark.parametrize("dtype", list(DTYPES))
@torch.inference_mode()
def test_linear_rows_invariant_inside_range(dtype):
    """The kernel property the engine relies on: inside the probed range, a row's result ignores the other rows."""
    generator = torch.Generator().manual_seed(3)
    shapes = ((64, 128), (256, 1024), (1536, 1536))
    layers = torch.nn.Sequential(*(torch.nn.Linear(i, o, bias=False) for i, o in shapes)).to(DTYPES[dtype])
    rows = row_attention.invariant_rows(layers)
    assert rows is not None, f"no row count gives invariant {dtype} matmuls on this CPU"
    high = rows.high
    counts = sorted(rows.counts) if rows.counts is not None else list(range(rows.low, high + 1))
    for layer in layers:
        weight = layer.weight
        x = torch.randn(2 * high + 3, weight.shape[1], generator=generator).to(weight.dtype)
        reference = torch.nn.functional.linear(x[: rows.low], weight)[0]
        for count in sorted({counts[0], counts[len(counts) // 2], counts[-1]}):
            first = torch.nn.functional.linear(x[:count], weight)[0]
            last = torch.nn.functional.linear(torch.cat([x[1:count], x[:1]]), weight)[-1]
            assert torch.equal(first, reference), f"{tuple(weight.shape)}: row 0 of {count} rows differs from row 0 of {rows.low} rows"
            assert torch.equal(last, reference), f"{tuple(weight.shape)}: row 0 differs when it comes last of {count} rows"
        # Outside the range the engine's linear pads or splits, so every count gives the same bits.
        expected = torch.cat([torch.nn.functional.linear(x[i : i + 1].expand(rows.low, -1), weight)[:1] for i in range(x.shape[0])])
        for count in (1, rows.low, high + 1, 2 * high + 3):
            result = row_attention.invariant_linear(x[:count], weight, None, rows)
            assert torch.equal(result, expected[:count]), f"{tuple(weight.shape)}: {count} rows through invariant_linear"


def test_split_rows_stays_inside_range():
    rows = row_attention.RowRange(4, 10)
    assert row_attention.split_rows(0, rows) == []
    assert row_attention.split_rows(3, rows) == [3]
    assert row_attention.split_rows(10, rows) == [10]
    assert row_attention.split_rows(11, rows) == [6, 5]
    assert row_attention.split_rows(21, rows) == [7, 7, 7]
    assert row_attention.split_rows(100, row_attention.RowRange(2)) == [100]
    with pytest.raises(ValueError, match="invalid row range"):
        row_attention.RowRange(5, 4)


def test_row_range_with_gaps_pads_to_next_count():
    rows = row_attention.RowRange.of({4, 5, 6, 10, 11, 12})
    assert (rows.low, rows.high) == (4, 12)
    assert rows.describe() == "4 to 6, 10 to 12"
    assert [rows.padded(size) for size in (1, 4, 6, 7, 9, 12)] == [4, 4, 6, 10, 10, 12]
    assert row_attention.split_rows(13, rows) == [7, 6]
    assert row_attention.RowRange.of({2, 3, 4}) == row_attention.RowRange(2, 4)
    assert row_attention.RowRange(2, 32).describe() == "2 to 32"
    with pytest.raises(ValueError, match="invalid row counts"):
        row_attention.RowRange(4, 12, frozenset({5, 12}))


@torch.inference_mode()
def test_invariant_linear_skips_gap_counts(monkeypatch):
    """Every matmul runs at a count of the set, and each row's result is its own."""
    rows = row_attention.RowRange.of({4, 5, 6, 10, 11, 12})
    seen = []
    real_linear = torch.nn.functional.linear

    def recording_linear(x, weight, bias=None):
        seen.append(x.shape[0])
        return real_linear(x, weight, bias)

    monkeypatch.setattr(torch.nn.functional, "linear", recording_linear)
    weight = torch.randn(3, 8, dtype=torch.float64)
    x = torch.randn(30, 8, dtype=torch.float64)
    for count in (1, 7, 13, 30):
        seen.clear()
        result = row_attention.invariant_linear(x[:count], weight, None, rows)
        assert all(size in {4, 5, 6, 10, 11, 12} for size in seen), f"{count} rows ran as {seen}"
        torch.testing.assert_close(result, real_linear(x[:count], weight))


def fake_linear(x, weight, bias=None):
    """Fake kernel paths that change with the row count: classes 1-3, 4-9 (with 6 position-dependent), 10 and up."""
    count = x.shape[0]
    out = torch.zeros(count, weight.shape[0])
    if 4 <= count <= 9:
        out += 1
    elif count >= 10:
        out += 2
    if count == 6:
        out[-1] += 5
    return out


def test_probe_picks_largest_class(monkeypatch):
    layer = torch.nn.Linear(4, 3)
    monkeypatch.setattr(torch.nn.functional, "linear", fake_linear)
    # Class 4-9 without the position-dependent 6 has the most counts, so gaps are allowed.
    assert row_attention.invariant_rows(layer, max_rows=12) == row_attention.RowRange.of({4, 5, 7, 8, 9})
    assert row_attention.invariant_rows(layer, max_rows=20) == row_attention.RowRange(10, 20)
    # A tie goes to the class with the lowest count.
    assert row_attention.invariant_rows(layer, max_rows=14) == row_attention.RowRange.of({4, 5, 7, 8, 9})


def test_row_classes_group_counts(monkeypatch):
    from bench.row_classes import class_runs

    layer = torch.nn.Linear(4, 3)
    monkeypatch.setattr(torch.nn.functional, "linear", fake_linear)
    classes = row_attention.row_classes(layer, max_rows=12)
    assert classes[1] == (0,)
    assert classes[4] == (1,)
    assert classes[6] == (None,)
    assert classes[12] == (2,)
    assert class_runs(classes) == [(1, 3, (0,)), (4, 5, (1,)), (6, 6, (None,)), (7, 9, (1,)), (10, 12, (2,))]


@pytest.mark.parametrize("dtype", list(DTYPES))
@pytest.mark.parametrize("arch", ["qwen2", "llama"])
def test_verify_forward_logits_equal_one_token_steps(arch, dtype):
    engine = TargetEngine(tiny_model(arch, dtype), torch.device("cpu"))
    for index, prompt in enumerate(PROMPTS):
        tokens, reference = one_token_logits(engine, prompt, STEPS)
        for chunk in (2, 5, 8):
            rows = chunked_logits(engine, prompt, tokens, chunk)
            assert differing_rows(rows, reference) == [], f"prompt {index}, {chunk} tokens per forward"


@pytest.mark.parametrize("dtype", list(DTYPES))
@pytest.mark.parametrize("arch", ["qwen2", "llama"])
def test_packed_forward_logits_equal_one_token_steps(arch, dtype):
    engine = TargetEngine(tiny_model(arch, dtype), torch.device("cpu"))
    references = [one_token_logits(engine, prompt, STEPS) for prompt in PROMPTS]
    packed = packed_logits(engine, PROMPTS, [tokens for tokens, _ in references])
    for index, (rows, (_, reference)) in enumerate(zip(packed, references)):
        assert differing_rows(rows, reference) == [], f"prompt {index}"


def test_padded_forward_keeps_only_real_rows():
    engine = TargetEngine(tiny_model("qwen2", "float32"), torch.device("cpu"))
    engine.rows = row_attention.RowRange(4, 6)
    seqs = [engine.prefill(f"pad{i}", prompt) for i, prompt in enumerate(PROMPTS[:2])]
    logits = engine.forward_batch(seqs, [[seqs[0].root], [seqs[1].root, 7]])
    assert [tuple(rows.shape[:1]) for rows in logits] == [(1,), (2,)]
    assert seqs[0].cache.get_seq_length() == len(seqs[0].ids) + 1
    assert seqs[1].cache.get_seq_length() == len(seqs[1].ids) + 2
    single = engine._forward(seqs[0], [5], len(seqs[0].ids) + 1)
    assert single.shape[0] == 1
    assert seqs[0].cache.get_seq_length() == len(seqs[0].ids) + 2


def test_sdpa_forwards_differ_in_bf16():
    """Without row attention the same positions round differently, which is what the tests above catch."""
    engine = TargetEngine(tiny_model(), torch.device("cpu"), batch_invariant=False)
    mismatches = 0
    for prompt in PROMPTS:
        tokens, reference = one_token_logits(engine, prompt, STEPS)
        mismatches += len(differing_rows(chunked_logits(engine, prompt, tokens, 5), reference))
    assert mismatches > 0, "SDPA gave bit-identical logits; the batch-invariance tests above no longer show anything on this machine"


@pytest.mark.slow
def test_smollm2_logits_equal_across_forwards():
    """The same checks on a real model's shapes (SmolLM2-135M, Llama architecture, 3 key/value heads of 9)."""
    from transformers import AutoTokenizer

    from shared.modeling import load_causal_lm

    path = default_model_dir() / "smollm2-135m-instruct"
    if not (path / "config.json").is_file():
        pytest.skip(f"model {path} is not built; run `make models`")
    tokenizer = AutoTokenizer.from_pretrained(path)
    prompts = [tokenizer(text)["input_ids"] for text in ("def fibonacci(n):\n", "The capital of France is", "import numpy as np\n\ndef mean(xs):")]
    engine = TargetEngine(load_causal_lm(str(path), "bfloat16", torch.device("cpu")), torch.device("cpu"))

    references = [one_token_logits(engine, prompt, STEPS) for prompt in prompts]
    for index, (prompt, (tokens, reference)) in enumerate(zip(prompts, references)):
        assert differing_rows(chunked_logits(engine, prompt, tokens, 5), reference) == [], f"prompt {index}, 5 tokens per forward"
    packed = packed_logits(engine, prompts, [tokens for tokens, _ in references])
    for index, (rows, (_, reference)) in enumerate(zip(packed, references)):
        assert differing_rows(rows, reference) == [], f"prompt {index}, packed"


def test_replayed_prefill_equals_decoded_cache():
    """A restarted request's prefill of prompt + streamed output rebuilds the decoded KV bit for bit."""
    engine = TargetEngine(tiny_model(), torch.device("cpu"), prefill_chunk=4)
    prompt = PROMPTS[2]
    decoded = engine.prefill("decoded", prompt)
    generated, _ = decode_one_token_steps(engine, decoded, STEPS)

    replayed = engine.prefill("replayed", prompt + generated, prompt_len=len(prompt))
    assert replayed.ids == decoded.ids
    assert replayed.root == decoded.root
    for layer, (ours, theirs) in enumerate(zip(replayed.cache.layers, decoded.cache.layers)):
        assert torch.equal(ours.keys, theirs.keys), f"layer {layer} keys"
        assert torch.equal(ours.values, theirs.values), f"layer {layer} values"
    next_replayed = engine.forward_batch([replayed], [[replayed.root]])[0]
    next_decoded = engine.forward_batch([decoded], [[decoded.root]])[0]
    assert torch.equal(next_replayed, next_decoded)


def test_one_token_forward_leaves_one_kv_entry():
    engine = TargetEngine(tiny_model(), torch.device("cpu"))
    seq = engine.prefill("one", PROMPTS[0])
    logits = engine.forward_batch([seq], [[seq.root]])[0]
    assert logits.shape == (1, 128)
    assert seq.cache.get_seq_length() == len(PROMPTS[0])


def test_plan_row_count_mismatch_raises():
    model = tiny_model()
    row_attention.install(model)
    plan = [row_attention.Segment(0, 2, prefix=0)]
    with row_attention.attention_plan(plan), pytest.raises(ValueError, match="covers 2 query rows but the forward has 3"):
        model(input_ids=torch.tensor([[1, 2, 3]]))


def test_packed_batch_rejects_tree_masks_with_row_attention():
    model = tiny_model()
    row_attention.install(model)
    batch = PackedBatch(model, [TargetEngine(model, torch.device("cpu")).prefill("p", PROMPTS[0]).cache])
    allowed = [torch.ones(1, len(PROMPTS[0]), dtype=torch.bool)]
    with pytest.raises(ValueError, match="only the default causal rule"):
        batch.forward([[4]], [[len(PROMPTS[0]) - 1]], allowed=allowed, batch_invariant=True)
