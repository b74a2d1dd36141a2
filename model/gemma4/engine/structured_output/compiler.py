"""From a request's `StructuredOutputParams` to a compiled llguidance grammar over the tokenizer's vocabulary.

The engine validates a request's constraint when it is added (`GrammarCompiler.validate`, ValueError
naming the field) and rank 0's worker compiles it (`GrammarCompiler.matcher`). Both keep one compiled
grammar per distinct constraint in an LRU cache: a request gets a copy of the cached matcher, so a
repeated schema is compiled once. JSON is generated compactly (no optional whitespace: a
random-weight model cannot spin in it) and llguidance's JSON-schema options may be overridden per
schema with its `"x-guidance"` key.
"""

from __future__ import annotations

import json
import threading
from collections import OrderedDict
from dataclasses import dataclass
from functools import cached_property

import llguidance

from gemma4.engine.structured_output.params import StructuredOutputParams
from gemma4.special_tokens import CHANNEL_END, CHANNEL_START
from gemma4.tokenizer import Gemma4Tokenizer

# Defaults for JSON schemas (a schema's own "x-guidance" options win): no whitespace between tokens.
JSON_OPTIONS = {"whitespace_flexible": False}
DEFAULT_CACHE_SIZE = 256

_FIELDS = ("json_schema", "json_object", "regex", "choice", "grammar")


@dataclass(frozen=True)
class ThoughtMarkers:
    """The ids of the tokens that open and close a thought block (`<|channel>`, `<channel|>`)."""

    start: int
    end: int


def constraint_of(params: StructuredOutputParams) -> tuple[str, str]:
    """(field, llguidance grammar text) of the one constraint `params` sets; ValueError naming the field."""
    if not isinstance(params, StructuredOutputParams):
        raise ValueError(f"structured must be StructuredOutputParams, got {type(params).__name__}")
    chosen = [name for name in _FIELDS if getattr(params, name) not in (None, False)]
    if len(chosen) != 1:
        got = ", ".join(chosen) if chosen else "none"
        raise ValueError(f"structured: exactly one of {', '.join(_FIELDS)} must be set, got {got}")
    name = chosen[0]
    field = f"structured.{name}"
    if name == "json_object":
        if params.json_object is not True:
            raise ValueError(f"{field} must be a boolean, got {params.json_object!r}")
        return field, llguidance.LLMatcher.grammar_from_json_schema({"type": "object"}, defaults=JSON_OPTIONS)
    if name == "json_schema":
        if not isinstance(params.json_schema, str):
            raise ValueError(f"{field} must be JSON text, got {type(params.json_schema).__name__}")
        try:
            schema = json.loads(params.json_schema)
        except json.JSONDecodeError as error:
            raise ValueError(f"{field} is not valid JSON: {error}") from error
        if not isinstance(schema, (dict, bool)):
            raise ValueError(f"{field} must be a JSON object (or true/false), got {type(schema).__name__}")
        try:
            return field, llguidance.LLMatcher.grammar_from_json_schema(schema, defaults=JSON_OPTIONS)
        except ValueError as error:
            raise ValueError(f"{field}: {error}") from error
    if name == "choice":
        choice = params.choice
        if isinstance(choice, (str, bytes)) or not isinstance(choice, (list, tuple)) or not choice:
            raise ValueError(f"{field} must be a non-empty list of strings, got {choice!r}")
        for i, option in enumerate(choice):
            if not isinstance(option, str) or not option:
                raise ValueError(f"{field}[{i}] must be a non-empty string, got {option!r}")
        return field, llguidance.grammar_from("choice", list(choice))
    text = getattr(params, name)
    if not isinstance(text, str) or not text:
        raise ValueError(f"{field} must be a non-empty string, got {text!r}")
    if name == "regex":
        return field, llguidance.LLMatcher.grammar_from_regex(text)
    return field, llguidance.LLMatcher.grammar_from_lark(text)


class GrammarCompiler:
    """Compiles constraints over one tokenizer's vocabulary (`vocab_size`: the model's logits width).

    Thread-safe: the engine validates on request threads while a step runs. The llguidance tokenizer
    (about a second for a full Gemma vocabulary) is built on first use.
    """

    def __init__(self, tokenizer: Gemma4Tokenizer, vocab_size: int, cache_size: int = DEFAULT_CACHE_SIZE) -> None:
        if cache_size < 1:
            raise ValueError(f"cache_size must be >= 1, got {cache_size}")
        self.tokenizer = tokenizer
        self.vocab_size = vocab_size
        self.cache_size = cache_size
        self._templates: OrderedDict[str, llguidance.LLMatcher] = OrderedDict()
        self._lock = threading.Lock()

    @cached_property
    def ll_tokenizer(self) -> llguidance.LLTokenizer:
        """The vocabulary as llguidance sees it; a finished grammar allows only the tokenizer's EOS ids."""
        return llguidance.LLTokenizer(
            self.tokenizer.to_str(), n_vocab=self.vocab_size, eos_token=list(self.tokenizer.eos_token_ids)
        )

    @cached_property
    def thought_markers(self) -> ThoughtMarkers | None:
        """The thought block's markers, None if the vocabulary lacks them."""
        start, end = (self.tokenizer.token_to_id(t.text) for t in (CHANNEL_START, CHANNEL_END))
        return None if start is None or end is None else ThoughtMarkers(start, end)

    def validate(self, params: StructuredOutputParams) -> None:
        """Compile `params` (cached); ValueError naming the field if it is malformed or does not compile."""
        self._template(params)
        if params.thinking is not False and params.thinking is not True:
            raise ValueError(f"structured.thinking must be a boolean, got {params.thinking!r}")
        if params.thinking and self.thought_markers is None:
            raise ValueError(
                f"structured.thinking: the vocabulary has no {CHANNEL_START.text} / {CHANNEL_END.text} thought markers"
            )

    def matcher(self, params: StructuredOutputParams) -> llguidance.LLMatcher:
        """A fresh matcher at the start of `params`'s grammar (ValueError as `validate`)."""
        return self._template(params).deep_copy()

    def _template(self, params: StructuredOutputParams) -> llguidance.LLMatcher:
        field, grammar = constraint_of(params)
        with self._lock:
            template = self._templates.get(grammar)
            if template is not None:
                self._templates.move_to_end(grammar)
                return template
        template = llguidance.LLMatcher(self.ll_tokenizer, grammar, log_level=0)  # releases the GIL
        if template.is_error():
            raise ValueError(f"{field}: {template.get_error()}")
        with self._lock:
            self._templates[grammar] = template
            while len(self._templates) > self.cache_size:
                self._templates.popitem(last=False)
        return template
