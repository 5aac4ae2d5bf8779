"""Backup speculation: prompt lookup and the choice between backups."""

import pytest

from services.verify.backup import BackupChooser, ngram_propose


@pytest.mark.parametrize(
    "tokens, k, expected",
    [
        ([1, 2, 3, 4, 9, 1, 2, 3], 3, [4, 9, 1]),  # suffix [1, 2, 3] occurred at the start
        ([1, 2, 3, 4, 9, 2, 3], 2, [4, 9]),  # the longest suffix with a match is [2, 3]
        ([5, 6, 7, 8], 3, []),  # no suffix of length >= 2 occurred before
        ([1, 2, 7, 1, 2, 8, 1, 2], 1, [8]),  # the most recent occurrence wins
        ([3, 3], 4, []),  # too short to match a 2-token suffix earlier
        ([4, 4, 4, 4], 2, [4]),  # the continuation is cut at the end of the sequence
    ],
)
def test_ngram_propose(tokens, k, expected):
    assert ngram_propose(tokens, k) == expected


def test_chooser_prefers_jit_alone():
    chooser = BackupChooser()
    assert chooser.choose(batch_size=1, ngram_found=False) == "jit"


def test_chooser_avoids_slow_batched_jit():
    chooser = BackupChooser()
    for _ in range(50):
        chooser.observe_jit(8, 2.0)  # batched drafts of 8 requests that take 2 s
        chooser.observe_jit(1, 0.2)
    assert chooser.choose(batch_size=8, ngram_found=True) == "ngram"
    assert chooser.choose(batch_size=8, ngram_found=False) == "none"
    assert chooser.choose(batch_size=1, ngram_found=False) == "jit"


def test_chooser_keeps_cheap_batched_jit():
    chooser = BackupChooser()
    for _ in range(50):
        chooser.observe_jit(8, 0.25)
        chooser.observe_jit(1, 0.2)
        chooser.observe_verify(0.6)
    # 3 tokens in 0.85 s beat 1.5 tokens in 0.6 s.
    assert chooser.choose(batch_size=8, ngram_found=True) == "jit"


def test_chooser_follows_measurements():
    chooser = BackupChooser()
    for _ in range(100):
        chooser.observe_jit(1, 2.0)  # a slow draft
        chooser.observe_verify(0.4)
        chooser.observe_tokens("ngram", 2)
    assert chooser.choose(batch_size=1, ngram_found=True) == "ngram"
    assert chooser.rate("jit", 1) < chooser.rate("ngram", 1)


def test_miss_outcome_follows_the_backup():
    chooser = BackupChooser()
    for _ in range(50):
        chooser.observe_jit(1, 0.25)
        chooser.observe_tokens("jit", 4)
        chooser.observe_tokens("none", 1)
    # A JIT backup commits what any drafted step commits, the caller's estimate.
    tokens, stall = chooser.miss_outcome(1, 3.4, "jit")
    assert tokens == pytest.approx(3.4)
    assert stall == pytest.approx(0.25, abs=0.01)
    assert chooser.miss_outcome(1, 3.4, "none") == (pytest.approx(1.0, abs=0.05), 0.0)


def test_miss_outcome_weighs_ngram_matches():
    chooser = BackupChooser()
    for _ in range(200):
        chooser.observe_jit(1, 0.25)
        chooser.observe_verify(0.4)
        chooser.observe_tokens("ngram", 3)
        chooser.observe_tokens("none", 1)
    for lookup in range(200):
        chooser.observe_ngram_lookup(lookup % 10 < 3)
    found = chooser.ngram_found.value
    assert found == pytest.approx(0.3, abs=0.1)
    # With a match, the free n-gram draft (3 tokens in 0.4 s) beats the JIT draft (3.4 in 0.65 s).
    # Without one, the JIT draft beats a plain step (1 token in 0.4 s).
    assert chooser.choose(1, ngram_found=True) == "ngram"
    assert chooser.choose(1, ngram_found=False) == "jit"
    tokens, stall = chooser.miss_outcome(1, 3.4)
    assert tokens == pytest.approx(found * 3.0 + (1 - found) * 3.4, rel=0.01)
    assert stall == pytest.approx((1 - found) * 0.25, rel=0.02)
    # A configured n-gram backup verifies the root alone when no match turns up.
    tokens, stall = chooser.miss_outcome(1, 3.4, "ngram")
    assert tokens == pytest.approx(found * 3.0 + (1 - found) * 1.0, rel=0.01)
    assert stall == 0.0