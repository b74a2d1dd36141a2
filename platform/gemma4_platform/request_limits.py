"""Checks that bound what a client may send, run before anything is rendered, tokenized or queued.

Every check raises `InvalidArgument` naming the field (`messages`, `tools[2].function.parameters`,
`stop[0]`, ...). Client JSON text is parsed by pydantic-core's parser, whose own recursion limit keeps a
deeply nested value from exhausting the stack; the configured `max_json_depth` is then checked without
recursion. The prompt-length check here is a cheap lower bound (characters the template certainly
writes, over the longest token's length), so a text that certainly exceeds the context is refused
without rendering or tokenizing it.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import pydantic_core

from gemma4_platform.errors import InvalidArgument
from gemma4_platform.settings import LimitSettings


def json_depth(value: Any) -> int:
    """Nesting depth of a JSON-like value (a scalar is 0, `[]` and `{}` are 1), computed iteratively."""
    deepest = 0
    stack = [(value, 0)]
    while stack:
        item, depth = stack.pop()
        if isinstance(item, Mapping):
            children: Any = item.values()
        elif isinstance(item, (list, tuple)):
            children = item
        else:
            continue
        deepest = max(deepest, depth + 1)
        stack.extend((child, depth + 1) for child in children)
    return deepest


def parse_client_json(text: str, where: str) -> Any:
    """JSON text from a client; malformed or too deeply nested text is INVALID_ARGUMENT naming `where`."""
    try:
        return pydantic_core.from_json(text)
    except ValueError as exc:
        raise InvalidArgument(f"{where}: invalid JSON ({exc})", field=where) from None


def check_depth(value: Any, where: str, limits: LimitSettings) -> None:
    depth = json_depth(value)
    if depth > limits.max_json_depth:
        raise InvalidArgument(
            f"{where}: nested {depth} levels deep, more than limits.max_json_depth ({limits.max_json_depth})",
            field=where,
        )


def check_sampling(sampling: Mapping[str, Any], limits: LimitSettings, max_model_len: int) -> None:
    """Counts and sizes of the sampling fields (their ranges are checked by SamplingParams)."""
    stop = sampling.get("stop")
    stops = [stop] if isinstance(stop, str) else list(stop or ())
    _at_most(len(stops), limits.max_stop_strings, "stop", "stop strings", "limits.max_stop_strings")
    for i, text in enumerate(stops):
        if isinstance(text, str) and len(text) > limits.max_stop_string_chars:
            raise InvalidArgument(
                f"stop[{i}]: {len(text)} characters, more than limits.max_stop_string_chars "
                f"({limits.max_stop_string_chars})",
                field=f"stop[{i}]",
            )
    ids = sampling.get("stop_token_ids") or ()
    _at_most(len(ids), limits.max_stop_token_ids, "stop_token_ids", "ids", "limits.max_stop_token_ids")
    logprobs = sampling.get("logprobs")
    if isinstance(logprobs, int) and not isinstance(logprobs, bool) and logprobs > limits.max_logprobs:
        raise InvalidArgument(
            f"logprobs: {logprobs} is more than limits.max_logprobs ({limits.max_logprobs})", field="logprobs"
        )
    max_tokens = sampling.get("max_tokens")
    cap = limits.max_output_tokens or max_model_len
    if isinstance(max_tokens, int) and not isinstance(max_tokens, bool) and max_tokens > cap:
        raise InvalidArgument(f"max_tokens: {max_tokens} is more than the limit ({cap})", field="max_tokens")


def check_chat(
    messages: Sequence[Any], tools: Sequence[Any] | None, limits: LimitSettings
) -> tuple[list[Any], list[Any] | None]:
    """Counts, depths and shapes of a conversation; returns it with JSON-text tool arguments decoded.

    Tool schemas must be JSON objects (`"type": "object"` when a type is given) and tool-call arguments
    JSON objects, as OpenAI requires: anything else would render as something the model never saw.
    """
    if not isinstance(messages, Sequence) or isinstance(messages, (str, bytes)):
        raise InvalidArgument("messages: expected a list of messages", field="messages")
    _at_most(len(messages), limits.max_messages, "messages", "messages", "limits.max_messages")
    parts = sum(len(m["content"]) for m in messages if isinstance(m, Mapping) and isinstance(m.get("content"), list))
    _at_most(parts, limits.max_content_parts, "messages", "content parts", "limits.max_content_parts")
    checked = [_check_message(message, f"messages[{i}]", limits) for i, message in enumerate(messages)]
    if not tools:
        return checked, None
    _at_most(len(tools), limits.max_tools, "tools", "tools", "limits.max_tools")
    return checked, [_check_tool(tool, f"tools[{i}]", limits) for i, tool in enumerate(tools)]


def _check_message(message: Any, where: str, limits: LimitSettings) -> Any:
    if not isinstance(message, Mapping):
        return message  # normalize_messages reports the shape, naming the index
    content = message.get("content")
    if isinstance(content, (Mapping, list)):
        check_depth(content, f"{where}.content", limits)
    calls = message.get("tool_calls")
    if not isinstance(calls, list):
        return message
    return {**message, "tool_calls": [_check_call(call, f"{where}.tool_calls[{j}]", limits) for j, call in enumerate(calls)]}


def _check_call(call: Any, where: str, limits: LimitSettings) -> Any:
    function = call.get("function") if isinstance(call, Mapping) else None
    if not isinstance(function, Mapping) or "arguments" not in function:
        return call
    arguments = function["arguments"]
    path = f"{where}.function.arguments"
    if isinstance(arguments, str):
        arguments = parse_client_json(arguments, path) if arguments.strip() else {}
    if not isinstance(arguments, Mapping):
        raise InvalidArgument(f"{path}: expected a JSON object", field=path)
    check_depth(arguments, path, limits)
    return {**call, "function": {**function, "arguments": arguments}}


def _check_tool(tool: Any, where: str, limits: LimitSettings) -> Any:
    function = tool.get("function") if isinstance(tool, Mapping) else None
    if not isinstance(function, Mapping) or function.get("parameters") is None:
        return tool
    parameters = function["parameters"]
    path = f"{where}.function.parameters"
    if not isinstance(parameters, Mapping):
        raise InvalidArgument(f"{path}: expected a JSON Schema object", field=path)
    kind = parameters.get("type")
    if kind is not None and (not isinstance(kind, str) or kind.lower() != "object"):
        raise InvalidArgument(f"{path}.type: a tool's parameters must be an object schema, got {kind!r}", field=path)
    check_depth(parameters, path, limits)
    return tool


def string_chars(value: Any) -> int:
    """Characters of every string (mapping keys included) in a JSON-like value."""
    total = 0
    stack = [value]
    while stack:
        item = stack.pop()
        if isinstance(item, str):
            total += len(item)
        elif isinstance(item, Mapping):
            stack.extend(item.keys())
            stack.extend(item.values())
        elif isinstance(item, (list, tuple)):
            stack.extend(item)
    return total


def rendered_chars(messages: Sequence[Any]) -> int:
    """A lower bound on the characters the chat template writes from the client's conversation: the
    text of user, system and tool turns (as the template strips it) and tool-call arguments. Assistant
    text is left out (the template drops earlier thoughts from it), as is anything the template does not
    write verbatim; leaving text out only weakens the bound, never makes it wrong."""
    total = 0
    for message in messages:
        if not isinstance(message, Mapping):
            continue
        content = message.get("content")
        if message.get("role") in ("user", "system", "developer"):
            if isinstance(content, str):
                total += len(content.strip())
            elif isinstance(content, list):
                total += sum(
                    len(part["text"].strip())
                    for part in content
                    if isinstance(part, Mapping) and isinstance(part.get("text"), str)
                )
        elif message.get("role") == "tool":
            total += string_chars(content)
        for call in message.get("tool_calls") or ():
            function = call.get("function") if isinstance(call, Mapping) else None
            if isinstance(function, Mapping):
                total += string_chars(function.get("arguments"))
    return total


def check_prompt_bound(chars: int, longest_token_chars: int, max_prompt_tokens: int, where: str) -> None:
    """Refuse text that cannot fit: every token covers at most `longest_token_chars` characters."""
    fewest = -(-chars // max(1, longest_token_chars))
    if fewest > max_prompt_tokens:
        raise InvalidArgument(
            f"{where}: {chars} characters make at least {fewest} tokens, more than the prompt limit "
            f"({max_prompt_tokens} tokens)",
            field=where,
        )


def _at_most(count: int, limit: int, field: str, what: str, setting: str) -> None:
    if count > limit:
        raise InvalidArgument(f"{field}: {count} {what}, more than {setting} ({limit})", field=field)
