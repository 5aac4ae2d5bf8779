"""Packed forwards over several KV caches must match running every sequence on its own."""

import pytest
import torch
from transformers import DynamicCache

from services.draft.engine import Branch, DraftEngine
from services.verify.engine import TargetEngine
from shared.modeling import crop_cache
from shared.packing import PackedBatch
from tests.tiny_models import tiny_qwen2

# Packed and separate fp32 forwards differ by rounding only (at most about 1.2e-6 in these tests' logits).
TOLERANCE = {"rtol": 1e-5, "atol": 1e-5}

PROMPTS = [[5, 17, 33, 2, 90, 41, 7], [9, 8], [3, 1, 4, 1, 5, 9, 2, 6, 5, 3, 5, 8, 9, 7, 9], [60, 61, 62, 63]]
NEW_TOKENS = [[11, 12, 13, 14, 15], [20], [30, 31, 32], [40, 41, 42, 43]]


def make_model(seed: int, arch: str = "qwen2", attn: str = "sdpa"):
    model = tiny_qwen2(seed=seed, arch=arch)
    model.set_attn_implementation(attn)
    return model


def prefilled_cache(model, prompt: list[int]) -> DynamicCache:
    cache = DynamicCache(config=model.config)
    if prompt:
        with torch.inference_mode():
            model(input_ids=torch.tensor([prompt]), cache=cache, use_cache=True)
    return cache


def forward_alone(model, cache: DynamicCache, tokens: list[int]) -> torch.Tensor:
    """Return the logits [len(tokens), V] of ``tokens`` appended to ``cache`` by a plain causal forward."""
    start = cache.get_seq_length()
    with torch.inference_mode():
        out = model(
            input_ids=torch.tensor([tokens]),
            position_ids=torch.arange(start, start + len(tokens))[None],
            cache=cache,
            use_cache=True,
        )
    return out.logits[0]


def positions_after(prompts: list[list[int]], tokens: list[list[int]]) -> list[list[int]]:
    return [list(range(len(p), len(p) + len(t))) for p, t in zip(prompts, tokens)]


def assert_logits_match(packed: torch.Tensor, alone: torch.Tensor, label: str) -> None:
    assert packed.shape == alone.shape, label
    torch.testing.assert_close(packed, alone, **TOLERANCE, msg=lambda m: f"{label}: {m}")
    assert torch.equal(packed.argmax(-1), alone.argmax(-1)), label


@pytest.mark.parametrize("arch", ["qwen2", "llama"])
@pytest.mark.parametrize("attn", ["sdpa", "eager"])
def test_packed_forward_matches_separate(arch, attn):
    model = make_model(seed=21, arch=arch, attn=attn)
    caches = [prefilled_cache(model, p) for p in PROMPTS]
    batch = PackedBatch(model, caches)
    assert batch.packed_length == sum(len(p) for p in PROMPTS)
    packed = batch.forward(NEW_TOKENS, positions_after(PROMPTS, NEW_TOKENS))

    for i, cache in enumerate(caches):
        assert cache.get_seq_length() == len(PROMPTS[i]), "building and running the batch must not change the given caches"
        assert batch.appended_count(i) == len(NEW_TOKENS[i])
        alone = forward_alone(model, cache, NEW_TOKENS[i])
        assert_logits_match(packed[i], alone, f"sequence {i}")


def test_packed_forward_with_empty_sequences():
    model = make_model(seed=22)
    prompts = [PROMPTS[0], [], PROMPTS[2], PROMPTS[3]]
    tokens = [[11, 12], [50, 51, 52], [], [40]]
    caches = [prefilled_cache(model, p) for p in prompts]
    batch = PackedBatch(model, caches)
    packed = batch.forward(tokens, positions_after(prompts, tokens))

    assert packed[2].shape == (0, model.config.vocab_size)
    assert batch.appended_count(2) == 0
    for i in (0, 1, 3):
        assert_logits_match(packed[i], forward_alone(model, caches[i], tokens[i]), f"sequence {i}")


def test_forward_without_new_tokens_skips_model():
    model = make_model(seed=22)
    batch = PackedBatch(model, [prefilled_cache(model, p) for p in PROMPTS[:2]])
    length = batch.packed_length
    packed = batch.forward([[], []], [[], []])
    assert [tuple(x.shape) for x in packed] == [(0, model.config.vocab_size)] * 2
    assert batch.packed_length == length
    assert batch.cache.get_seq_length() == length


def test_consecutive_forwards_see_earlier_tokens():
    model = make_model(seed=23, arch="llama")
    caches = [prefilled_cache(model, p) for p in PROMPTS]
    batch = PackedBatch(model, caches)
    first = [t[:2] for t in NEW_TOKENS]
    second = [t[2:] for t in NEW_TOKENS]
    batch.forward(first, positions_after(PROMPTS, first))
    extended = [p + t for p, t in zip(PROMPTS, first)]
    packed = batch.forward(second, positions_after(extended, second))

    for i, cache in enumerate(caches):
        alone = forward_alone(model, cache, NEW_TOKENS[i])
        assert_logits_match(packed[i], alone[len(first[i]) :], f"sequence {i}")


def test_logits_to_keep_per_sequence():
    model = make_model(seed=24)
    caches = [prefilled_cache(model, p) for p in PROMPTS]
    full = PackedBatch(model, caches).forward(NEW_TOKENS, positions_after(PROMPTS, NEW_TOKENS))
    keep = [2, 0, 5, 1]
    kept = PackedBatch(model, caches).forward(NEW_TOKENS, positions_after(PROMPTS, NEW_TOKENS), logits_to_keep=keep)
    last = PackedBatch(model, caches).forward(NEW_TOKENS, positions_after(PROMPTS, NEW_TOKENS), logits_to_keep=1)

    for i in range(len(PROMPTS)):
        rows = min(keep[i], len(NEW_TOKENS[i]))
        assert kept[i].shape[0] == rows, f"sequence {i}"
        torch.testing.assert_close(kept[i], full[i][len(NEW_TOKENS[i]) - rows :], **TOLERANCE)
        torch.testing.assert_close(last[i], full[i][-1:], **TOLERANCE)


def test_append_to_matches_unpacked_cache():
    model = make_model(seed=25)
    caches = [prefilled_cache(model, p) for p in PROMPTS]
    batch = PackedBatch(model, caches)
    batch.forward(NEW_TOKENS, positions_after(PROMPTS, NEW_TOKENS))
    kept_counts = [3, 1, 0, 4]
    for i, cache in enumerate(caches):
        batch.append_to(i, cache, slice(0, kept_counts[i]))

    following = [70, 71, 72]
    for i, cache in enumerate(caches):
        expected_ids = PROMPTS[i] + NEW_TOKENS[i][: kept_counts[i]]
        assert cache.get_seq_length() == len(expected_ids), f"sequence {i}"
        reference = prefilled_cache(model, expected_ids)
        for layer, reference_layer in zip(cache.layers, reference.layers):
            torch.testing.assert_close(layer.keys, reference_layer.keys, **TOLERANCE)
            torch.testing.assert_close(layer.values, reference_layer.values, **TOLERANCE)
        assert_logits_match(forward_alone(model, cache, following), forward_alone(model, reference, following), f"sequence {i}")


def test_append_to_selects_by_order_of_addition():
    model = make_model(seed=26)
    caches = [prefilled_cache(model, p) for p in PROMPTS[:2]]
    batch = PackedBatch(model, caches)
    tokens = [[11, 12], [20, 21, 22]]
    batch.forward(tokens, positions_after(PROMPTS[:2], tokens))
    more = [[13], [23]]
    batch.forward(more, positions_after([p + t for p, t in zip(PROMPTS[:2], tokens)], more))
    assert batch.appended_count(1) == 4

    # Sequence 1's appended tokens are 20, 21, 22, 23; take the 0th and 3rd in the packed cache order.
    selected = DynamicCache(config=model.config)
    batch.append_to(1, selected, [0, 3])
    packed_indices = [len(PROMPTS[0]) + len(PROMPTS[1]) + 2, len(PROMPTS[0]) + len(PROMPTS[1]) + 5 + 1]
    for layer, packed_layer in zip(selected.layers, batch.cache.layers):
        assert torch.equal(layer.keys, packed_layer.keys[:, :, packed_indices])
        assert torch.equal(layer.values, packed_layer.values[:, :, packed_indices])


def test_crop_discards_later_tokens():
    model = make_model(seed=27)
    caches = [prefilled_cache(model, p) for p in PROMPTS]
    batch = PackedBatch(model, caches)
    first = [t[:1] for t in NEW_TOKENS]
    batch.forward(first, positions_after(PROMPTS, first))
    checkpoint = batch.packed_length
    throwaway = [[99, 98]] * len(PROMPTS)
    extended = [p + t for p, t in zip(PROMPTS, first)]
    batch.forward(throwaway, positions_after(extended, throwaway))
    batch.crop(checkpoint)

    assert batch.packed_length == checkpoint
    assert batch.cache.get_seq_length() == checkpoint
    assert [batch.appended_count(i) for i in range(len(PROMPTS))] == [1] * len(PROMPTS)
    rest = [t[1:] for t in NEW_TOKENS]
    packed = batch.forward(rest, positions_after(extended, rest))
    for i, cache in enumerate(caches):
        if rest[i]:
            alone = forward_alone(model, cache, NEW_TOKENS[i])
            assert_logits_match(packed[i], alone[1:], f"sequence {i}")
    with pytest.raises(ValueError, match="starts with"):
        batch.crop(sum(len(p) for p in PROMPTS) - 1)


def test_allowed_with_wrong_shape_raises():
    model = make_model(seed=28)
    batch = PackedBatch(model, [prefilled_cache(model, p) for p in PROMPTS[:2]])
    bad = torch.ones(1, len(PROMPTS[0]), dtype=torch.bool)  # misses the new token's own column
    with pytest.raises(ValueError, match=r"allowed\[0\]"):
        batch.forward([[1], [2]], [[len(PROMPTS[0])], [len(PROMPTS[1])]], allowed=[bad, None])


def tree_reference(engine: DraftEngine, seq, base_len: int, branches: list[Branch], k: int) -> list[torch.Tensor]:
    """Greedy-decode the tree one sequence at a time as ``DraftEngine.tree_decode`` does; return the logits per depth."""
    cache_len = len(seq.ids)
    inputs = [branch.token for branch in branches]
    logits_per_depth = []
    for depth in range(1, k + 1):
        positions = [base_len + branch.accepted + depth for branch in branches]
        mask = engine.tree_mask(base_len, cache_len, branches, depth)
        logits = engine._forward(seq, inputs, positions, mask)
        logits_per_depth.append(logits)
        inputs = torch.argmax(logits, dim=-1).tolist()
    crop_cache(seq.cache, cache_len)
    return logits_per_depth


def test_glue_and_tree_match_draft_engine():
    model = make_model(seed=29)
    engine = DraftEngine(model, torch.device("cpu"))
    prompts = PROMPTS[:3]
    glues = [[12, 60, 3, 99], [7, 7, 8, 1], [44, 45, 46, 47]]
    fanouts = [[3, 2, 2, 3], [1, 0, 2, 1], [2, 2, 0, 0]]
    k = 3

    # Reference: the draft engine on each sequence alone.
    built = [engine.prefill(f"built{i}", p) for i, p in enumerate(prompts)]
    builds = [engine.build_cache(seq, len(p), g, fanout=f, k=k) for seq, p, g, f in zip(built, prompts, glues, fanouts)]
    alone = [engine.prefill(f"alone{i}", p) for i, p in enumerate(prompts)]
    glue_logits = [engine._forward(seq, g, positions_after([p], [g])[0]) for seq, p, g in zip(alone, prompts, glues)]
    for seq, g in zip(alone, glues):
        seq.ids.extend(g)
    branches = [[Branch(accepted=b.accepted, token=b.token) for b in build.branches] for build in builds]
    tree_logits = [tree_reference(engine, seq, len(p), br, k) for seq, p, br in zip(alone, prompts, branches)]

    # Packed: glue for every sequence in one forward, then one forward per tree depth.
    packed_seqs = [engine.prefill(f"packed{i}", p) for i, p in enumerate(prompts)]
    batch = PackedBatch(model, [seq.cache for seq in packed_seqs])
    packed_glue = batch.forward(glues, positions_after(prompts, glues))
    for i in range(len(prompts)):
        assert_logits_match(packed_glue[i], glue_logits[i], f"glue of sequence {i}")

    glued_length = batch.packed_length
    cache_lens = [len(p) + len(g) for p, g in zip(prompts, glues)]
    inputs = [[b.token for b in br] for br in branches]
    decoded: list[list[list[int]]] = [[[] for _ in br] for br in branches]
    for depth in range(1, k + 1):
        positions = [[len(p) + b.accepted + depth for b in br] for p, br in zip(prompts, branches)]
        allowed = [engine.tree_mask(len(p), n, br, depth)[0, 0] == 0 for p, n, br in zip(prompts, cache_lens, branches)]
        logits = batch.forward(inputs, positions, allowed=allowed)
        for i in range(len(prompts)):
            assert_logits_match(logits[i], tree_logits[i][depth - 1], f"tree depth {depth} of sequence {i}")
        inputs = [torch.argmax(x, dim=-1).tolist() for x in logits]
        for i, tokens in enumerate(inputs):
            for b, token in enumerate(tokens):
                decoded[i][b].append(token)
    for i, build in enumerate(builds):
        assert decoded[i] == [b.tokens for b in build.branches], f"branch tokens of sequence {i}"

    # Drop the tree, then write the glue back into each sequence's own cache.
    batch.crop(glued_length)
    following = [5, 6]
    for i, seq in enumerate(packed_seqs):
        batch.append_to(i, seq.cache)
        assert seq.cache.get_seq_length() == cache_lens[i]
        expected = forward_alone(model, alone[i].cache, following)
        assert_logits_match(forward_alone(model, seq.cache, following), expected, f"after write-back of sequence {i}")


def test_forward_batch_matches_forward():
    model = make_model(seed=30)
    packed_engine = TargetEngine(model, torch.device("cpu"))
    single_engine = TargetEngine(model, torch.device("cpu"))
    prompts = PROMPTS + [[1, 2]]
    tokens = NEW_TOKENS + [[3]]
    packed_seqs = [packed_engine.prefill(f"p{i}", p) for i, p in enumerate(prompts)]
    single_seqs = [single_engine.prefill(f"s{i}", p) for i, p in enumerate(prompts)]

    packed = packed_engine.forward_batch(packed_seqs, tokens)
    for i, (packed_seq, single_seq) in enumerate(zip(packed_seqs, single_seqs)):
        alone = single_engine._forward(single_seq, tokens[i], len(single_seq.ids))
        assert_logits_match(packed[i], alone, f"sequence {i}")
        assert packed_seq.cache.get_seq_length() == single_seq.cache.get_seq_length(), f"sequence {i}"
        following = [7, 8]
        assert_logits_match(
            forward_alone(model, packed_seq.cache, following),
            forward_alone(model, single_seq.cache, following),
            f"after sequence {i}",
        )


def test_forward_batch_single_sequence_skips_packing(monkeypatch):
    model = make_model(seed=31)
    engine = TargetEngine(model, torch.device("cpu"))
    seq = engine.prefill("one", PROMPTS[0])
    reference = TargetEngine(model, torch.device("cpu"))
    reference_seq = reference.prefill("ref", PROMPTS[0])

    def no_packing(*args, **kwargs):
        raise AssertionError("one sequence must not be packed")

    monkeypatch.setattr("services.verify.engine.PackedBatch", no_packing)
    (logits,) = engine.forward_batch([seq], [NEW_TOKENS[0]])
    assert torch.equal(logits, reference._forward(reference_seq, NEW_TOKENS[0], len(reference_seq.ids)))
    assert seq.cache.get_seq_length() == len(PROMPTS[0]) - 1 + len(NEW_TOKENS[0])
