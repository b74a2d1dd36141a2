"""Translation between the gRPC messages and what the `Frontend` speaks (chat dicts, sampling dicts, outputs).

Requests become the same OpenAI-style dicts the HTTP routes produce, so the Frontend validates both
doors alike; its error messages, which name dict paths (``messages[4].content[0]``), are rewritten
to the proto paths the client sent (``messages[3].parts[0]``, ``sampling.temperature``).
"""

from __future__ import annotations

import json
import re
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from typing import Any

from gemma4.engine import FinishReason, RequestOutput, Usage
from gemma4.engine.sampler import TokenLogprobs
from gemma4.engine.structured_output.params import StructuredOutputParams

from gemma4_platform import structured
from gemma4_platform.api.v1 import serving_pb2 as pb
from gemma4_platform.backend import media_tokens
from gemma4_platform.errors import InvalidArgument, ServingError
from gemma4_platform.request_limits import parse_client_json

_ROLES = {pb.ROLE_SYSTEM: "system", pb.ROLE_USER: "user", pb.ROLE_MODEL: "assistant"}
_FINISH_REASONS = {
    FinishReason.STOP: pb.FINISH_REASON_STOP,
    FinishReason.LENGTH: pb.FINISH_REASON_LENGTH,
    FinishReason.ABORT: pb.FINISH_REASON_ABORT,
}
_OPTIONAL_SAMPLING = tuple(f.name for f in pb.SamplingParams.DESCRIPTOR.fields if f.has_presence)
_SAMPLING_FIELD = re.compile(rf"^({'|'.join(pb.SamplingParams.DESCRIPTOR.fields_by_name)})\b")
_MESSAGE_PATH = re.compile(r"messages\[(\d+)\](\.content)?")
_FUNCTION_PATH = re.compile(r"\]\.function\.")  # tools[i].function.name -> tools[i].name, same for tool_calls
_JSON_FIELDS = re.compile(r"\.(parameters|arguments)\b")  # JSON values travel as *_json text fields
_FORCED_TOOL = re.compile(r"\btool_choice\.function\.name\b")
_TOOL_MODES = {
    pb.ToolChoice.MODE_AUTO: "auto",
    pb.ToolChoice.MODE_NONE: "none",
    pb.ToolChoice.MODE_REQUIRED: "required",
}


# ---------------------------------------------------------------------- requests


def sampling_from_proto(sampling: pb.SamplingParams) -> dict[str, Any]:
    """SamplingParams fields; unset ones are None so the Frontend applies the model's defaults."""
    fields: dict[str, Any] = {
        name: getattr(sampling, name) if sampling.HasField(name) else None for name in _OPTIONAL_SAMPLING
    }
    fields["stop"] = list(sampling.stop) or None
    fields["stop_token_ids"] = list(sampling.stop_token_ids) or None
    fields["ignore_eos"] = sampling.ignore_eos or None
    return fields


def generate_sampling(request: pb.GenerateRequest) -> dict[str, Any]:
    """A GenerateRequest's SamplingParams fields, its response format included."""
    return {**sampling_from_proto(request.sampling), "structured": structured_output_from_proto(request)}


def chat_sampling(request: pb.ChatRequest, tools: Sequence[dict[str, Any]] | None) -> dict[str, Any]:
    """A ChatRequest's SamplingParams fields with its one constraint: the response format or the tool choice."""
    thinking = request.thinking
    calls = structured.tool_calls(
        tools,
        tool_choice_from_proto(request.tool_choice),
        parallel=request.parallel_tool_calls if request.HasField("parallel_tool_calls") else True,
        thinking=thinking,
    )
    response_format = structured_output_from_proto(request, thinking=thinking)
    return {**sampling_from_proto(request.sampling), "structured": structured.combined(response_format, calls)}


def structured_output_from_proto(
    request: pb.GenerateRequest | pb.ChatRequest, *, thinking: bool = False
) -> StructuredOutputParams | None:
    """The request's `response_format`, None when it sets none."""
    if not request.HasField("response_format"):
        return None
    response_format = request.response_format
    kind = response_format.WhichOneof("kind")
    field = f"response_format.{kind}"
    if kind is None:
        raise InvalidArgument(
            "response_format: set json_schema, json_object, regex or choice", field="response_format"
        )
    if kind == "json_schema":
        schema = _json_field(response_format.json_schema, field)
        return structured.json_schema(schema, field, thinking=thinking)
    if kind == "json_object":
        if not response_format.json_object:
            raise InvalidArgument(f"{field}: set it to true (or leave response_format unset)", field=field)
        return structured.json_object(thinking=thinking)
    if kind == "regex":
        return structured.regex(response_format.regex, field, thinking=thinking)
    return structured.choice(list(response_format.choice.options), f"{field}.options", thinking=thinking)


def tool_choice_from_proto(choice: pb.ToolChoice) -> structured.ToolChoice:
    if choice.WhichOneof("choice") == "function_name":
        return structured.ToolChoice("function", choice.function_name)
    mode = _TOOL_MODES.get(choice.mode)
    if mode is None:
        raise InvalidArgument(
            "tool_choice.mode: set MODE_AUTO, MODE_NONE or MODE_REQUIRED", field="tool_choice.mode"
        )
    return structured.ToolChoice(mode)  # type: ignore[arg-type]


@dataclass(frozen=True)
class ChatInput:
    """A ChatRequest as chat dicts; `origins[i]` is where dict i came from: (proto path, name of its content).

    `tools` are all the request's tools (they may constrain the answer); `prompt_tools` those the prompt
    declares: none under MODE_NONE.
    """

    messages: list[dict[str, Any]]
    tools: list[dict[str, Any]] | None
    origins: list[tuple[str, str]]
    declare_tools: bool = True

    @property
    def prompt_tools(self) -> list[dict[str, Any]] | None:
        return self.tools if self.declare_tools else None


def chat_from_proto(request: pb.ChatRequest) -> ChatInput:
    """Messages and tools as chat dicts; tool responses become role-"tool" messages after their message."""
    messages: list[dict[str, Any]] = []
    origins: list[tuple[str, str]] = []
    for i, message in enumerate(request.messages):
        where = f"messages[{i}]"
        if message.role == pb.ROLE_TOOL:
            if message.parts:
                raise InvalidArgument(
                    f"{where}.parts: a tool message carries its results in tool_responses", field=f"{where}.parts"
                )
            if not message.tool_responses:
                raise InvalidArgument(
                    f"{where}.tool_responses: a tool message needs at least one", field=f"{where}.tool_responses"
                )
        else:
            messages.append(_message_from_proto(message, where))
            origins.append((where, ".parts"))
        for j, response in enumerate(message.tool_responses):
            path = f"{where}.tool_responses[{j}]"
            messages.append(_tool_response_from_proto(response, path))
            origins.append((path, ".response_json"))
    tools = [_tool_from_proto(tool, f"tools[{i}]") for i, tool in enumerate(request.tools)]
    declare = request.tool_choice.mode != pb.ToolChoice.MODE_NONE  # (a function_name reads as MODE_AUTO here)
    return ChatInput(messages, tools or None, origins, declare_tools=declare)


def _message_from_proto(message: pb.Message, where: str) -> dict[str, Any]:
    role = _ROLES.get(message.role)
    if role is None:
        raise InvalidArgument(
            f"{where}.role: set ROLE_SYSTEM, ROLE_USER, ROLE_MODEL or ROLE_TOOL", field=f"{where}.role"
        )
    result: dict[str, Any] = {
        "role": role,
        "content": [_part_from_proto(part, f"{where}.parts[{j}]") for j, part in enumerate(message.parts)] or None,
    }
    if message.tool_calls:
        if role != "assistant":
            raise InvalidArgument(f"{where}.tool_calls: only model messages call tools", field=f"{where}.tool_calls")
        result["tool_calls"] = [
            _tool_call_from_proto(call, f"{where}.tool_calls[{j}]") for j, call in enumerate(message.tool_calls)
        ]
    if message.reasoning:
        result["reasoning_content"] = message.reasoning
    return result


def _part_from_proto(part: pb.Part, where: str) -> dict[str, Any]:
    """Media parts keep their bytes (`gemma4_platform.media_input`'s inline shape); the Frontend decides
    whether this deployment accepts them."""
    kind = part.WhichOneof("kind")
    if kind is None:
        raise InvalidArgument(f"{where}: empty part (set text, image, audio or video)", field=where)
    if kind == "text":
        return {"type": "text", "text": part.text}
    media = getattr(part, kind)
    value: dict[str, Any] = {"data": media.data, "mime_type": media.mime_type or None}
    if kind == "image" and media.HasField("max_soft_tokens"):
        value["max_soft_tokens"] = media.max_soft_tokens
    return {"type": kind, kind: value}


def _tool_call_from_proto(call: pb.ToolCall, where: str) -> dict[str, Any]:
    arguments = _json_field(call.arguments_json, f"{where}.arguments_json") if call.arguments_json else {}
    if not isinstance(arguments, dict):
        raise InvalidArgument(f"{where}.arguments_json: expected a JSON object", field=f"{where}.arguments_json")
    return {"id": call.id, "type": "function", "function": {"name": call.name, "arguments": arguments}}


def _tool_response_from_proto(response: pb.ToolResponse, where: str) -> dict[str, Any]:
    value = _json_field(response.response_json, f"{where}.response_json")
    result: dict[str, Any] = {
        "role": "tool",
        # Gemma writes a non-object result as {value: ...}; wrapping it here also keeps a JSON array
        # from being read as a list of content parts.
        "content": value if isinstance(value, dict) else {"value": value},
        "tool_call_id": response.tool_call_id or None,
    }
    if response.name:
        result["name"] = response.name
    return result


def _tool_from_proto(tool: pb.Tool, where: str) -> dict[str, Any]:
    function: dict[str, Any] = {"name": tool.name}
    if tool.description:
        function["description"] = tool.description
    if tool.parameters_json:
        function["parameters"] = _json_field(tool.parameters_json, f"{where}.parameters_json")
    if tool.strict:
        function["strict"] = True
    return {"type": "function", "function": function}


def _json_field(text: str, where: str) -> Any:
    return parse_client_json(text, where)


def with_proto_paths(error: ServingError, origins: Sequence[tuple[str, str]] = ()) -> ServingError:
    """The same error, naming proto fields instead of the Frontend's dict paths."""

    def rewrite(text: str) -> str:
        def message_path(match: re.Match[str]) -> str:
            index = int(match.group(1))
            if index >= len(origins):
                return match.group(0)
            path, content = origins[index]
            return path + (content if match.group(2) else "")

        text = _FORCED_TOOL.sub("tool_choice.function_name", _SAMPLING_FIELD.sub(r"sampling.\1", text))
        return _JSON_FIELDS.sub(r".\1_json", _FUNCTION_PATH.sub("].", _MESSAGE_PATH.sub(message_path, text)))

    return error.with_message(rewrite(error.message), field=rewrite(error.field) if error.field else None)


# ---------------------------------------------------------------------- outputs


def generate_chunk(output: RequestOutput, request_id: str) -> pb.GenerateStreamResponse:
    """One engine output as a stream message; the finishing one carries finish reason, stop reason, usage."""
    chunk = pb.GenerateStreamResponse(
        request_id=request_id,
        delta_text=output.delta_text,
        delta_token_ids=output.delta_token_ids,
        logprobs=logprobs_to_proto(output.delta_logprobs),
    )
    if output.finished:
        chunk.finish_reason = finish_reason_to_proto(output.finish_reason)
        chunk.stop_reason = stop_reason_text(output.stop_reason)
        chunk.usage.CopyFrom(usage_to_proto(output.usage))
    return chunk


class ChatChunker:
    """Turns one request's outputs into ChatStream messages: one per chat delta, then a final one.

    Tool calls get ids `call_<n>` (n counts this response's calls). Parser "error" deltas are dropped:
    the unparsable text was already sent as answer text.
    """

    def __init__(self, request_id: str, count_tokens: Callable[[str], Awaitable[int]]) -> None:
        self.request_id = request_id
        self.count_tokens = count_tokens
        self.thinking: list[str] = []
        self.num_tool_calls = 0

    async def chunks(self, output: RequestOutput) -> list[pb.ChatStreamResponse]:
        messages = []
        for delta in output.chat_deltas:
            if delta.kind == "thinking":
                self.thinking.append(delta.text)
                messages.append(pb.ChatStreamResponse(request_id=self.request_id, thinking=delta.text))
            elif delta.kind == "content":
                messages.append(pb.ChatStreamResponse(request_id=self.request_id, text=delta.text))
            elif delta.kind == "tool_call" and delta.tool_call is not None:
                call = pb.ToolCall(
                    id=f"call_{self.num_tool_calls}",
                    name=delta.tool_call.name,
                    arguments_json=json.dumps(delta.tool_call.arguments, ensure_ascii=False),
                )
                self.num_tool_calls += 1
                messages.append(pb.ChatStreamResponse(request_id=self.request_id, tool_call=call))
        if output.finished:
            messages.append(await self._final(output))
        return messages

    async def _final(self, output: RequestOutput) -> pb.ChatStreamResponse:
        reason = finish_reason_to_proto(output.finish_reason)
        if reason == pb.FINISH_REASON_STOP and self.num_tool_calls:
            reason = pb.FINISH_REASON_TOOL_CALLS
        # The engine does not count thinking tokens; re-tokenizing the thinking text approximates it.
        thinking_tokens = await self.count_tokens("".join(self.thinking))
        return pb.ChatStreamResponse(
            request_id=self.request_id,
            finish_reason=reason,
            usage=usage_to_proto(output.usage, thinking_tokens=thinking_tokens),
        )


def finish_reason_to_proto(reason: FinishReason | None) -> pb.FinishReason:
    return _FINISH_REASONS.get(reason, pb.FINISH_REASON_UNSPECIFIED)


def stop_reason_text(reason: int | str | None) -> str:
    """The stop token id or stop string that ended generation, as text ("" when none)."""
    return "" if reason is None else str(reason)


def usage_to_proto(usage: Usage, *, thinking_tokens: int = 0) -> pb.Usage:
    return pb.Usage(
        prompt_tokens=usage.prompt_tokens,
        completion_tokens=usage.completion_tokens,
        cached_prompt_tokens=usage.cached_prompt_tokens,
        thinking_tokens=thinking_tokens,
        **media_tokens(usage),
    )


def logprobs_to_proto(logprobs: Sequence[TokenLogprobs] | None) -> list[pb.TokenLogprob]:
    return [pb.TokenLogprob(token_id=lp.token_id, logprob=lp.logprob, top=lp.top) for lp in logprobs or ()]
