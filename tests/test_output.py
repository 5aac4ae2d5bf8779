"""Stop handling and incremental detokenization of one request's output."""

import pytest

from services.verify.output import OutputState
from shared.protocol import SamplingParams
from tests.tiny_models import EOS_ID, tiny_tokenizer


def make_state(**sampling) -> OutputState:
    return OutputState(tiny_tokenizer(), SamplingParams(**sampling), {EOS_ID}, prompt_len=3, max_model_len=100)


def feed(state: OutputState, tokens: list[int]) -> tuple[int, str]:
    """Append tokens until one finishes the request; return how many were taken and the streamed text."""
    streamed = ""
    for index, token in enumerate(tokens):
        done = state.append(token)
        streamed += state.take_delta()
        if done:
            return index + 1, streamed
    return len(tokens), streamed


def test_max_tokens_is_exact():
    state = make_state(max_tokens=4)
    taken, text = feed(state, [1, 2, 3, 4, 5, 6])
    assert taken == 4
    assert state.finish.reason == "length"
    assert text == "w1 w2 w3 w4"


def test_eos_stops_and_is_not_in_text():
    state = make_state(max_tokens=10)
    taken, text = feed(state, [1, 2, EOS_ID, 3])
    assert taken == 3
    assert state.finish.reason == "stop"
    assert state.finish.stop_reason is None
    assert text == "w1 w2"
    assert state.token_ids == [1, 2, EOS_ID]


def test_ignore_eos_continues():
    state = make_state(max_tokens=4, ignore_eos=True)
    taken, _ = feed(state, [1, EOS_ID, 2, 3, 4])
    assert taken == 4
    assert state.finish.reason == "length"


def test_stop_token_id():
    state = make_state(max_tokens=10, stop_token_ids=[7])
    taken, _ = feed(state, [1, 7, 2])
    assert taken == 2
    assert state.finish.stop_reason == 7


def test_stop_string_cuts_inside_a_block():
    state = make_state(max_tokens=20, stop=["w3 w4"])
    taken, text = feed(state, [1, 2, 3, 4, 5, 6])
    assert taken == 4
    assert state.finish.reason == "stop"
    assert state.finish.stop_reason == "w3 w4"
    assert text == "w1 w2 "


def test_stop_string_is_never_streamed_in_part():
    state = make_state(max_tokens=20, stop=["w3 w9"])
    streamed = []
    for token in [1, 2, 3]:
        state.append(token)
        streamed.append(state.take_delta())
    assert "w3" not in "".join(streamed)
    state.append(5)
    streamed.append(state.take_delta())
    assert "".join(streamed) == "w1 w2 w3 w5"[: len("".join(streamed))]


def test_earliest_of_several_stop_strings_wins():
    state = make_state(max_tokens=20, stop=["w5", "w2 w3"])
    feed(state, [1, 2, 3, 4, 5])
    assert state.finish.stop_reason == "w2 w3"
    assert state.text == "w1 "


def test_context_length_limit():
    state = OutputState(tiny_tokenizer(), SamplingParams(max_tokens=50), {EOS_ID}, prompt_len=8, max_model_len=10)
    taken, _ = feed(state, [1, 2, 3, 4])
    assert taken == 2
    assert state.finish.reason == "length"


def test_append_after_finish_raises():
    state = make_state(max_tokens=1)
    state.append(1)
    with pytest.raises(RuntimeError):
        state.append(2)
