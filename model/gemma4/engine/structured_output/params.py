"""What a request's answer must match: the plain, picklable constraint a request carries in its
`SamplingParams` (compiled into a grammar by `gemma4.engine.structured_output`)."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class StructuredOutputParams:
    """Exactly one constraint: a JSON schema (JSON text), any JSON object, a regular expression, one of
    a list of strings, or a grammar in the grammar library's own syntax (tool calls use this)."""

    json_schema: str | None = None
    json_object: bool = False
    regex: str | None = None
    choice: tuple[str, ...] | None = None
    grammar: str | None = None
