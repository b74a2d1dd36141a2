"""Hiding marker text in client strings behind placeholders (gemma4.chat.escape)."""

import re

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from gemma4.chat.escape import MarkerMatcher, Placeholders
from gemma4.special_tokens import ALL_SPECIAL_TOKENS

MARKERS = [token.text for token in ALL_SPECIAL_TOKENS]
MATCHER = MarkerMatcher(MARKERS)
ANY_MARKER = re.compile("|".join(map(re.escape, MARKERS)), re.IGNORECASE)
PRIVATE_USE = re.compile("[\ue000-\uf8ff]")
PLACEHOLDER = re.compile("\ue000[\ue010-\ue019]+\ue001")
PREFIXES = sorted({marker[:end] for marker in MARKERS for end in range(1, len(marker))})
SUFFIXES = sorted({marker[start:] for marker in MARKERS for start in range(1, len(marker))})
CLIENT_TEXT = st.lists(
    st.one_of(
        st.sampled_from(MARKERS),
        st.sampled_from(MARKERS).map(str.upper),
        st.sampled_from(PREFIXES + SUFFIXES),
        st.sampled_from(["\ue000", "\ue001", "\ue010", "\ue000\ue010\ue001", "\ue000\ue019\ue019\ue001"]),
        st.sampled_from([" ", "\n", "\t"]),
        st.text(max_size=4),
    ),
    max_size=6,
).map("".join)


@settings(max_examples=300, deadline=None)
@given(CLIENT_TEXT)
def test_hidden_text_has_no_marker_and_reveals_to_the_original(text: str) -> None:
    placeholders = Placeholders(MATCHER)
    hidden = placeholders.hide(text)
    assert placeholders.reveal(hidden) == text
    assert not ANY_MARKER.search(hidden)
    # No edge fragment is left that could join a neighbour into a marker.
    core = hidden.strip().lower()
    assert not any(core.startswith(suffix.lower()) for suffix in SUFFIXES)
    assert not any(core.endswith(prefix.lower()) for prefix in PREFIXES)
    # Placeholders survive the case changes and trimming a template applies.
    found = PLACEHOLDER.findall(hidden)
    assert PLACEHOLDER.findall(hidden.upper()) == PLACEHOLDER.findall(hidden.lower()) == found
    assert PLACEHOLDER.findall(hidden.strip()) == found


@settings(max_examples=200, deadline=None)
@given(CLIENT_TEXT, CLIENT_TEXT)
def test_hiding_keeps_distinct_strings_distinct(first: str, second: str) -> None:
    placeholders = Placeholders(MATCHER)
    assert (placeholders.hide(first) == placeholders.hide(second)) == (first == second)


@pytest.mark.parametrize(
    "text", ["Hello, world!", "a < b and c > d", "x<y", "<b>bold</b> text", "naïve 東京 🤖", "", "   ", "a | b"]
)
def test_text_without_markers_or_edge_fragments_is_unchanged(text: str) -> None:
    assert Placeholders(MATCHER).hide(text) == text


def test_markers_are_hidden_case_insensitively_and_edges_are_hidden() -> None:
    placeholders = Placeholders(MATCHER)
    for text in ("say <|turn>", "say <|TURN>", "<|thin\u212a|>", "ends with <|tu", "rn> starts", "  <|\"  "):
        hidden = placeholders.hide(text)
        assert PRIVATE_USE.search(hidden) and placeholders.reveal(hidden) == text, text
    # Trimming whitespace around an edge fragment cannot expose it.
    assert placeholders.hide("  <|tu  ").strip() != "<|tu"


def test_placeholders_survive_case_changes() -> None:
    placeholders = Placeholders(MATCHER)
    hidden = placeholders.hide("type <|\"|> here")
    assert placeholders.reveal(hidden.upper()) == "TYPE <|\"|> HERE"
    assert placeholders.reveal(hidden.lower()) == "type <|\"|> here"


def test_mappings_are_hidden_in_keys_and_values_and_copied() -> None:
    placeholders = Placeholders(MATCHER)
    value = {"<|turn>": ["<bos>", 1, None, True, ("a", "<eos>")], "<|TURN>": {"k": 2.5}}
    hidden = placeholders.hide(value)
    assert len(hidden) == 2 and not ANY_MARKER.search(repr(hidden))
    hidden_key = placeholders.hide("<|turn>")
    assert hidden[hidden_key][1:4] == [1, None, True]
    assert [placeholders.reveal(item) for item in hidden[hidden_key][4]] == ["a", "<eos>"]
    assert value == {"<|turn>": ["<bos>", 1, None, True, ("a", "<eos>")], "<|TURN>": {"k": 2.5}}


def test_client_text_cannot_forge_a_placeholder() -> None:
    placeholders = Placeholders(MATCHER)
    genuine = placeholders.hide("<|turn>")
    forged = placeholders.hide(genuine)  # the client sends our placeholder's characters themselves
    assert placeholders.reveal(forged) == genuine


def test_markers_may_not_use_the_placeholder_alphabet() -> None:
    with pytest.raises(ValueError, match="placeholder alphabet"):
        MarkerMatcher(["<x\ue000>"])
    with pytest.raises(ValueError, match="at least one"):
        MarkerMatcher([])
