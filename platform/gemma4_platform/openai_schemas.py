"""The OpenAI wire format: request bodies in, response bodies and stream chunks out.

Requests are validated strictly (a string where a number belongs is a 400 naming the field, not a
silent coercion) but unknown fields are ignored, as OpenAI does. Fields that would change the meaning of
a request and that this server cannot honour (`n > 1`, `echo`, logit bias) are rejected rather than
ignored. `response_format` (JSON mode, JSON schemas), vLLM's `guided_json` / `guided_regex` /
`guided_choice` and `tool_choice` become the request's structured-output constraint
(`gemma4_platform.structured`). Range checks are left to `SamplingParams`, so every front
end reports them the same way. `model`, when given, must name the served model (checked by
`gemma4_platform.openai_api`, which serves all of this; nothing here does I/O).
"""

from __future__ import annotations

import json
import time
import uuid
from dataclasses import dataclass, field
from typing import Any, AsyncIterator, Callable, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from gemma4.chat import ChatDelta, ToolCall
from gemma4.engine import FinishReason, RequestOutput, Usage
from gemma4.engine.sampler import TokenLogprobs
from gemma4.engine.structured_output.params import StructuredOutputParams

from gemma4_platform import structured
from gemma4_platform.backend import media_tokens
from gemma4_platform.errors import InvalidArgument, ServingError
from gemma4_platform.request_limits import parse_client_json

TokenText = Callable[[int], str]

# Names pydantic puts into error locations for the members of a union; they are not request fields.
_UNION_TAGS = {"str", "int", "float", "bool", "NamedToolChoice"}


# ---------------------------------------------------------------------------------------- requests
class _Strict(BaseModel):
    model_config = ConfigDict(strict=True, extra="ignore")


class StreamOptions(_Strict):
    include_usage: bool = False


class ChatTemplateKwargs(_Strict):
    """vLLM's template switches; only the one Gemma's template has is accepted."""

    model_config = ConfigDict(strict=True, extra="forbid")
    enable_thinking: bool | None = None


class JsonSchemaFormat(_Strict):
    """OpenAI's `response_format.json_schema`; the answer always follows the schema (as `strict: true`)."""

    model_config = ConfigDict(strict=True, extra="ignore", populate_by_name=True)
    name: str
    description: str | None = None
    schema_: Any = Field(default=None, alias="schema")
    strict: bool | None = None


class ResponseFormat(_Strict):
    type: Literal["text", "json_object", "json_schema"]
    json_schema: JsonSchemaFormat | None = None

    def constraint(self, *, thinking: bool) -> StructuredOutputParams | None:
        if self.type == "json_object":
            return structured.json_object(thinking=thinking)
        if self.type == "text":
            return None
        field = "response_format.json_schema"
        if self.json_schema is None:
            raise InvalidArgument(f'{field}: required with "type": "json_schema"', field=field)
        if self.json_schema.schema_ is None:
            raise InvalidArgument(f"{field}.schema: required", field=f"{field}.schema")
        return structured.json_schema(self.json_schema.schema_, f"{field}.schema", thinking=thinking)


class NamedFunction(_Strict):
    name: str


class NamedToolChoice(_Strict):
    """`{"type": "function", "function": {"name": ...}}`: the model must call that function."""

    type: Literal["function"]
    function: NamedFunction


class _GenerationRequest(_Strict):
    """Fields shared by chat and text completions."""

    model: str | None = None
    stream: bool = False
    stream_options: StreamOptions | None = None
    n: Literal[1] = 1
    max_tokens: int | None = None
    temperature: float | None = None
    top_p: float | None = None
    top_k: int | None = None
    min_p: float | None = None
    presence_penalty: float | None = None
    frequency_penalty: float | None = None
    repetition_penalty: float | None = None
    seed: int | None = None
    stop: str | list[str] | None = None
    # vLLM extensions that benchmark clients use.
    min_tokens: int | None = None
    ignore_eos: bool | None = None
    stop_token_ids: list[int] | None = None
    priority: int | None = None  # only API keys granted a priority range may set it
    cache_salt: str | None = None  # vLLM's prefix-cache isolation field
    logit_bias: dict[str, float] | None = None
    response_format: ResponseFormat | None = None
    guided_json: Any = None  # vLLM's structured-output fields
    guided_regex: str | None = None
    guided_choice: list[str] | None = None

    @field_validator("top_k")
    @classmethod
    def _vllm_disabled_top_k(cls, value: int | None) -> int | None:
        """vLLM clients disable top-k with -1; SamplingParams uses 0."""
        return 0 if value == -1 else value

    @field_validator("logit_bias")
    @classmethod
    def _no_logit_bias(cls, value: dict[str, float] | None) -> dict[str, float] | None:
        if value:
            raise ValueError("logit_bias is not supported")
        return value

    @property
    def include_usage(self) -> bool:
        return self.stream_options is not None and self.stream_options.include_usage

    def response_constraint(self, *, thinking: bool) -> StructuredOutputParams | None:
        """The constraint of `response_format` or of one of vLLM's `guided_*` fields (at most one may be set)."""
        chosen = [
            name
            for name, value in (
                ("response_format", self.response_format is not None and self.response_format.type != "text"),
                ("guided_json", self.guided_json is not None),
                ("guided_regex", self.guided_regex is not None),
                ("guided_choice", self.guided_choice is not None),
            )
            if value
        ]
        if len(chosen) > 1:
            raise InvalidArgument(f"{chosen[1]}: only one of {', '.join(chosen)} may be set", field=chosen[1])
        if self.guided_json is not None:
            schema = self.guided_json
            if isinstance(schema, str):  # vLLM takes the schema as an object or as JSON text
                schema = parse_client_json(schema, "guided_json")
            return structured.json_schema(schema, "guided_json", thinking=thinking)
        if self.guided_regex is not None:
            return structured.regex(self.guided_regex, "guided_regex", thinking=thinking)
        if self.guided_choice is not None:
            return structured.choice(self.guided_choice, "guided_choice", thinking=thinking)
        return self.response_format.constraint(thinking=thinking) if self.response_format else None

    def constraint(self) -> StructuredOutputParams | None:
        """The request's structured-output constraint (a text completion does not think)."""
        return self.response_constraint(thinking=False)

    def sampling(self) -> dict[str, Any]:
        """`SamplingParams` fields for `Frontend` (None = the model's default)."""
        return {
            "structured": self.constraint(),
            "max_tokens": self.max_tokens,
            "temperature": self.temperature,
            "top_p": self.top_p,
            "top_k": self.top_k,
            "min_p": self.min_p,
            "presence_penalty": self.presence_penalty,
            "frequency_penalty": self.frequency_penalty,
            "repetition_penalty": self.repetition_penalty,
            "seed": self.seed,
            "stop": self.stop,
            "min_tokens": self.min_tokens,
            "ignore_eos": self.ignore_eos,
            "stop_token_ids": self.stop_token_ids,
        }


class ChatCompletionRequest(_GenerationRequest):
    messages: list[dict[str, Any]]
    tools: list[dict[str, Any]] | None = None
    tool_choice: Literal["auto", "none", "required"] | NamedToolChoice | None = None
    parallel_tool_calls: bool = True
    max_completion_tokens: int | None = None
    logprobs: bool = False
    top_logprobs: int | None = None
    reasoning_effort: Literal["none", "minimal", "low", "medium", "high"] | None = None
    chat_template_kwargs: ChatTemplateKwargs | None = None
    thinking: bool | None = None
    truncate_audio: bool = False  # audio parts over 30 s keep their first 30 s instead of being refused

    def sampling(self) -> dict[str, Any]:
        if self.top_logprobs is not None and not self.logprobs:
            raise InvalidArgument("top_logprobs requires logprobs: true", field="top_logprobs")
        limit = self.max_completion_tokens if self.max_completion_tokens is not None else self.max_tokens
        return {
            **super().sampling(),
            "max_tokens": limit,
            "logprobs": (self.top_logprobs or 0) if self.logprobs else None,
        }

    @property
    def thinking_enabled(self) -> bool:
        """`thinking`, else `chat_template_kwargs.enable_thinking`, else `reasoning_effort`; off by default."""
        template = self.chat_template_kwargs.enable_thinking if self.chat_template_kwargs else None
        # Gemma 4 thinks or does not: every effort above "minimal" turns thinking on.
        effort = None if self.reasoning_effort is None else self.reasoning_effort not in ("none", "minimal")
        return next((choice for choice in (self.thinking, template, effort) if choice is not None), False)

    def constraint(self) -> StructuredOutputParams | None:
        """The response format's or the tool choice's constraint (they exclude each other), after any thinking."""
        thinking = self.thinking_enabled
        tools = structured.tool_calls(
            self.tools, self.tool_choice_spec, parallel=self.parallel_tool_calls, thinking=thinking
        )
        return structured.combined(self.response_constraint(thinking=thinking), tools)

    @property
    def tool_choice_spec(self) -> structured.ToolChoice:
        choice = self.tool_choice
        if isinstance(choice, NamedToolChoice):
            return structured.ToolChoice("function", choice.function.name)
        return structured.ToolChoice(choice or "auto")

    @property
    def prompt_tools(self) -> list[dict[str, Any]] | None:
        """The tools to declare in the prompt: none when the client forbids calling them."""
        return None if self.tool_choice == "none" else self.tools


class CompletionRequest(_GenerationRequest):
    prompt: str | list[int] | list[str] | list[list[int]]
    logprobs: int | None = None
    echo: Literal[False] = False
    best_of: Literal[1] | None = None
    suffix: None = None

    def sampling(self) -> dict[str, Any]:
        return {**super().sampling(), "logprobs": self.logprobs}

    def single_prompt(self) -> str | list[int]:
        """The one prompt of the request (a batch of one is unwrapped; larger batches are refused)."""
        prompt = self.prompt
        if isinstance(prompt, list) and prompt and not isinstance(prompt[0], int):
            if len(prompt) != 1:
                raise InvalidArgument(
                    f"prompt holds {len(prompt)} prompts; send one prompt per request", field="prompt"
                )
            return prompt[0]
        return prompt


def invalid_request(exc: ValidationError) -> InvalidArgument:
    """A 400 whose `param` is the field path (`messages[0]`, `stop[1]`).

    Of several errors the deepest is reported: for a union field that is the member the value came
    closest to (`stop: ["a", 3]` fails as a list at `stop[1]`, not as "not a string").
    """
    error = max(exc.errors(), key=lambda e: len(e["loc"]))
    param = ""
    for part in error["loc"]:
        if isinstance(part, int):
            param += f"[{part}]"
        elif part not in _UNION_TAGS and "[" not in part:
            param += f".{part}" if param else part
    message = str(error["ctx"]["error"]) if error["type"] == "value_error" else error["msg"]
    return InvalidArgument(f"{param}: {message}" if param else message, field=param or None)


# --------------------------------------------------------------------------------------- responses
@dataclass(frozen=True)
class ResponseMeta:
    """What every body and chunk of one response repeats."""

    id: str
    model: str
    created: int = field(default_factory=lambda: int(time.time()))

    @classmethod
    def new(cls, prefix: str, model: str) -> ResponseMeta:
        return cls(id=f"{prefix}-{uuid.uuid4().hex}", model=model)

    def body(self, obj: str, choices: list[dict[str, Any]], **extra: Any) -> dict[str, Any]:
        return {"id": self.id, "object": obj, "created": self.created, "model": self.model, "choices": choices, **extra}


def error_body(exc: ServingError) -> dict[str, Any]:
    code = exc.openai_code or exc.grpc_code.lower()
    return {"error": {"message": exc.message, "type": exc.openai_type, "param": exc.field, "code": code}}


def usage_body(usage: Usage) -> dict[str, Any]:
    return {
        "prompt_tokens": usage.prompt_tokens,
        "completion_tokens": usage.completion_tokens,
        "total_tokens": usage.total_tokens,
        # OpenAI's audio_tokens, with image_tokens and video_tokens alongside: the media's soft tokens.
        "prompt_tokens_details": {"cached_tokens": usage.cached_prompt_tokens, **media_tokens(usage)},
    }


def finish_reason(output: RequestOutput, *, called_tools: bool = False) -> str | None:
    if output.finish_reason is FinishReason.STOP and called_tools:
        return "tool_calls"
    return output.finish_reason.value if output.finish_reason is not None else None


def models_body(name: str, max_model_len: int, created: int) -> dict[str, Any]:
    model = {"id": name, "object": "model", "created": created, "owned_by": "google", "max_model_len": max_model_len}
    return {"object": "list", "data": [model]}


@dataclass
class ChatTurn:
    """The assistant's thinking, answer and tool calls, gathered from the chat parser's events."""

    reasoning: str = ""
    content: str = ""
    tool_calls: list[dict[str, Any]] = field(default_factory=list)

    def add(self, deltas: list[ChatDelta]) -> ChatTurn:
        """Take one output's events; returns them alone as a turn (a stream's delta)."""
        piece = ChatTurn()
        for delta in deltas:
            if delta.kind == "thinking":
                piece.reasoning += delta.text
            elif delta.kind == "content":
                piece.content += delta.text
            elif delta.kind == "tool_call" and delta.tool_call is not None:
                piece.tool_calls.append(_tool_call_body(delta.tool_call))
            # "error" events report a call that did not parse; its raw text already came as content.
        self.reasoning += piece.reasoning
        self.content += piece.content
        self.tool_calls += piece.tool_calls
        return piece

    def message(self) -> dict[str, Any]:
        """The unary `choices[0].message` (content is null when the turn only called tools)."""
        message: dict[str, Any] = {
            "role": "assistant",
            "content": self.content or (None if self.tool_calls else ""),
            "reasoning_content": self.reasoning or None,
        }
        if self.tool_calls:
            message["tool_calls"] = self.tool_calls
        return message

    def delta(self, first_index: int) -> dict[str, Any]:
        """A stream chunk's `delta`: only what this piece holds; calls numbered from `first_index`."""
        delta: dict[str, Any] = {}
        if self.reasoning:
            delta["reasoning_content"] = self.reasoning
        if self.content:
            delta["content"] = self.content
        if self.tool_calls:
            delta["tool_calls"] = [{"index": first_index + i, **call} for i, call in enumerate(self.tool_calls)]
        return delta


def _tool_call_body(call: ToolCall) -> dict[str, Any]:
    arguments = json.dumps(call.arguments, ensure_ascii=False)
    return {
        "id": f"call_{uuid.uuid4().hex[:24]}",
        "type": "function",
        "function": {"name": call.name, "arguments": arguments},
    }


def chat_logprobs(entries: list[TokenLogprobs], token_text: TokenText) -> dict[str, Any]:
    def item(token_id: int, logprob: float) -> dict[str, Any]:
        text = token_text(token_id)
        return {"token": text, "logprob": logprob, "bytes": list(text.encode("utf-8"))}

    return {
        "content": [
            {**item(e.token_id, e.logprob), "top_logprobs": [item(t, lp) for t, lp in _best_first(e.top)]}
            for e in entries
        ]
    }


def completion_logprobs(entries: list[TokenLogprobs], token_text: TokenText) -> dict[str, Any]:
    return {
        "tokens": [token_text(e.token_id) for e in entries],
        "token_logprobs": [e.logprob for e in entries],
        "top_logprobs": [{token_text(t): lp for t, lp in _best_first(e.top)} for e in entries],
    }


def _last(final: RequestOutput | None) -> RequestOutput:
    """The final output; a backend that ends a stream without any output broke its contract."""
    if final is None:
        raise ServingError("the engine returned no output")
    return final


def _best_first(top: dict[int, float]) -> list[tuple[int, float]]:
    return sorted(top.items(), key=lambda item: -item[1])


async def chat_completion(
    meta: ResponseMeta, outputs: AsyncIterator[RequestOutput], *, token_text: TokenText, logprobs: bool
) -> dict[str, Any]:
    """The unary `chat.completion` body of a generation."""
    turn, final = ChatTurn(), None
    async for final in outputs:
        turn.add(final.chat_deltas)
    final = _last(final)
    choice = {
        "index": 0,
        "message": turn.message(),
        "logprobs": chat_logprobs(final.logprobs, token_text) if logprobs and final.logprobs else None,
        "finish_reason": finish_reason(final, called_tools=bool(turn.tool_calls)),
        "stop_reason": final.stop_reason,
    }
    return meta.body("chat.completion", [choice], usage=usage_body(final.usage))


async def chat_completion_chunks(
    meta: ResponseMeta,
    outputs: AsyncIterator[RequestOutput],
    *,
    token_text: TokenText,
    logprobs: bool,
    include_usage: bool,
) -> AsyncIterator[dict[str, Any]]:
    """`chat.completion.chunk`s: the role first, then one chunk per output that adds something."""
    extra = {"usage": None} if include_usage else {}

    def chunk(delta: dict[str, Any], **choice: Any) -> dict[str, Any]:
        body = {"index": 0, "delta": delta, "logprobs": None, "finish_reason": None, **choice}
        return meta.body("chat.completion.chunk", [body], **extra)

    yield chunk({"role": "assistant", "content": ""})
    turn, final = ChatTurn(), None
    async for final in outputs:
        called = len(turn.tool_calls)
        delta = turn.add(final.chat_deltas).delta(first_index=called)
        token_logprobs = chat_logprobs(final.delta_logprobs, token_text) if logprobs and final.delta_logprobs else None
        if delta or token_logprobs:
            yield chunk(delta, logprobs=token_logprobs)
    final = _last(final)
    yield chunk(
        {}, finish_reason=finish_reason(final, called_tools=bool(turn.tool_calls)), stop_reason=final.stop_reason
    )
    if include_usage:
        yield meta.body("chat.completion.chunk", [], usage=usage_body(final.usage))


async def text_completion(
    meta: ResponseMeta, outputs: AsyncIterator[RequestOutput], *, token_text: TokenText
) -> dict[str, Any]:
    """The unary `text_completion` body of a generation."""
    final = None
    async for final in outputs:
        pass
    final = _last(final)
    choice = {
        "index": 0,
        "text": final.text,
        "logprobs": completion_logprobs(final.logprobs, token_text) if final.logprobs is not None else None,
        "finish_reason": finish_reason(final),
        "stop_reason": final.stop_reason,
    }
    return meta.body("text_completion", [choice], usage=usage_body(final.usage))


async def text_completion_chunks(
    meta: ResponseMeta, outputs: AsyncIterator[RequestOutput], *, token_text: TokenText, include_usage: bool
) -> AsyncIterator[dict[str, Any]]:
    """`text_completion` chunks: one per output with new text, the last one with the finish reason."""
    extra = {"usage": None} if include_usage else {}
    final = None
    async for final in outputs:
        if not (final.delta_text or final.finished or final.delta_logprobs):
            continue  # the detokenizer is holding text back and there are no logprobs to report
        choice = {
            "index": 0,
            "text": final.delta_text,
            "logprobs": None if final.delta_logprobs is None else completion_logprobs(final.delta_logprobs, token_text),
            "finish_reason": finish_reason(final),
            "stop_reason": final.stop_reason,
        }
        yield meta.body("text_completion", [choice], **extra)
    final = _last(final)
    if include_usage:
        yield meta.body("text_completion", [], usage=usage_body(final.usage))
