"""Gemma's own value syntax, used inside tool declarations, tool calls and tool responses.

It is not JSON: keys are bare (``city:``), strings are delimited by the ``<|"|>`` token (so they may hold
quotes, colons, braces and newlines unescaped), and the rest is JSON-like (numbers, ``true``/``false``,
nested ``{...}`` and ``[...]``). Formatting follows the official chat template's ``format_argument``
macro exactly, including its Jinja quirks (case-insensitive key order, Python ``None`` printed as
``None``), because the renderer must reproduce the template byte for byte. Parsing is a small
recursive-descent reader; rewriting the text to JSON with regexes breaks on strings that contain
delimiters.
"""

import re
from collections.abc import Iterable, Mapping
from typing import Any

from gemma4.special_tokens import STRING_DELIMITER

QUOTE = STRING_DELIMITER.text


class ToolCallParseError(ValueError):
    """A tool call written by the model does not follow Gemma's call syntax."""


def dictsort(mapping: Mapping[Any, Any]) -> list[tuple[Any, Any]]:
    """Items ordered like Jinja's ``dictsort`` filter: by key, strings compared case-insensitively."""
    return sorted(mapping.items(), key=lambda item: item[0].lower() if isinstance(item[0], str) else item[0])


def is_sequence(value: Any) -> bool:
    """Jinja's ``is sequence`` test (anything sized and indexable), which the template relies on."""
    return hasattr(value, "__len__") and hasattr(value, "__getitem__")


def quote(text: Any) -> str:
    """A string value between ``<|"|>`` delimiters."""
    return f"{QUOTE}{text}{QUOTE}"


def quote_all(items: Iterable[Any]) -> str:
    """A ``[...]`` list of quoted names, as the template writes ``required`` lists."""
    return "[" + ",".join(quote(item) for item in items) + "]"


def format_value(value: Any, *, escape_keys: bool) -> str:
    """One value in Gemma syntax (the template's ``format_argument``); object keys quoted if ``escape_keys``."""
    if isinstance(value, str):
        return quote(value)
    if value is True or value is False:
        return "true" if value else "false"
    if isinstance(value, Mapping):
        fields = (
            f"{quote(key) if escape_keys else key}:{format_value(item, escape_keys=escape_keys)}"
            for key, item in dictsort(value)
        )
        return "{" + ",".join(fields) + "}"
    if is_sequence(value):
        return "[" + ",".join(format_value(item, escape_keys=escape_keys) for item in value) + "]"
    return str(value)


def format_tool_arguments(arguments: Mapping[str, Any]) -> str:
    """The ``{key:value,...}`` body of a tool call or tool response, with bare keys."""
    return format_value(arguments, escape_keys=False)


def parse_tool_arguments(text: str) -> dict[str, Any]:
    """Parse a ``{key:value,...}`` body back into a dict (the inverse of ``format_tool_arguments``)."""
    reader = _Reader(text)
    result = reader.read_object()
    reader.skip_space()
    if not reader.at_end():
        raise reader.error("unexpected text after the arguments")
    return result


_CALL_PREFIX = "call:"
_NAME = re.compile(r"[^\s{}]+")


def parse_call(body: str) -> tuple[str, dict[str, Any]]:
    """Parse the text between ``<|tool_call>`` and ``<tool_call|>``: ``call:NAME{arguments}``."""
    text = body.strip()
    if not text.startswith(_CALL_PREFIX):
        raise ToolCallParseError(f"tool call must start with 'call:': {body!r}")
    brace = text.find("{")
    if brace < 0:
        raise ToolCallParseError(f"tool call has no '{{' after its name: {body!r}")
    name = text[len(_CALL_PREFIX):brace].strip()
    if not _NAME.fullmatch(name):
        raise ToolCallParseError(f"tool call has an invalid function name {name!r}: {body!r}")
    return name, parse_tool_arguments(text[brace:])


_NUMBER = re.compile(r"-?\d+(\.\d+)?([eE][+-]?\d+)?")
_BARE_KEY = re.compile(r"[^:{}\[\],]+")
# Words the model may write for scalars; "None" is what the official template prints for a null.
_LITERALS: dict[str, Any] = {"true": True, "false": False, "null": None, "None": None}
_VALUE_END = set(",}] \t\r\n")


class _Reader:
    """Recursive-descent reader over one arguments text; every error names the offset."""

    def __init__(self, text: str) -> None:
        self.text = text
        self.pos = 0

    def error(self, message: str) -> ToolCallParseError:
        return ToolCallParseError(f"tool call arguments: {message} at offset {self.pos} in {self.text!r}")

    def at_end(self) -> bool:
        return self.pos >= len(self.text)

    def skip_space(self) -> None:
        while not self.at_end() and self.text[self.pos].isspace():
            self.pos += 1

    def take(self, token: str) -> bool:
        """Consume ``token`` (after spaces) if it comes next."""
        self.skip_space()
        if self.text.startswith(token, self.pos):
            self.pos += len(token)
            return True
        return False

    def expect(self, token: str) -> None:
        if not self.take(token):
            raise self.error(f"expected {token!r}")

    def read_value(self) -> Any:
        self.skip_space()
        if self.text.startswith(QUOTE, self.pos):
            return self.read_string()
        if self.text.startswith("{", self.pos):
            return self.read_object()
        if self.text.startswith("[", self.pos):
            return self.read_array()
        for word, value in _LITERALS.items():
            if self.text.startswith(word, self.pos) and self._ends_value(self.pos + len(word)):
                self.pos += len(word)
                return value
        match = _NUMBER.match(self.text, self.pos)
        if match and self._ends_value(match.end()):
            self.pos = match.end()
            number = match.group()
            return float(number) if match.group(1) or match.group(2) else int(number)
        raise self.error("expected a value (string, number, true, false, null, object or array)")

    def _ends_value(self, end: int) -> bool:
        return end >= len(self.text) or self.text[end] in _VALUE_END

    def read_string(self) -> str:
        start = self.pos + len(QUOTE)
        end = self.text.find(QUOTE, start)
        if end < 0:
            raise self.error("unterminated string")
        self.pos = end + len(QUOTE)
        return self.text[start:end]

    def read_key(self) -> str:
        self.skip_space()
        if self.text.startswith(QUOTE, self.pos):
            return self.read_string()
        match = _BARE_KEY.match(self.text, self.pos)
        key = match.group().strip() if match else ""
        if not key:
            raise self.error("expected a key")
        self.pos = match.end()
        return key

    def read_object(self) -> dict[str, Any]:
        self.expect("{")
        result: dict[str, Any] = {}
        if self.take("}"):
            return result
        while True:
            key = self.read_key()
            self.expect(":")
            result[key] = self.read_value()
            if self.take("}"):
                return result
            self.expect(",")

    def read_array(self) -> list[Any]:
        self.expect("[")
        result: list[Any] = []
        if self.take("]"):
            return result
        while True:
            result.append(self.read_value())
            if self.take("]"):
                return result
            self.expect(",")
