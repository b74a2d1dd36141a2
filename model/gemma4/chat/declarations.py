"""Tool declarations in Gemma syntax: ``declaration:NAME{description:...,parameters:{...}}``.

A port of the official template's ``format_function_declaration`` and ``format_parameters`` macros. It
keeps their quirks on purpose (the model was trained on exactly this text): object and array properties
always open with ``,properties:{`` / ``,items:{``, the parameters block is closed only when it has a
``type``, and a missing field prints as nothing, as a Jinja ``Undefined`` does.
"""

from collections.abc import Mapping
from typing import Any

from gemma4.chat.syntax import dictsort, format_value, quote, quote_all

# Schema keys that are never themselves property names (the template skips them when it walks a
# mapping that has no "properties" of its own).
_STANDARD_KEYS = ("description", "type", "properties", "required", "nullable")


class _Missing:
    """Stands for a Jinja ``Undefined``: falsy, prints as nothing."""

    def __bool__(self) -> bool:
        return False

    def __str__(self) -> str:
        return ""


_MISSING = _Missing()


def _get(container: Any, key: str) -> Any:
    """``container[key]`` with Jinja's leniency: missing keys and non-mappings give ``_MISSING``."""
    if isinstance(container, Mapping) and key in container:
        return container[key]
    return _MISSING


def _upper(value: Any) -> str:
    return str(value).upper()


def format_tool_declaration(tool: Mapping[str, Any]) -> str:
    """One ``declaration:...`` entry for an OpenAI-style ``{"type": "function", "function": {...}}`` tool."""
    function = tool["function"]
    text = f"declaration:{_get(function, 'name')}{{description:{quote(_get(function, 'description'))}"
    parameters = _get(function, "parameters")
    if parameters:
        text += ",parameters:{"
        properties = _get(parameters, "properties")
        if properties:
            text += "properties:{" + _format_properties(properties) + "},"
        required = _get(parameters, "required")
        if required:
            text += "required:" + quote_all(required) + ","
        parameters_type = _get(parameters, "type")
        if parameters_type:
            text += f"type:{quote(_upper(parameters_type))}}}"
    if "response" in function:
        response = function["response"]
        text += ",response:{"
        description = _get(response, "description")
        if description:
            text += f"description:{quote(description)},"
        if _upper(_get(response, "type")) == "OBJECT":
            text += f"type:{quote('OBJECT')}}}"
    return text + "}"


def _format_properties(properties: Mapping[str, Any]) -> str:
    return ",".join(
        _format_property(key, value) for key, value in dictsort(properties) if key not in _STANDARD_KEYS
    )


def _format_property(key: str, schema: Any) -> str:
    fields: list[str] = []
    description = _get(schema, "description")
    if description:
        fields.append(f"description:{quote(description)}")
    if _get(schema, "nullable"):
        fields.append("nullable:true")
    schema_type = _upper(_get(schema, "type"))
    # Object and array sub-blocks carry their own leading comma and do not count as a previous field.
    nested = ""
    if schema_type == "STRING":
        enum = _get(schema, "enum")
        if enum:
            fields.append("enum:" + format_value(enum, escape_keys=True))
    elif schema_type == "OBJECT":
        properties = _get(schema, "properties")
        nested = ",properties:{" + _format_properties(properties if isinstance(properties, Mapping) else schema) + "}"
        required = _get(schema, "required")
        if required:
            nested += ",required:" + quote_all(required)
    elif schema_type == "ARRAY":
        items = _get(schema, "items")
        if isinstance(items, Mapping) and items:
            nested = ",items:{" + _format_items(items) + "}"
    head = ",".join(fields)
    separator = "," if fields else ""
    return f"{key}:{{{head}{nested}{separator}type:{quote(schema_type)}}}"


def _format_items(items: Mapping[str, Any]) -> str:
    entries: list[str] = []
    for key, value in dictsort(items):
        if value is None:
            continue
        if key == "properties":
            entries.append("properties:{" + (_format_properties(value) if isinstance(value, Mapping) else "") + "}")
        elif key == "required":
            entries.append("required:" + quote_all(value))
        elif key == "type":
            upper = _upper(value) if isinstance(value, str) else [_upper(item) for item in value]
            entries.append("type:" + format_value(upper, escape_keys=True))
        else:
            entries.append(f"{key}:" + format_value(value, escape_keys=True))
    return ",".join(entries)
