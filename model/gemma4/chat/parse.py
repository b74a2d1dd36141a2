"""Split generated model text into thinking, answer text and tool calls, whole or while it streams.

What the model writes after the prompt: optionally a thought block ``<|channel>thought\\n...<channel|>``,
answer text, any number of ``<|tool_call>call:NAME{...}<tool_call|>`` calls, and a stop token (``<turn|>``,
``<eos>``, or ``<|tool_response>`` when it hands over to a tool). Both generation prompts end outside any
block (the large template's pre-filled empty thought is already closed), so parsing always starts in
answer text.

One state machine serves both entry points: ``StreamParser`` takes text in arbitrary pieces and holds
back anything that might be the start of a marker until it is decided, and ``parse`` feeds it the whole
text, so the streamed deltas always add up to the parsed result. Malformed model output never raises
and is never dropped: it is kept as text and reported as an error event (``errors``). That covers a
call that does not parse or never closes, a call longer than ``max_tool_call_chars`` (abandoned into
answer text, parsing goes on), a closing marker with nothing open, and a stop marker with text after
it. A stop marker that ends the text is the generation's end and is dropped; one followed by more text
did not stop generation (the request ignored EOS or chose its own stop tokens), so it is kept as text
of the block it is in (inside a call it cuts the call off first) and parsing goes on. The streaming
parser holds a stop marker back until it knows which.
"""

from dataclasses import dataclass, field
from typing import Any, Literal

from gemma4.chat.syntax import ToolCallParseError, parse_call
from gemma4.special_tokens import (
    CHANNEL_END,
    CHANNEL_START,
    EOS,
    TOOL_CALL_END,
    TOOL_CALL_START,
    TOOL_RESPONSE_START,
    TURN_END,
)


@dataclass(frozen=True)
class ToolCall:
    """One function call written by the model."""

    name: str
    arguments: dict[str, Any]


@dataclass(frozen=True)
class ParsedOutput:
    """A whole generation, split up; ``thinking`` is None when the model opened no thought block."""

    thinking: str | None
    content: str
    tool_calls: list[ToolCall] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)


@dataclass(frozen=True)
class ChatDelta:
    """One streaming event: a piece of thinking or answer text, a completed tool call, or a parse error."""

    kind: Literal["thinking", "content", "tool_call", "error"]
    text: str = ""
    tool_call: ToolCall | None = None


_THOUGHT_LABEL = "thought\n"
_STOPS = (TURN_END.text, EOS.text, TOOL_RESPONSE_START.text)
# Markers each state reacts to; anything else is plain text of that state.
_MARKERS: dict[str, tuple[str, ...]] = {
    "content": (CHANNEL_START.text, TOOL_CALL_START.text, CHANNEL_END.text, TOOL_CALL_END.text, *_STOPS),
    "thinking": (CHANNEL_END.text, *_STOPS),
    "call": (TOOL_CALL_END.text, *_STOPS),
}


DEFAULT_MAX_TOOL_CALL_CHARS = 8192


class StreamParser:
    """Incremental parser: ``feed`` text pieces as they are generated, then ``finish`` once.

    ``max_tool_call_chars`` bounds an open tool call's body: one that grows past it without closing
    is abandoned into answer text (with an error event) instead of holding back the rest of the stream.
    """

    def __init__(self, max_tool_call_chars: int = DEFAULT_MAX_TOOL_CALL_CHARS) -> None:
        if not isinstance(max_tool_call_chars, int) or isinstance(max_tool_call_chars, bool) or max_tool_call_chars < 1:
            raise ValueError(f"max_tool_call_chars must be a positive integer, got {max_tool_call_chars!r}")
        self.max_tool_call_chars = max_tool_call_chars
        self._state: Literal["content", "thinking", "call"] = "content"
        self._pending = ""  # text not yet decided: a possible marker prefix
        self._call_body = ""
        self._label = ""  # start of a thought block, until it is known whether it is the "thought\n" label
        self._label_pending = False
        self._thinking_started = False

    @property
    def thinking_started(self) -> bool:
        """Whether the model has opened a thought block (an empty one still counts)."""
        return self._thinking_started

    def feed(self, delta: str) -> list[ChatDelta]:
        """Events for the text decidable so far."""
        self._pending += delta
        return self._drain(final=False)

    def finish(self) -> list[ChatDelta]:
        """Events for everything still held back; an unterminated tool call is reported as an error."""
        events = self._drain(final=True)
        if self._state == "call":
            events += self._abandon_call("unterminated tool call")
        elif self._state == "thinking":
            events += self._flush_label()
        return events

    def _drain(self, *, final: bool) -> list[ChatDelta]:
        events: list[ChatDelta] = []
        while True:
            markers = _MARKERS[self._state]
            found = min(
                ((index, marker) for marker in markers if (index := self._pending.find(marker)) >= 0),
                default=None,
            )
            # Text before the next marker, or all but a possible marker prefix, is decided.
            decided = found[0] if found else len(self._pending) - (0 if final else _held_back(self._pending, markers))
            room = self.max_tool_call_chars - len(self._call_body)
            if self._state == "call" and decided > room:
                # Cut at the bound whatever the chunking, and parse the rest again as answer text.
                self._call_body += self._pending[:room]
                self._pending = self._pending[room:]
                events += self._abandon_call(f"tool call longer than {self.max_tool_call_chars} characters")
                continue
            events += self._text(self._pending[:decided])
            self._pending = self._pending[decided:]
            if found is None:
                return events
            marker = found[1]
            ends_text = len(self._pending) == len(marker)
            if marker in _STOPS and ends_text and not final:
                return events  # the end of the generation if nothing follows, text if something does
            self._pending = self._pending[len(marker):]
            events += self._on_stop(marker, ends_text) if marker in _STOPS else self._on_marker(marker)

    def _on_stop(self, marker: str, ends_text: bool) -> list[ChatDelta]:
        if self._state == "call":
            if not ends_text:
                self._pending = marker + self._pending  # answer text once the call is cut off
            return self._abandon_call(f"tool call cut off by {marker}")
        if ends_text:
            return []
        error = f"{marker} inside the generated text did not end it (generation went on); kept as text"
        return [*self._text(marker), ChatDelta("error", error)]

    def _text(self, text: str) -> list[ChatDelta]:
        if not text:
            return []
        if self._state == "content":
            return [ChatDelta("content", text)]
        if self._state == "call":
            self._call_body += text
            return []
        if not self._label_pending:
            return [ChatDelta("thinking", text)]
        self._label += text
        if self._label.startswith(_THOUGHT_LABEL):
            self._label = self._label[len(_THOUGHT_LABEL):]
            return self._flush_label()
        if not _THOUGHT_LABEL.startswith(self._label):
            return self._flush_label()
        return []

    def _flush_label(self) -> list[ChatDelta]:
        text, self._label, self._label_pending = self._label, "", False
        return [ChatDelta("thinking", text)] if text else []

    def _on_marker(self, marker: str) -> list[ChatDelta]:
        if marker == CHANNEL_START.text:
            self._state = "thinking"
            self._thinking_started = True
            self._label_pending = True
            return []
        if marker == CHANNEL_END.text and self._state == "thinking":
            events = self._flush_label()
            self._state = "content"
            return events
        if marker == TOOL_CALL_START.text:
            self._state = "call"
            return []
        if marker == TOOL_CALL_END.text and self._state == "call":
            return self._close_call()
        return [ChatDelta("content", marker), ChatDelta("error", f"stray {marker} with nothing open; kept as text")]

    def _close_call(self) -> list[ChatDelta]:
        self._state = "content"
        try:
            name, arguments = parse_call(self._call_body)
        except ToolCallParseError as error:
            raw = TOOL_CALL_START.text + self._call_body + TOOL_CALL_END.text
            self._call_body = ""
            return [ChatDelta("content", raw), ChatDelta("error", str(error))]
        self._call_body = ""
        return [ChatDelta("tool_call", tool_call=ToolCall(name, arguments))]

    def _abandon_call(self, reason: str) -> list[ChatDelta]:
        """Give up on the open call: its raw text becomes answer text, and parsing goes on there."""
        self._state = "content"
        raw = TOOL_CALL_START.text + self._call_body
        self._call_body = ""
        return [ChatDelta("content", raw), ChatDelta("error", f"{reason}: {raw!r}")]


def _held_back(text: str, markers: tuple[str, ...]) -> int:
    """Length of the longest end of ``text`` that could still grow into one of ``markers``."""
    for length in range(min(len(text), max(len(marker) for marker in markers) - 1), 0, -1):
        tail = text[-length:]
        if any(marker.startswith(tail) for marker in markers):
            return length
    return 0


def parse(text: str, *, max_tool_call_chars: int = DEFAULT_MAX_TOOL_CALL_CHARS) -> ParsedOutput:
    """Split one complete generation (the text after the prompt)."""
    parser = StreamParser(max_tool_call_chars)
    events = parser.feed(text) + parser.finish()
    return ParsedOutput(
        thinking="".join(e.text for e in events if e.kind == "thinking") if parser.thinking_started else None,
        content="".join(e.text for e in events if e.kind == "content"),
        tool_calls=[e.tool_call for e in events if e.tool_call is not None],
        errors=[e.text for e in events if e.kind == "error"],
    )
