"""Incremental detokenization for streaming, with exact stop-string cuts.

Decoding token by token breaks multi-byte UTF-8 characters that byte-fallback tokens spell across
several tokens, and some tokenizers change earlier text when later tokens arrive. So the text is
re-decoded from the previous release point, and new text is released only when it no longer
ends in an incomplete character.

Stop strings (vLLM's semantics): the first `min_tokens` output tokens are generated whatever they
say, so a stop string counts only if its match ends in text decoded from output token
`min_tokens + 1` on (it may start earlier). The first match that counts cuts `text` where it starts
and ends the request; a match that did not count is never found again. While a stop string could
still be forming, up to (longest stop string - 1) characters are held back from the stream, so the
streamed text is always a prefix of the final text and never contains a stop string, not even in part.
"""

from __future__ import annotations

from typing import Protocol, Sequence

_INCOMPLETE = "\ufffd"


class Decoder(Protocol):
    def decode(self, ids: Sequence[int], skip_special_tokens: bool = False) -> str: ...


class IncrementalDetokenizer:
    def __init__(self, tokenizer: Decoder, stop: tuple[str, ...] = (), min_tokens: int = 0) -> None:
        self.tokenizer = tokenizer
        self.stop = stop
        self.min_tokens = min_tokens
        self._hold = max((len(s) for s in stop), default=1) - 1
        self._tokens: list[int] = []
        self._prefix_offset = 0
        self._read_offset = 0
        self.text = ""  # all decoded output text (cut at a stop string once one is found)
        self._emitted = 0  # characters of `text` already released to the stream
        self.stopped_on: str | None = None

    @property
    def streamed_text(self) -> str:
        """The text released by `take_delta` so far: a prefix of the final text."""
        return self.text[: self._emitted]

    def add_token(self, token: int) -> None:
        """Decode one more output token into `text`; set `stopped_on` if a stop string completed."""
        if self.stopped_on is not None:
            return
        self._tokens.append(token)
        prefix_text = self.tokenizer.decode(self._tokens[self._prefix_offset : self._read_offset])
        full_text = self.tokenizer.decode(self._tokens[self._prefix_offset :])
        if len(full_text) <= len(prefix_text) or full_text.endswith(_INCOMPLETE):
            return  # wait for the rest of a multi-byte character
        new_text = full_text[len(prefix_text) :]
        self._prefix_offset, self._read_offset = self._read_offset, len(self._tokens)
        self._append(new_text)

    def _append(self, new_text: str) -> None:
        checked = len(self.text)  # every match ending at or before here was looked at already
        self.text += new_text
        if not self.stop or len(self._tokens) <= self.min_tokens:
            return
        found = [(i, s) for s in self.stop if (i := self.text.find(s, max(0, checked - len(s) + 1))) >= 0]
        if found:
            cut, stop = min(found)
            self.text = self.text[:cut]
            self.stopped_on = stop

    def flush(self) -> None:
        """At the end of a request: release a trailing incomplete character as U+FFFD."""
        if self.stopped_on is None and self._read_offset < len(self._tokens):
            prefix_text = self.tokenizer.decode(self._tokens[self._prefix_offset : self._read_offset])
            full_text = self.tokenizer.decode(self._tokens[self._prefix_offset :])
            self._read_offset = len(self._tokens)
            self._append(full_text[len(prefix_text) :])

    def take_delta(self, finished: bool) -> str:
        """Text not yet streamed; while running, a possible stop-string prefix is held back."""
        end = len(self.text) if finished or self.stopped_on is not None else max(self._emitted, len(self.text) - self._hold)
        delta = self.text[self._emitted : end]
        self._emitted = end
        return delta
