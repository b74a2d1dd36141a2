"""Tool calls as a grammar: the model's ``<|tool_call>call:NAME{...}<tool_call|>`` syntax with arguments
that match each tool's ``parameters`` JSON schema, written in llguidance's Lark dialect.

The grammar generates exactly what ``gemma4.chat.syntax.format_tool_arguments`` writes (bare keys in
``dictsort`` order, no spaces, strings between ``<|"|>`` tokens, numbers as JSON numbers) and
``gemma4.chat.parse`` reads back. Strings never hold marker text (``<|"|>``, ``<tool_call|>``, a stop
marker...) even spelled with ordinary tokens, since the parser would cut the call there; special
tokens cannot appear inside them at all.

Supported schema keywords: ``type`` (one or a list), ``properties``/``required`` (objects are closed:
only declared properties are written), ``additionalProperties`` (an object without properties and
not closed takes any arguments), ``items``/``minItems``/``maxItems``, ``enum``/``const``,
``minimum``/``maximum``/``exclusiveMinimum``/``exclusiveMaximum``, ``minLength``/``maxLength``,
``anyOf``, ``nullable`` and annotations (``description``, ``title``...). Anything else is refused
with a ``ToolSchemaError`` naming the keyword's path, rather than silently producing calls that do not
match the schema.
"""

from __future__ import annotations

import json
import re
from collections.abc import Mapping, Sequence
from typing import Any

from gemma4.chat.syntax import QUOTE, dictsort, format_value
from gemma4.special_tokens import (
    CHANNEL_END,
    CHANNEL_START,
    EOS,
    TOOL_CALL_END,
    TOOL_CALL_START,
    TOOL_RESPONSE_START,
    TURN_END,
)

# Text the chat parser reacts to: none of it may appear inside a string value or free text.
_MARKERS = (QUOTE, TOOL_CALL_START.text, TOOL_CALL_END.text, CHANNEL_START.text, CHANNEL_END.text,
            TURN_END.text, EOS.text, TOOL_RESPONSE_START.text)
_NO_MARKER = "~/(?s:.*(" + "|".join(re.escape(m) for m in _MARKERS) + ").*)/"
_ANNOTATIONS = frozenset({
    "description", "title", "default", "examples", "deprecated", "readOnly", "writeOnly", "$comment",
    "$schema", "$id",
})
_KEYWORDS = frozenset({
    "type", "properties", "required", "additionalProperties", "items", "minItems", "maxItems", "enum",
    "const", "minimum", "maximum", "exclusiveMinimum", "exclusiveMaximum", "minLength", "maxLength",
    "anyOf", "nullable",
}) | _ANNOTATIONS
_TYPES = ("string", "integer", "number", "boolean", "null", "object", "array")
_NUMBER_KEYWORDS = ("minimum", "maximum", "exclusiveMinimum", "exclusiveMaximum")
_NO_PARAMETERS = {"type": "object", "properties": {}, "additionalProperties": False}  # a tool that takes none
_KEY = re.compile(r"[^:{}\[\],\s<]([^:{}\[\],<]*[^:{}\[\],\s<])?")
_NAME = re.compile(r"[^\s{}<]+")

# Any value, for tools whose arguments are not constrained.
_GENERIC = f"""
any_value: any_string | %json{{"type":"number"}} | "true" | "false" | "null" | "None" | any_object | any_array
any_string: <|"|> ANY_TEXT <|"|>
any_object: "{{" (any_pair ("," any_pair)*)? "}}"
any_pair: ANY_KEY ":" any_value
any_array: "[" (any_value ("," any_value)*)? "]"
ANY_KEY: /[A-Za-z_][A-Za-z0-9_]*/
ANY_TEXT: /(?s:.*)/ & {_NO_MARKER}
"""


class ToolSchemaError(ValueError):
    """A tool's parameters schema (or the tool choice) cannot be turned into a grammar; `where` names the field."""

    def __init__(self, where: str, message: str) -> None:
        super().__init__(f"{where}: {message}")
        self.where = where


def tool_call_grammar(
    tools: Sequence[Mapping[str, Any]],
    *,
    required: bool = False,
    name: str | None = None,
    parallel: bool = True,
    strict_only: bool = False,
) -> str:
    """The Lark grammar of the answer for a tool choice; `tools` are OpenAI ``{"type": "function", ...}`` dicts.

    * `name`: exactly one call, to that tool, its arguments matching its schema.
    * `required`: one call (several if `parallel`), to any of the tools, arguments matching their schemas.
    * otherwise ("auto"): free text with calls in it (at most one unless `parallel`); with
      `strict_only`, only tools marked ``"strict": true`` have their arguments constrained.
    """
    builder = _Builder()
    calls: dict[str, str] = {}
    for index, tool in enumerate(tools):
        function = tool.get("function") if isinstance(tool, Mapping) else None
        where = f"tools[{index}].function"
        if not isinstance(function, Mapping):
            raise ToolSchemaError(where, "expected a mapping with the function's name and parameters")
        tool_name = function.get("name")
        if not isinstance(tool_name, str) or not _NAME.fullmatch(tool_name):
            raise ToolSchemaError(f"{where}.name", f"expected a name without spaces, braces or '<', got {tool_name!r}")
        constrain = not strict_only or function.get("strict") is True
        parameters = function.get("parameters", _NO_PARAMETERS)
        arguments = builder.arguments(parameters, f"{where}.parameters") if constrain else builder.any("any_object")
        calls[tool_name] = builder.rule(f"<|tool_call> {_literal('call:' + tool_name)} {arguments} <tool_call|>")
    if name is not None:
        if name not in calls:
            raise ToolSchemaError("tool_choice.function.name", f"no tool named {name!r} in tools")
        start = calls[name]
    else:
        if not calls:
            raise ToolSchemaError("tools", "a tool choice needs at least one tool")
        call = builder.rule(" | ".join(calls.values()))
        repeat = "*" if parallel else "?"
        if required:
            start = f"{call}+" if parallel else call
        else:
            start = f"FREE_TEXT ({call} FREE_TEXT){repeat}"
    return builder.grammar(start)


class _Builder:
    """Accumulates numbered rules; each schema node becomes one rule named after its position."""

    def __init__(self) -> None:
        self.rules: list[str] = []
        self.generic = False  # whether some value is unconstrained (the generic value rules are needed)

    def any(self, rule: str) -> str:
        """`any_value` or `any_object`: a value the schema leaves open."""
        self.generic = True
        return rule

    def rule(self, body: str) -> str:
        name = f"r{len(self.rules)}"
        self.rules.append(f"{name}: {body}")
        return name

    def grammar(self, start: str) -> str:
        """The whole grammar; the free-text terminal and the generic value rules only where they are used."""
        lines = [f"start: {start}", *self.rules]
        if "FREE_TEXT" in start:
            lines.append(f"FREE_TEXT: /(?s:.*)/ & {_NO_MARKER}")
        if self.generic:
            lines.append(_GENERIC)
        return "\n".join(lines)

    def arguments(self, schema: Any, where: str) -> str:
        if not isinstance(schema, Mapping):
            raise ToolSchemaError(where, "expected a JSON schema object")
        if schema.get("type", "object") != "object" or not _is_object_schema(schema):
            raise ToolSchemaError(f"{where}.type", 'tool parameters must be an object schema ("type": "object")')
        return self.value(schema, where)

    def value(self, schema: Any, where: str) -> str:
        if schema is True or schema == {}:
            return self.any("any_value")
        if not isinstance(schema, Mapping):
            raise ToolSchemaError(where, f"expected a JSON schema object, got {schema!r}")
        unknown = sorted(set(schema) - _KEYWORDS)
        if unknown:
            raise ToolSchemaError(f"{where}.{unknown[0]}", "this schema keyword is not supported for tool calls")
        if "const" in schema:
            return self.rule(_literal(format_value(schema["const"], escape_keys=False), where=f"{where}.const"))
        if "enum" in schema:
            return self._enum(schema["enum"], f"{where}.enum")
        if "anyOf" in schema:
            options = schema["anyOf"]
            if not isinstance(options, list) or not options:
                raise ToolSchemaError(f"{where}.anyOf", "expected a non-empty list of schemas")
            rest = {k: v for k, v in schema.items() if k != "anyOf"}
            alternatives = [self.value({**rest, **option} if isinstance(option, Mapping) else option,
                                       f"{where}.anyOf[{i}]") for i, option in enumerate(options)]
            return self.rule(" | ".join(alternatives))
        types = _types(schema, where)
        alternatives = [self._typed(kind, schema, where) for kind in types]
        if schema.get("nullable") is True and "null" not in types:
            alternatives.append(self._typed("null", schema, where))
        return self.rule(" | ".join(alternatives))

    def _enum(self, values: Any, where: str) -> str:
        if not isinstance(values, list) or not values:
            raise ToolSchemaError(where, "expected a non-empty list")
        literals = [_literal(format_value(v, escape_keys=False), where=f"{where}[{i}]") for i, v in enumerate(values)]
        return self.rule(" | ".join(literals))

    def _typed(self, kind: str, schema: Mapping[str, Any], where: str) -> str:
        if kind == "string":
            return f"<|\"|> {self._text(schema, where)} <|\"|>"
        if kind in ("integer", "number"):
            bounds = {key: schema[key] for key in _NUMBER_KEYWORDS if key in schema}
            for key, bound in bounds.items():
                if isinstance(bound, bool) or not isinstance(bound, (int, float)):
                    raise ToolSchemaError(f"{where}.{key}", f"expected a number, got {bound!r}")
            return "%json" + json.dumps({"type": kind, **bounds}, separators=(",", ":"))
        if kind == "boolean":
            return '"true" | "false"'
        if kind == "null":
            return '"null" | "None"'
        if kind == "object":
            return self._object(schema, where)
        return self._array(schema, where)

    def _text(self, schema: Mapping[str, Any], where: str) -> str:
        low = _count(schema, "minLength", where, 0)
        high = _count(schema, "maxLength", where, None)
        if high is not None and high < low:
            raise ToolSchemaError(f"{where}.maxLength", f"is below minLength ({low})")
        name = f"TEXT{len(self.rules)}"
        self.rules.append(f"{name}: /(?s:.{{{low},{'' if high is None else high}}})/ & {_NO_MARKER}")
        return name

    def _object(self, schema: Mapping[str, Any], where: str) -> str:
        properties = schema.get("properties", {})
        if not isinstance(properties, Mapping):
            raise ToolSchemaError(f"{where}.properties", "expected an object of schemas")
        required = schema.get("required", [])
        if not isinstance(required, list) or not all(isinstance(key, str) for key in required):
            raise ToolSchemaError(f"{where}.required", "expected a list of property names")
        missing = [key for key in required if key not in properties]
        if missing:
            raise ToolSchemaError(f"{where}.required", f"names {missing[0]!r}, which is not in properties")
        extra = schema.get("additionalProperties", True)
        if not isinstance(extra, (bool, Mapping)):
            raise ToolSchemaError(f"{where}.additionalProperties", "expected a boolean or a schema")
        if not properties and extra is not False:
            return self.any("any_object")
        fields = []
        for key, value in dictsort(properties):
            path = f"{where}.properties.{key}"
            if not isinstance(key, str) or not _KEY.fullmatch(key):
                raise ToolSchemaError(path, "a property name must be a bare key (no spaces at its ends, no ':{}[],<')")
            fields.append((self.rule(f"{_literal(key + ':')} {self.value(value, path)}"), key in required))
        if not fields:
            return '"{" "}"'
        body = self._fields(fields)
        return f'"{{" {body} "}}"' if any(needed for _, needed in fields) else f'"{{" {body}? "}}"'

    def _fields(self, fields: list[tuple[str, bool]]) -> str:
        """A rule for one or more comma-separated fields in order, where optional ones may be left out.

        ``rest[i]``: fields i.. after something was written (each with its leading comma);
        ``first[i]``: fields i.. starting with the first one written. Linear in the number of fields.
        """
        rest: list[str] = [""] * (len(fields) + 1)
        for i in range(len(fields) - 1, -1, -1):
            rule, needed = fields[i]
            head = f'"," {rule}' if needed else f'("," {rule})?'
            rest[i] = self.rule(f"{head} {rest[i + 1]}".strip())
        first = ""
        for i in range(len(fields) - 1, -1, -1):
            rule, needed = fields[i]
            written = f"{rule} {rest[i + 1]}".strip()
            first = self.rule(written if needed or not first else f"{written} | {first}")
        return first

    def _array(self, schema: Mapping[str, Any], where: str) -> str:
        item = self.value(schema.get("items", True), f"{where}.items")
        low = _count(schema, "minItems", where, 0)
        high = _count(schema, "maxItems", where, None)
        if high is not None and high < low:
            raise ToolSchemaError(f"{where}.maxItems", f"is below minItems ({low})")
        if high == 0:
            return '"[" "]"'
        more_low = max(low - 1, 0)
        more = f'("," {item}){{{more_low},{"" if high is None else high - 1}}}'
        body = f"{item} {more}"
        return f'"[" {body} "]"' if low > 0 else f'"[" ({body})? "]"'


def _is_object_schema(schema: Mapping[str, Any]) -> bool:
    return "type" in schema or "properties" in schema or not (set(schema) - _ANNOTATIONS)


def _types(schema: Mapping[str, Any], where: str) -> list[str]:
    kind = schema.get("type")
    if kind is None:
        if "properties" in schema or "additionalProperties" in schema:
            return ["object"]
        if "items" in schema:
            return ["array"]
        return list(_TYPES)
    kinds = kind if isinstance(kind, list) else [kind]
    for i, item in enumerate(kinds):
        if item not in _TYPES:
            suffix = f"[{i}]" if isinstance(kind, list) else ""
            raise ToolSchemaError(f"{where}.type{suffix}", f"expected one of {', '.join(_TYPES)}, got {item!r}")
    return kinds


def _count(schema: Mapping[str, Any], key: str, where: str, default: int | None) -> int | None:
    value = schema.get(key, default)
    if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 0):
        raise ToolSchemaError(f"{where}.{key}", f"expected a non-negative integer, got {value!r}")
    return value


def _literal(text: str, *, where: str = "tools") -> str:
    """Lark for a fixed text in which ``<|"|>`` is the string delimiter token; other marker text is refused."""
    pieces = text.split(QUOTE)
    for piece in pieces:
        marker = next((m for m in _MARKERS if m in piece), None)
        if marker is not None:
            raise ToolSchemaError(where, f"a value may not contain the marker {marker!r}")
    parts: list[str] = []
    for i, piece in enumerate(pieces):
        if i:
            parts.append('<|"|>')
        if piece:
            parts.append(json.dumps(piece, ensure_ascii=False))
    return " ".join(parts)
