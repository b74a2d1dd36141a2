"""Validate chat messages and bring OpenAI-style input onto the conventions of Gemma's chat template.

The official template reads Gemma's native shape: an assistant message carries ``tool_calls`` (arguments
as a mapping) and, once the tools have run, ``tool_responses`` (``[{"name", "response"}]``) on the same
message; the model then continues in the same turn. OpenAI clients send something else, so every
rendering path (checkpoint template and built-in renderer) first passes through ``normalize_messages``:

* ``role: "tool"`` messages are folded into ``tool_responses`` of the assistant message whose
  ``tool_calls`` they answer (the run of tool messages must directly follow it). The response name is
  the function name of the call whose ``id`` equals ``tool_call_id``, else the tool message's ``name``.
  The content becomes the response as given: a string stays a string (rendered ``{value:<|"|>...<|"|>}``),
  a list of text parts is joined, a mapping or other JSON value is kept structured. This is what
  Google's later template revisions do with ``role: "tool"`` themselves.
* An assistant message that follows such tool messages and makes no new calls (the final answer) is
  merged into the calling message, provided that one has no content of its own, so the answer continues
  the same model turn instead of opening a second, unclosed one.
* ``tool_calls[].function.arguments`` given as a JSON string is decoded into a mapping; a string that
  does not start with ``{`` is kept as pre-formatted Gemma arguments, which the template writes verbatim.
* ``model`` is accepted as a synonym of ``assistant``, ``reasoning`` as one of ``reasoning_content``,
  and the content part types ``image_url``/``input_audio``/``video_url`` as ``image``/``audio``/``video``.
* A leading system/developer message given as text parts becomes one string (parts stripped, joined by
  a space), since the template writes that content as a string.

Anything else that cannot be rendered faithfully raises ``ValueError`` naming the message index and field.
"""

import json
from collections.abc import Mapping, Sequence
from typing import Any

_ROLES = ("system", "developer", "user", "assistant", "model", "tool")
_PART_TYPES = {
    "text": "text",
    "image": "image",
    "image_url": "image",
    "audio": "audio",
    "input_audio": "audio",
    "video": "video",
    "video_url": "video",
}


def normalize_messages(messages: Sequence[Mapping[str, Any]]) -> list[dict[str, Any]]:
    """Validated copies of ``messages`` in the template's native shape (the caller's objects are untouched)."""
    if isinstance(messages, (str, bytes)) or not isinstance(messages, Sequence) or not messages:
        raise ValueError("messages must be a non-empty list of message mappings")
    result: list[dict[str, Any]] = []
    # The assistant message that received tool responses from the preceding role:"tool" messages.
    answered: dict[str, Any] | None = None
    for index, message in enumerate(messages):
        where = f"messages[{index}]"
        if not isinstance(message, Mapping):
            raise ValueError(f"{where}: expected a mapping, got {type(message).__name__}")
        role = message.get("role")
        if role not in _ROLES:
            raise ValueError(f"{where}.role: unknown role {role!r}; expected one of {', '.join(_ROLES)}")
        if role == "tool":
            answered = _fold_tool_message(message, result, where)
            continue
        normalized = _normalize_message(message, where, is_first=index == 0)
        if answered is not None and normalized["role"] == "assistant" and _can_merge(answered, normalized):
            answered["content"] = normalized["content"]
        else:
            result.append(normalized)
        answered = None
    return result


def normalize_tools(tools: Sequence[Mapping[str, Any]] | None) -> list[dict[str, Any]] | None:
    """Validated tool definitions (OpenAI ``{"type": "function", "function": {...}}``), or None if there are none."""
    if not tools:
        return None
    result = []
    for index, tool in enumerate(tools):
        function = tool.get("function") if isinstance(tool, Mapping) else None
        if not isinstance(function, Mapping):
            raise ValueError(f"tools[{index}].function: expected a mapping with the function's name and schema")
        if not isinstance(function.get("name"), str) or not function["name"]:
            raise ValueError(f"tools[{index}].function.name: expected a non-empty string")
        result.append(dict(tool))
    return result


def _normalize_message(message: Mapping[str, Any], where: str, *, is_first: bool) -> dict[str, Any]:
    role = "assistant" if message["role"] == "model" else message["role"]
    normalized: dict[str, Any] = {"role": role}
    if role == "assistant":
        reasoning = message.get("reasoning_content", message.get("reasoning"))
        if reasoning:
            if not isinstance(reasoning, str):
                raise ValueError(f"{where}.reasoning_content: expected a string")
            normalized["reasoning_content"] = reasoning
        if message.get("tool_calls"):
            normalized["tool_calls"] = [
                _normalize_tool_call(call, f"{where}.tool_calls[{i}]") for i, call in enumerate(message["tool_calls"])
            ]
        if message.get("tool_responses"):
            normalized["tool_responses"] = [
                _normalize_tool_response(response, f"{where}.tool_responses[{i}]")
                for i, response in enumerate(message["tool_responses"])
            ]
    content = message.get("content")
    if content is None:
        if "tool_calls" not in normalized and "tool_responses" not in normalized:
            raise ValueError(f"{where}.content: missing (only assistant messages with tool calls may omit it)")
    elif isinstance(content, str):
        normalized["content"] = content
    elif isinstance(content, Sequence):
        parts = [_normalize_part(part, f"{where}.content[{i}]") for i, part in enumerate(content)]
        if is_first and role in ("system", "developer"):
            normalized["content"] = _join_text_parts(parts, f"{where}.content")
        else:
            normalized["content"] = parts
    else:
        raise ValueError(f"{where}.content: expected a string or a list of content parts")
    return normalized


def _normalize_part(part: Any, where: str) -> dict[str, Any]:
    if not isinstance(part, Mapping):
        raise ValueError(f"{where}: expected a content part mapping")
    part_type = _PART_TYPES.get(part.get("type"))
    if part_type is None:
        raise ValueError(
            f"{where}.type: unsupported content part type {part.get('type')!r}; "
            f"expected one of {', '.join(_PART_TYPES)}"
        )
    if part_type == "text" and not isinstance(part.get("text"), str):
        raise ValueError(f"{where}.text: a text part needs a string 'text'")
    return {**part, "type": part_type}


def _join_text_parts(parts: list[dict[str, Any]], where: str) -> str:
    if any(part["type"] != "text" for part in parts):
        raise ValueError(f"{where}: a system message may only hold text parts")
    return " ".join(part["text"].strip() for part in parts)


def _normalize_tool_call(call: Any, where: str) -> dict[str, Any]:
    function = call.get("function") if isinstance(call, Mapping) else None
    if not isinstance(function, Mapping):
        raise ValueError(f"{where}.function: expected a mapping with 'name' and 'arguments'")
    name = function.get("name")
    if not isinstance(name, str) or not name:
        raise ValueError(f"{where}.function.name: expected a non-empty string")
    arguments = function.get("arguments")
    if arguments is None:
        arguments = {}
    elif isinstance(arguments, str) and arguments.lstrip().startswith("{"):
        try:
            arguments = json.loads(arguments)
        except json.JSONDecodeError as error:
            raise ValueError(f"{where}.function.arguments: invalid JSON ({error})") from error
        if not isinstance(arguments, Mapping):
            raise ValueError(f"{where}.function.arguments: JSON arguments must be an object")
    elif not isinstance(arguments, (str, Mapping)):
        raise ValueError(f"{where}.function.arguments: expected a mapping or a JSON string")
    return {**call, "function": {**function, "arguments": arguments}}


def _normalize_tool_response(response: Any, where: str) -> dict[str, Any]:
    if not isinstance(response, Mapping) or "response" not in response:
        raise ValueError(f"{where}: expected a mapping with 'name' and 'response'")
    if not isinstance(response.get("name"), str) or not response["name"]:
        raise ValueError(f"{where}.name: expected a non-empty string")
    return {"name": response["name"], "response": response["response"]}


def _fold_tool_message(message: Mapping[str, Any], result: list[dict[str, Any]], where: str) -> dict[str, Any]:
    """Attach a role:"tool" message to the assistant call it answers; returns that assistant message."""
    caller = result[-1] if result else None
    if caller is None or caller["role"] != "assistant" or "tool_calls" not in caller:
        raise ValueError(f"{where}: a tool message must follow an assistant message with tool_calls")
    name = _resolve_tool_name(message, caller["tool_calls"], where)
    content = message.get("content")
    if content is None:
        raise ValueError(f"{where}.content: missing tool result")
    if isinstance(content, list):
        parts = [_normalize_part(part, f"{where}.content[{i}]") for i, part in enumerate(content)]
        if any(part["type"] != "text" for part in parts):
            raise ValueError(f"{where}.content: a tool result may only hold text parts")
        content = "".join(part["text"] for part in parts)
    caller.setdefault("tool_responses", []).append({"name": name, "response": content})
    return caller


def _resolve_tool_name(message: Mapping[str, Any], tool_calls: list[dict[str, Any]], where: str) -> str:
    call_id = message.get("tool_call_id")
    for call in tool_calls:
        if call_id is not None and call.get("id") == call_id:
            return call["function"]["name"]
    name = message.get("name")
    if isinstance(name, str) and name:
        return name
    raise ValueError(
        f"{where}.tool_call_id: {call_id!r} matches no call of the preceding assistant message and no 'name' is given"
    )


def _can_merge(answered: dict[str, Any], follow_up: dict[str, Any]) -> bool:
    """Whether a final answer after tool results can continue the calling turn."""
    return (
        "tool_calls" not in follow_up
        and "tool_responses" not in follow_up
        and not answered.get("content")
        and "content" in follow_up
    )
