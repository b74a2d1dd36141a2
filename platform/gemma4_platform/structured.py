"""Structured outputs from either door: a response format or a tool choice becomes the engine's
`StructuredOutputParams`, checked here so that a bad schema is refused (HTTP 400 / INVALID_ARGUMENT)
naming the client's own field before any work is queued.

A JSON schema must be a JSON object that is valid against the Draft 2020-12 meta-schema, and one that
llguidance compiles; regular expressions and tool grammars are compiled the same way (without a
vocabulary: cheap, and the engine compiles them again over its own). Tool choices ``"required"`` and
a named function constrain the answer to calls of (that one of) the tools with arguments matching
their schemas; under ``"auto"`` only tools marked ``"strict": true`` are constrained, the model may
still answer in text.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Literal

import jsonschema
import llguidance

from gemma4.chat.tool_grammar import ToolSchemaError, tool_call_grammar
from gemma4.engine.structured_output.compiler import JSON_OPTIONS  # the engine's JSON options: compile alike
from gemma4.engine.structured_output.params import StructuredOutputParams

from gemma4_platform.errors import InvalidArgument

_MAX_REASON_CHARS = 300  # of the compiler's message (it may quote the grammar)


@dataclass(frozen=True)
class ToolChoice:
    """OpenAI's `tool_choice`: a mode, or (mode "function") the one tool that must be called."""

    mode: Literal["auto", "none", "required", "function"] = "auto"
    name: str | None = None


def json_schema(schema: Any, field: str, *, thinking: bool = False) -> StructuredOutputParams:
    """A JSON-schema constraint; `schema` is the decoded schema the client sent at `field`."""
    if not isinstance(schema, Mapping):
        raise InvalidArgument(f"{field}: a JSON schema must be a JSON object", field=field)
    try:
        jsonschema.Draft202012Validator.check_schema(schema)
    except jsonschema.SchemaError as error:
        path = "".join(f"[{p}]" if isinstance(p, int) else f".{p}" for p in error.path)
        raise InvalidArgument(f"{field}{path}: not a valid JSON schema: {error.message}", field=field) from None
    text = json.dumps(schema, ensure_ascii=False)
    try:
        grammar = llguidance.LLMatcher.grammar_from_json_schema(text, defaults=JSON_OPTIONS)
    except ValueError as error:
        raise InvalidArgument(f"{field}: this schema is not supported: {error}", field=field) from None
    _check_compiles(grammar, field, "schema")
    return StructuredOutputParams(json_schema=text, thinking=thinking)


def json_object(*, thinking: bool = False) -> StructuredOutputParams:
    return StructuredOutputParams(json_object=True, thinking=thinking)


def regex(pattern: Any, field: str, *, thinking: bool = False) -> StructuredOutputParams:
    if not isinstance(pattern, str) or not pattern:
        raise InvalidArgument(f"{field}: expected a non-empty regular expression", field=field)
    _check_compiles(llguidance.LLMatcher.grammar_from_regex(pattern), field, "regular expression")
    return StructuredOutputParams(regex=pattern, thinking=thinking)


def choice(options: Any, field: str, *, thinking: bool = False) -> StructuredOutputParams:
    if not isinstance(options, Sequence) or isinstance(options, str) or not options:
        raise InvalidArgument(f"{field}: expected a non-empty list of strings", field=field)
    for i, option in enumerate(options):
        if not isinstance(option, str) or not option:
            raise InvalidArgument(f"{field}[{i}]: expected a non-empty string", field=f"{field}[{i}]")
    return StructuredOutputParams(choice=tuple(options), thinking=thinking)


def tool_calls(
    tools: Sequence[Mapping[str, Any]] | None,
    tool_choice: ToolChoice,
    *,
    parallel: bool = True,
    thinking: bool = False,
) -> StructuredOutputParams | None:
    """The constraint a tool choice puts on the answer, None when it puts none."""
    if tool_choice.mode == "none":
        return None
    tools = list(tools or ())
    if not tools:
        if tool_choice.mode == "auto":
            return None
        raise InvalidArgument(f"tool_choice: {tool_choice.mode!r} needs tools", field="tool_choice")
    strict_only = tool_choice.mode == "auto"
    if strict_only and not any(_function(tool).get("strict") is True for tool in tools):
        return None
    try:
        grammar = tool_call_grammar(
            tools,
            required=tool_choice.mode == "required",
            name=tool_choice.name if tool_choice.mode == "function" else None,
            parallel=parallel,
            strict_only=strict_only,
        )
    except ToolSchemaError as error:
        raise InvalidArgument(str(error), field=error.where) from None
    _check_compiles(llguidance.LLMatcher.grammar_from_lark(grammar), "tools", "tool schemas")
    return StructuredOutputParams(grammar=grammar, thinking=thinking)


def combined(
    response_format: StructuredOutputParams | None, tools: StructuredOutputParams | None
) -> StructuredOutputParams | None:
    """The request's one constraint: a response format and a constraining tool choice exclude each other."""
    if response_format is not None and tools is not None:
        raise InvalidArgument(
            "response_format: a structured response format cannot be combined with a tool choice that "
            "constrains the answer (tool_choice required, a named function, or strict tools)",
            field="response_format",
        )
    return response_format if response_format is not None else tools


def _function(tool: Any) -> Mapping[str, Any]:
    function = tool.get("function") if isinstance(tool, Mapping) else None
    return function if isinstance(function, Mapping) else {}


def _check_compiles(grammar: str, field: str, what: str) -> None:
    error = llguidance.LLMatcher.validate_grammar(grammar)
    if error:
        reason = " ".join(error.split())[:_MAX_REASON_CHARS]
        raise InvalidArgument(f"{field}: this {what} is not supported: {reason}", field=field)
