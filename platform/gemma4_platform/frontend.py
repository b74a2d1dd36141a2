"""The protocol-independent half of the gateway: validate, render, tokenize, bound, stream.

The gRPC servicer and the OpenAI HTTP routes both turn their wire format into calls here, so a
request is checked the same way whichever door it came through, and every failure is a
`ServingError` that each front end maps to its own status.
"""

from __future__ import annotations

import contextlib
import dataclasses
import uuid
from dataclasses import dataclass
from typing import Any, AsyncIterator, Mapping, Sequence

from gemma4.engine import RequestOutput, SamplingParams
from gemma4.tokenizer import Gemma4Tokenizer

from gemma4_platform import tracing
from gemma4_platform.backend import EngineRequest, GenerationBackend
from gemma4_platform.errors import (
    InvalidArgument,
    QueueFull,
    ServingError,
    Unimplemented,
    invalid_from_value_error,
)
from gemma4_platform.metrics import GatewayMetrics

MEDIA_PART_TYPES = {"image", "image_url", "audio", "input_audio", "video", "video_url"}


@dataclass(frozen=True)
class ModelDescription:
    """What clients may ask about the served model (gRPC GetModelInfo, OpenAI /v1/models)."""

    name: str
    variant: str
    max_model_len: int
    vocab_size: int
    modalities: tuple[str, ...] = ("text",)


class Frontend:
    def __init__(
        self,
        tokenizer: Gemma4Tokenizer,
        model: ModelDescription,
        backend: GenerationBackend,
        *,
        max_pending_requests: int = 256,
        default_max_tokens: int = 1024,
        metrics: GatewayMetrics | None = None,
    ) -> None:
        self.tokenizer = tokenizer
        self.metrics = metrics
        self.model = model
        self.backend = backend
        self.max_pending_requests = max_pending_requests
        self.default_max_tokens = default_max_tokens
        self.pending = 0

    # ------------------------------------------------------------------ building requests
    def completion(
        self,
        prompt: str | Sequence[int],
        sampling: Mapping[str, Any],
        *,
        request_id: str | None = None,
        priority: int = 0,
    ) -> EngineRequest:
        """A text or token-id prompt; `sampling` holds SamplingParams fields (None = unset)."""
        if isinstance(prompt, str):
            token_ids = self.tokenizer.encode(prompt)
        else:
            token_ids = list(prompt)
        if not token_ids:
            raise InvalidArgument("prompt must not be empty", field="prompt")
        bad = next((t for t in token_ids if not 0 <= t < self.model.vocab_size), None)
        if bad is not None:
            raise InvalidArgument(
                f"prompt token id {bad} is outside the vocabulary [0, {self.model.vocab_size})", field="prompt"
            )
        return self._request(token_ids, sampling, request_id, priority, parse_chat=False)

    def chat(
        self,
        messages: Sequence[Mapping[str, Any]],
        sampling: Mapping[str, Any],
        *,
        tools: Sequence[Mapping[str, Any]] | None = None,
        thinking: bool = False,
        request_id: str | None = None,
        priority: int = 0,
    ) -> EngineRequest:
        """A conversation rendered with the checkpoint's chat template; the output is chat-parsed."""
        token_ids = self.chat_token_ids(messages, tools=tools, thinking=thinking)
        return self._request(token_ids, sampling, request_id, priority, parse_chat=True)

    def chat_token_ids(
        self,
        messages: Sequence[Mapping[str, Any]],
        *,
        tools: Sequence[Mapping[str, Any]] | None = None,
        thinking: bool = False,
    ) -> list[int]:
        if not messages:
            raise InvalidArgument("messages must not be empty", field="messages")
        self._reject_media(messages)
        try:
            return self.tokenizer.encode_chat(messages, tools=tools, thinking=thinking)
        except ValueError as exc:
            raise InvalidArgument(str(exc), field=_leading_field(str(exc), "messages")) from exc

    def _reject_media(self, messages: Sequence[Mapping[str, Any]]) -> None:
        for i, message in enumerate(messages):
            content = message.get("content") if isinstance(message, Mapping) else None
            if not isinstance(content, (list, tuple)):
                continue
            for j, part in enumerate(content):
                kind = part.get("type") if isinstance(part, Mapping) else None
                if kind in MEDIA_PART_TYPES and kind.split("_")[0] not in self.model.modalities:
                    raise Unimplemented(
                        f"messages[{i}].content[{j}]: {kind} input is not supported by this deployment yet "
                        f"(modalities: {', '.join(self.model.modalities)})",
                        field=f"messages[{i}].content[{j}]",
                    )

    def _request(
        self, token_ids: list[int], sampling: Mapping[str, Any], request_id: str | None, priority: int, *, parse_chat: bool
    ) -> EngineRequest:
        fields = {k: v for k, v in sampling.items() if v is not None}
        room = self.model.max_model_len - len(token_ids)
        if room < 1:
            raise InvalidArgument(
                f"prompt ({len(token_ids)} tokens) leaves no room for output in max_model_len "
                f"({self.model.max_model_len})",
                field="prompt",
            )
        fields.setdefault("max_tokens", min(self.default_max_tokens, room))
        try:
            params = SamplingParams(**fields)
        except TypeError as exc:
            raise InvalidArgument(f"unknown sampling field: {exc}", field="sampling") from exc
        except ValueError as exc:
            raise invalid_from_value_error(exc) from exc
        if params.max_tokens > room:
            raise InvalidArgument(
                f"max_tokens ({params.max_tokens}) + prompt ({len(token_ids)} tokens) exceeds max_model_len "
                f"({self.model.max_model_len})",
                field="max_tokens",
            )
        if not isinstance(priority, int) or isinstance(priority, bool):
            raise InvalidArgument(f"priority must be an integer, got {priority!r}", field="priority")
        return EngineRequest(
            request_id=request_id or f"req-{uuid.uuid4().hex}",
            prompt_token_ids=token_ids,
            params=params,
            priority=priority,
            parse_chat=parse_chat,
        )

    # ------------------------------------------------------------------ running
    async def stream(
        self, request: EngineRequest, *, trace_context: Mapping[str, str] | None = None
    ) -> AsyncIterator[RequestOutput]:
        """Run a request, at most `max_pending_requests` at once per gateway (else QueueFull)."""
        if self.pending >= self.max_pending_requests:
            raise QueueFull(
                f"{self.pending} requests are in flight (max_pending_requests={self.max_pending_requests}); "
                "retry later"
            )
        self.pending += 1
        thinking: list[str] = []
        try:
            with tracing.span("gateway.generate", parent=trace_context, request_id=request.request_id) as carrier:
                request = dataclasses.replace(request, trace_context=carrier)
                async with contextlib.aclosing(self.backend.generate(request)) as outputs:
                    async for output in outputs:
                        thinking += [d.text for d in output.chat_deltas if d.kind == "thinking"]
                        self._observe_chat(output)
                        yield output
        finally:
            self.pending -= 1
            if self.metrics is not None and thinking:
                self.metrics.thinking_tokens.labels(self.model.name).inc(self.count_tokens("".join(thinking)))

    def count_tokens(self, text: str) -> int:
        """Tokens of a piece of output text (e.g. the thinking part, for usage and metrics)."""
        return len(self.tokenizer.encode(text)) if text else 0

    def _observe_chat(self, output: RequestOutput) -> None:
        if self.metrics is None:
            return
        for delta in output.chat_deltas:
            if delta.kind == "tool_call":
                self.metrics.tool_calls.labels(self.model.name).inc()
            elif delta.kind == "error":
                self.metrics.tool_call_failures.labels(self.model.name).inc()

    async def run(self, request: EngineRequest, *, trace_context: Mapping[str, str] | None = None) -> RequestOutput:
        """Run to completion; returns the final output (whose `token_ids`/`text` are complete)."""
        final = None
        async for final in self.stream(request, trace_context=trace_context):
            pass
        if final is None:
            raise ServingError("the engine returned no output")
        return final


def _leading_field(message: str, default: str) -> str:
    head = message.split(" ", 1)[0].rstrip(":")
    return head if head.startswith(("messages", "tools")) else default
