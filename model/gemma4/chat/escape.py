"""Hide control-token text inside client strings behind placeholders while a chat template runs.

A template concatenates client text with its own control tokens, and in the rendered string the
tokenizer cannot tell the two apart. If every client string carries its marker text as placeholders
while the template runs, every control token left in the rendered text was written by the template;
``gemma4.chat.safe_tokenize`` then puts the client's text back and tokenizes it as plain text.

``Placeholders.hide`` rewrites, in every string value and mapping key of a conversation:

* every marker, matched case-insensitively (a template's ``lower`` or ``upper`` could otherwise
  turn "<|TURN>" into a marker of a vocabulary);
* a proper prefix of a marker at the end of a string and a proper suffix at its start (next to any
  whitespace a template may trim), so that two client pieces written next to each other
  ("<|tu" + "rn>") or a piece next to the template's own text cannot join into a marker;
* the placeholder alphabet itself, so client text cannot forge a placeholder.

Placeholders are made of private-use characters only: they have no case, are not whitespace and occur
in no marker, so ``trim``, ``upper``, ``lower`` and the templates' ``strip_thinking`` leave them
whole, and hiding is injective (equal strings stay equal, distinct ones distinct). Since client text
never keeps a character of that alphabet, a placeholder in the rendered text is always one of ours:
no random nonce is needed, and placeholders stay short (they are tokenized once before being revealed).

Where the text rendered this way differs from the naive rendering (only for client strings that
hold marker text or edge fragments of it):

* hidden text comes back as the client wrote it: a template's case change (``upper`` of a schema
  type) or character escaping (``tojson``, ``replace``) does not reach it;
* ``dictsort`` orders a key holding a marker by its placeholder, after every ASCII key, not by its
  text; template comparisons see the placeholder (a schema type "<|"|>string" is no "STRING");
* a template that cuts client text (slicing, ``truncate``) may cut a placeholder: the model then
  reads leftover private-use characters instead of the marker text, never a control token.

Not covered: a template that assembles a marker from its own literal fragments around a client
string that is an inner part of a marker (``'<|' + name + '>'``). No Gemma template does that.
"""

import re
from collections.abc import Iterable, Mapping
from typing import Any

_OPEN = "\ue000"
_CLOSE = "\ue001"
_DIGITS = "".join(chr(0xE010 + value) for value in range(10))
_ALPHABET = _OPEN + _CLOSE + _DIGITS
_TO_DIGITS = str.maketrans("0123456789", _DIGITS)
_FROM_DIGITS = str.maketrans(_DIGITS, "0123456789")
_PLACEHOLDER = re.compile(f"{_OPEN}([{_DIGITS}]+){_CLOSE}")


class MarkerMatcher:
    """Finds the markers of one vocabulary, and fragments of them, in client text; built once, shared."""

    def __init__(self, markers: Iterable[str]) -> None:
        words = sorted({marker for marker in markers if marker})
        if not words:
            raise ValueError("a marker matcher needs at least one marker")
        clashing = [word for word in words if any(char in _ALPHABET for char in word)]
        if clashing:
            raise ValueError(f"markers {clashing!r} use the placeholder alphabet")
        self.markers: tuple[str, ...] = tuple(words)
        self._longest = max(map(len, words))
        self._hidden = re.compile(f"{_alternation(words)}|[{_ALPHABET}]", re.IGNORECASE)
        prefixes = (word[:end] for word in words for end in range(1, len(word)))
        suffixes = (word[start:] for word in words for start in range(1, len(word)))
        # A search for prefixes ending at the end finds the longest first; a match of suffixes too.
        self._prefix = re.compile(f"(?:{_alternation(prefixes)})\\Z", re.IGNORECASE)
        self._suffix = re.compile(_alternation(suffixes), re.IGNORECASE)

    def sub_markers(self, replace: Any, text: str) -> str:
        """``text`` with every marker and placeholder character replaced by ``replace(match_text)``."""
        return self._hidden.sub(lambda match: replace(match.group()), text)

    def leading_fragment(self, text: str, start: int) -> int:
        """Length of the longest proper marker suffix at ``text[start:]``'s start (0 if none)."""
        match = self._suffix.match(text, start, start + self._longest - 1)
        return len(match.group()) if match else 0

    def trailing_fragment(self, text: str, end: int) -> int:
        """Length of the longest proper marker prefix ending at ``text[:end]``'s end (0 if none)."""
        match = self._prefix.search(text, max(0, end - self._longest + 1), end)
        return len(match.group()) if match else 0


class Placeholders:
    """The placeholders of one rendering: hide client text before it, reveal it in the rendered text."""

    def __init__(self, matcher: MarkerMatcher) -> None:
        self._matcher = matcher
        self._placeholders: dict[str, str] = {}
        self._originals: list[str] = []

    def placeholder(self, original: str) -> str:
        """The placeholder standing for ``original`` (the same one each time it is asked for)."""
        found = self._placeholders.get(original)
        if found is None:
            index = str(len(self._originals)).translate(_TO_DIGITS)
            found = self._placeholders[original] = f"{_OPEN}{index}{_CLOSE}"
            self._originals.append(original)
        return found

    def hide(self, value: Any) -> Any:
        """A copy of ``value`` (strings, mappings, lists, tuples, scalars) with every string's marker text hidden.

        Mapping keys are hidden too; values of other types (JSON numbers, booleans, null) are kept as they are.
        """
        if isinstance(value, str):
            return self._hide_text(value)
        if isinstance(value, Mapping):
            return {self.hide(key): self.hide(item) for key, item in value.items()}
        if isinstance(value, (list, tuple)):
            return [self.hide(item) for item in value]
        return value

    def reveal(self, text: str) -> str:
        """``text`` with this rendering's placeholders replaced by the client text they stand for."""
        return _PLACEHOLDER.sub(self._original, text)

    def _original(self, match: re.Match[str]) -> str:
        index = int(match.group(1).translate(_FROM_DIGITS))
        return self._originals[index] if index < len(self._originals) else match.group()

    def _hide_text(self, text: str) -> str:
        text = self._matcher.sub_markers(self.placeholder, text)
        start = len(text) - len(text.lstrip())
        length = self._matcher.leading_fragment(text, start)
        if length:
            text = text[:start] + self.placeholder(text[start : start + length]) + text[start + length :]
        end = len(text.rstrip())
        length = self._matcher.trailing_fragment(text, end)
        if length:
            text = text[: end - length] + self.placeholder(text[end - length : end]) + text[end:]
        return text


def _alternation(words: Iterable[str]) -> str:
    """A regex for any of ``words`` that prefers the longest, as a trie: thousands of words stay fast."""
    trie: dict[str, dict] = {}
    for word in words:
        node = trie
        for char in word:
            node = node.setdefault(char, {})
        node[""] = {}
    return _trie_pattern(trie) or "(?!)"


def _trie_pattern(node: dict[str, dict]) -> str:
    branches = [re.escape(char) + _trie_pattern(child) for char, child in sorted(node.items()) if char]
    if not branches:
        return ""
    ends_here = "" in node
    if len(branches) == 1 and not ends_here:
        return branches[0]
    group = "(?:" + "|".join(branches) + ")"
    return group + "?" if ends_here else group
