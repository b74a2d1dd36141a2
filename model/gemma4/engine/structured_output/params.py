"""What a request's answer must match: the plain, picklable constraint a request carries in its
`SamplingParams` (compiled into a grammar by `gemma4.engine.structured_output`)."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class StructuredOutputParams:
    """Exactly one constraint: a JSON schema (JSON text), any JSON object, a regular expression, one of
    a list of strings, or a grammar in the grammar library's own syntax (tool calls use this).

    `thinking`: the prompt asked the model to think first, so the constraint applies to the answer after
    the thought block (free text until the thought block's end token), not to the thinking.
    """

    json_schema: str | None = None
    json_object: bool = False
    regex: str | None = None
    choice: tuple[str, ...] | None = None
    grammar: str | None = None
    thinking: bool = False
