"""Tree decode over one shared KV must match decoding every branch on its own."""

import torch
from transformers import DynamicCache

from services.draft.engine import Branch, DraftEngine
from shared.modeling import crop_cache
from tests.tiny_models import tiny_qwen2


def _branch_alone(model, prefix: list[int], k: int) -> tuple[list[int], list[torch.Tensor]]:
    """Greedy-decode k tokens after ``prefix`` with plain causal forwards; return tokens and logits."""
    cache = DynamicCache(config=model.config)
    with torch.inference_mode():
        out = model(input_ids=torch.tensor([prefix]), cache=cache, use_cache=True)
        tokens, logits = [], []
        next_logits = out.logits[0, -1]
        for _ in range(k):
            token = int(torch.argmax(next_logits))
            tokens.append(token)
            logits.append(next_logits)
            out = model(input_ids=torch.tensor([[token]]), cache=cache, use_cache=True)
            next_logits = out.logits[0, -1]
    return tokens, logits


def test_tree_decode_matches_separate_branches():
    model = tiny_qwen2(seed=1)
    engine = DraftEngine(model, torch.device("cpu"))
    prompt = [5, 17, 33, 2, 90, 41, 7]
    glue = [12, 60, 3, 99]  # r, s1, s2, s3
    k = len(glue) - 1
    seq = engine.prefill("r1", prompt)
    base_len = len(prompt)
    build = engine.build_cache(seq, base_len, glue, fanout=[3, 2, 2, 3], k=k)

    assert len(build.branches) == 10
    assert len(seq.ids) == base_len + len(glue), "tree KV must be dropped after the build"
    for branch in build.branches:
        prefix = prompt + glue[: branch.accepted + 1] + [branch.token]
        expected, _ = _branch_alone(model, prefix, k)
        assert branch.tokens == expected, f"branch (j={branch.accepted}, c={branch.token})"


def test_tree_logits_match_separate_decode():
    model = tiny_qwen2(seed=2)
    engine = DraftEngine(model, torch.device("cpu"))
    prompt = [9, 8, 7, 6, 5]
    glue = [1, 2, 3]
    seq = engine.prefill("r2", prompt)
    base_len = len(prompt)
    engine.glue(seq, base_len, glue)
    branches = [Branch(accepted=0, token=40), Branch(accepted=1, token=41), Branch(accepted=2, token=42)]
    cache_len = len(seq.ids)
    positions = [base_len + b.accepted + 1 for b in branches]
    mask = engine.tree_mask(base_len, cache_len, branches, depth=1)
    tree_logits = engine._forward(seq, [b.token for b in branches], positions, mask)
    crop_cache(seq.cache, cache_len)
    for row, branch in enumerate(branches):
        prefix = prompt + glue[: branch.accepted + 1] + [branch.token]
        with torch.inference_mode():
            alone = model(input_ids=torch.tensor([prefix])).logits[0, -1]
        torch.testing.assert_close(tree_logits[row], alone, rtol=1e-4, atol=1e-5)


def test_fork_excludes_rejected_draft():
    model = tiny_qwen2(seed=3)
    engine = DraftEngine(model, torch.device("cpu"))
    prompt = [4, 4, 4]
    seq = engine.prefill("r3", prompt)
    engine.glue(seq, len(prompt), [10, 11, 12])
    top_after_r = seq.candidates[len(prompt)][0]
    glue = [10, top_after_r, 12]
    engine.glue(seq, len(prompt), glue)
    branches = engine.fork(seq, len(prompt), glue, fanout=[2, 1, 4])
    j0 = [b.token for b in branches if b.accepted == 0]
    assert top_after_r not in j0
    assert len(j0) == 2
    assert len([b for b in branches if b.accepted == 2]) == 4


def test_sync_reuses_matching_prefix():
    model = tiny_qwen2(seed=4)
    engine = DraftEngine(model, torch.device("cpu"))
    seq = engine.prefill("r4", [1, 2, 3])
    engine.sync(seq, 3, [4, 5, 6])
    engine.sync(seq, 4, [5, 9])
    assert seq.ids == [1, 2, 3, 4, 5, 9]
    assert len(seq.candidates) == 6
    with torch.inference_mode():
        alone = model(input_ids=torch.tensor([[1, 2, 3, 4, 5, 9]])).logits[0, -1]
    assert seq.candidates[-1][0] == int(torch.argmax(alone))


def _count_forward_tokens(engine: DraftEngine) -> list[int]:
    """Record the number of tokens of every ``engine._forward`` call in the returned list."""
    counts: list[int] = []
    forward = engine._forward

    def counting(seq, tokens, positions, mask=None):
        counts.append(len(tokens))
        return forward(seq, tokens, positions, mask)

    engine._forward = counting
    return counts


TREE_PROMPT = [5, 17, 33, 2, 90, 41, 7]
TREE_GLUE = [12, 60, 3, 99, 30]  # r, s1..s4


def _built(request_id: str, fanout: list[int] | None = None, k: int = 4):
    """Prefill ``TREE_PROMPT`` and build the cache for verifying ``TREE_GLUE``; return the engine, sequence and build."""
    engine = DraftEngine(tiny_qwen2(seed=5), torch.device("cpu"))
    seq = engine.prefill(request_id, TREE_PROMPT)
    build = engine.build_cache(seq, len(TREE_PROMPT), TREE_GLUE, fanout=fanout or [2, 1, 1, 1, 2], k=k)
    return engine, seq, build


def _build_then_sync(pick, reuse: bool):
    """Build a cache, then sync to the speculation of the branch ``pick`` selects; return the engine, sequence, branch and forward sizes."""
    engine, seq, build = _built("r5")
    prompt, glue = TREE_PROMPT, TREE_GLUE
    branch = pick(build.branches)
    if not reuse:
        seq.tree = None
    counts = _count_forward_tokens(engine)
    # The verifier committed r, s1..sj and c, and now verifies the branch's tokens.
    base_len = len(prompt) + branch.accepted + 1
    engine.sync(seq, len(prompt), glue[: branch.accepted + 1] + [branch.token] + branch.tokens)
    return engine, seq, branch, counts, base_len


def _assert_same_sequence(seq, reference) -> None:
    assert seq.ids == reference.ids
    assert seq.candidates == reference.candidates
    for layer, expected in zip(seq.cache.layers, reference.cache.layers):
        torch.testing.assert_close(layer.keys, expected.keys, rtol=1e-4, atol=1e-5)
        torch.testing.assert_close(layer.values, expected.values, rtol=1e-4, atol=1e-5)


def test_sync_after_hit_reuses_tree_rows():
    picks = {
        "rejection at s2": lambda branches: next(b for b in branches if b.accepted == 1),
        "all accepted": lambda branches: next(b for b in branches if b.accepted == 4),
    }
    for label, pick in picks.items():
        engine, seq, branch, counts, base_len = _build_then_sync(pick, reuse=True)
        reference_engine, reference, _, reference_counts, _ = _build_then_sync(pick, reuse=False)
        assert counts == [1], f"{label}: only the branch's last token runs"
        assert reference_counts == [5], label
        _assert_same_sequence(seq, reference)
        assert seq.ids[base_len:] == [branch.token] + branch.tokens, label

        # The next build from the reused rows equals one from a full glue.
        tokens = [branch.token] + branch.tokens
        build = engine.build_cache(seq, base_len, tokens, fanout=[2, 1, 1, 1, 2], k=4)
        expected = reference_engine.build_cache(reference, base_len, tokens, fanout=[2, 1, 1, 1, 2], k=4)
        assert [(b.accepted, b.token, b.tokens) for b in build.branches] == [(b.accepted, b.token, b.tokens) for b in expected.branches], label
        assert build.candidates == expected.candidates, label


def test_sync_after_miss_runs_every_token():
    engine, seq, build = _built("r6")
    prompt, glue = TREE_PROMPT, TREE_GLUE
    missed = next(t for t in range(100) if all(b.token != t for b in build.branches if b.accepted == 2))
    counts = _count_forward_tokens(engine)
    engine.sync(seq, len(prompt), glue[:3] + [missed, 8, 9])
    assert counts == [3]
    assert seq.tree is None
    assert seq.ids == prompt + glue[:3] + [missed, 8, 9]


def test_tree_dropped_when_sequence_changes():
    engine, seq, build = _built("r7")
    prompt, glue = TREE_PROMPT, TREE_GLUE
    assert seq.tree is not None
    branch = next(b for b in build.branches if b.accepted == 4)
    # A draft after the build extends the sequence, so the tree rows no longer sit where the tree put them.
    engine.draft(seq, 2)
    assert seq.tree is None
    # The draft's first token is the top candidate after s4, which is the branch's c.
    assert seq.ids[-1] == branch.token
    counts = _count_forward_tokens(engine)
    engine.sync(seq, len(prompt), glue + [branch.token] + branch.tokens)
    assert counts == [len(branch.tokens)], "the branch's tokens run again instead of coming from the tree"


def test_sync_after_empty_tree_runs_every_token():
    # k = 0 decodes no tree rows, so a branch's c has no KV to reuse.
    engine, seq, build = _built("r8", fanout=[1, 1, 1, 1, 1], k=0)
    prompt, glue = TREE_PROMPT, TREE_GLUE
    branch = build.branches[0]
    counts = _count_forward_tokens(engine)
    engine.sync(seq, len(prompt), glue[: branch.accepted + 1] + [branch.token, 8, 9])
    assert counts == [3]
    assert seq.ids == prompt + glue[: branch.accepted + 1] + [branch.token, 8, 9]
