"""The draft's sub-vocabulary output layer: same drafts as a full layer masked to the subset, and growth."""

import copy

import torch

from services.draft.engine import DraftEngine
from services.draft.vocab import VocabSubset
from shared.protocol import ProposalParams
from tests.tiny_models import TINY_VOCAB, tiny_qwen2

PROMPT = [5, 17, 100, 2, 90, 41, 7]


def masked_full_model(model, keep: set[int]):
    """Return a copy of ``model`` whose logits outside ``keep`` are -1e9, over the whole vocabulary."""
    masked = copy.deepcopy(model)
    head = masked.get_output_embeddings()
    layer = torch.nn.Linear(head.in_features, head.out_features, bias=True)
    with torch.no_grad():
        layer.weight.copy_(head.weight)
        layer.bias.fill_(-1e9)
        layer.bias[sorted(keep)] = 0.0
    masked.set_output_embeddings(layer)
    return masked


def test_subset_drafts_equal_masked_full_layer():
    model = tiny_qwen2(seed=3)
    subset_model = copy.deepcopy(model)
    vocab = VocabSubset(subset_model, 48, keep_ids=[127], quantize=False)
    engine = DraftEngine(subset_model, torch.device("cpu"), vocab)
    seq = engine.prefill("a", PROMPT)
    glue = [12, 60, 3, 99, 30]
    build = engine.build_cache(seq, len(PROMPT), glue, fanout=[2, 2, 1, 1, 2], k=4)

    reference_engine = DraftEngine(masked_full_model(model, vocab.known), torch.device("cpu"))
    reference_seq = reference_engine.prefill("a", PROMPT)
    reference = reference_engine.build_cache(reference_seq, len(PROMPT), glue, fanout=[2, 2, 1, 1, 2], k=4)

    assert [(b.accepted, b.token, b.tokens) for b in build.branches] == [(b.accepted, b.token, b.tokens) for b in reference.branches]
    assert build.candidates == reference.candidates
    assert all(token in vocab.known for branch in build.branches for token in branch.tokens)


def test_subset_grows_with_request_tokens():
    model = tiny_qwen2(seed=3)
    vocab = VocabSubset(model, 32, keep_ids=[127], quantize=False)
    assert vocab.known == set(range(32)) | {127}
    engine = DraftEngine(model, torch.device("cpu"), vocab)
    seq = engine.prefill("b", PROMPT)
    assert {100, 90, 41} <= vocab.known
    assert model.get_output_embeddings().out_features == len(vocab.known)
    engine.sync(seq, len(PROMPT), [120, 121])
    assert {120, 121} <= vocab.known
    assert seq.ids == PROMPT + [120, 121]
    # Columns list the main layer's ids in order, then the ids added since, in the order they joined.
    expected_ids = sorted(set(range(32)) | {127}) + sorted({100, 90, 41, 5, 2, 17, 7} - set(range(32))) + [120, 121]
    assert vocab.to_token_ids(torch.arange(len(vocab.known))).tolist() == expected_ids


def test_added_tokens_score_like_full_layer():
    model = tiny_qwen2(seed=3)
    full_head = copy.deepcopy(model.get_output_embeddings())
    vocab = VocabSubset(model, 32, keep_ids=[], quantize=False)
    vocab.add(model, [100, 40, 100])
    vocab.add(model, [77])
    hidden = torch.randn(3, full_head.in_features)
    with torch.no_grad():
        logits = model.get_output_embeddings()(hidden)
        expected = full_head(hidden)[:, vocab.ids]
    assert vocab.ids.tolist() == list(range(32)) + [40, 100, 77]
    assert torch.allclose(logits, expected, atol=1e-5)


def test_full_side_layer_rebuilds_main_layer(monkeypatch):
    monkeypatch.setattr("services.draft.vocab.MAX_ADDED_ROWS", 2)
    model = tiny_qwen2(seed=3)
    vocab = VocabSubset(model, 32, keep_ids=[], quantize=True)
    vocab.add(model, [50, 60])
    assert vocab.added_ids == [50, 60]
    vocab.add(model, [45])
    assert vocab.added_ids == []
    assert vocab.ids.tolist() == list(range(32)) + [45, 50, 60]
    assert model.get_output_embeddings().out_features == 35
    assert not vocab.add(model, [45, 60])


def test_sampled_proposals_stay_in_subset():
    model = tiny_qwen2(seed=4)
    vocab = VocabSubset(model, 40, keep_ids=[], quantize=True)
    engine = DraftEngine(model, torch.device("cpu"), vocab)
    seq = engine.prefill("c", PROMPT)
    seq.proposal = ProposalParams(temperature=1.0, seed=2, saguaro_c=0.5, top_f=[2, 2, 2], support=16)
    tokens, proposals = engine.draft(seq, 3)
    assert len(tokens) == 3
    for token, proposal in zip(tokens, proposals):
        assert token in vocab.known
        assert token in proposal.ids
        assert set(proposal.ids) <= vocab.known
    assert len(vocab.known) < TINY_VOCAB
