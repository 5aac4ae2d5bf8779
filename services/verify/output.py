"""Incremental detokenization and stop handling for one request.

Tokens are appended one at a time, so a step that commits several tokens is
cut exactly at the first token that finishes the request (EOS, a stop token
id, a stop string or ``max_tokens``). Text that could still turn into a stop
string, or that ends inside a multi-byte character, is held back until it is
safe to send.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from shared.protocol import SamplingParams


@dataclass
class Finish:
    reason: str  # "stop" or "length"
    stop_reason: str | int | None = None


@dataclass
class OutputState:
    tokenizer: object
    params: SamplingParams
    eos_ids: set[int]
    prompt_len: int
    max_model_len: int
    token_ids: list[int] = field(default_factory=list)
    text: str = ""
    sent_chars: int = 0
    finish: Finish | None = None

    def __post_init__(self) -> None:
        self._holdback = max((len(s) for s in self.params.stop), default=1) - 1

    def append(self, token: int) -> bool:
        """Add one committed token; return True when the request is finished."""
        if self.finish is not None:
            raise RuntimeError("token appended after the request finished")
        self.token_ids.append(token)
        if token in self.params.stop_token_ids:
            self.finish = Finish("stop", token)
            return True
        if token in self.eos_ids and not self.params.ignore_eos:
            self.finish = Finish("stop", None)
            return True
        self.text = self.tokenizer.decode(self.token_ids, skip_special_tokens=True)
        if self.params.stop:
            # A new stop string can only end inside the text this token added.
            search_from = max(0, self.sent_chars - self._holdback - 1)
            hits = [(self.text.find(s, search_from), s) for s in self.params.stop]
            hits = [(index, s) for index, s in hits if index >= 0]
            if hits:
                index, stop = min(hits)
                self.text = self.text[:index]
                self.finish = Finish("stop", stop)
                return True
        if len(self.token_ids) >= self.params.max_tokens or self.prompt_len + len(self.token_ids) >= self.max_model_len:
            self.finish = Finish("length")
            return True
        return False

    def take_delta(self) -> str:
        """Return the text that is safe to send now and mark it sent."""
        end = len(self.text)
        if self.finish is None:
            end -= self._holdback
            # An incomplete UTF-8 sequence decodes to U+FFFD; wait for the rest of it.
            while end > self.sent_chars and self.text[end - 1] == "\ufffd":
                end -= 1
        if end <= self.sent_chars:
            return ""
        delta = self.text[self.sent_chars : end]
        self.sent_chars = end
        return delta
