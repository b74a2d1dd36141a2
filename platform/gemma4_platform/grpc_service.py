"""The gRPC API (gemma4.serving.v1) over a `Frontend`, and the glue that mounts it on a grpc.aio server.

`Gemma4ServingService` is the protocol logic (auth, proto conversion, aggregation of streams) and
raises `ServingError` for every failure, so any host can map errors its own way: the Ray gateway sets
the code on Ray's context, `GrpcServicer` calls `context.abort` on a plain `grpc.aio` server (tests,
local mode). Streams are closed when their consumer stops, which aborts the engine request.
"""

from __future__ import annotations

import functools
import hmac
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator, Mapping, Sequence
from contextlib import aclosing, contextmanager
from typing import Any, Protocol

import grpc

from gemma4_platform import tracing
from gemma4_platform.api.v1 import serving_pb2 as pb
from gemma4_platform.api.v1 import serving_pb2_grpc
from gemma4_platform.errors import DeadlineExceeded, InvalidArgument, ServingError, Unauthenticated
from gemma4_platform.frontend import Frontend
from gemma4_platform.grpc_convert import (
    ChatChunker,
    chat_from_proto,
    generate_chunk,
    sampling_from_proto,
    with_proto_paths,
)


class RpcContext(Protocol):
    """What the service reads from a call: grpc.aio's ServicerContext and Ray's RayServegRPCContext both fit."""

    def invocation_metadata(self) -> Sequence[tuple[str, Any]] | None: ...


class Gemma4ServingService:
    """One method per RPC, `(request, context)`; streaming RPCs are async generators.

    `api_keys=None` turns auth off; otherwise every RPC needs `authorization: Bearer KEY` or
    `x-api-key: KEY`. `health` returns HealthResponse fields (the host knows its replicas); without
    it this process is the one ready replica.
    """

    def __init__(
        self,
        frontend: Frontend,
        *,
        api_keys: frozenset[str] | None = None,
        health: Callable[[], Awaitable[Mapping[str, Any]]] | None = None,
    ) -> None:
        self.frontend = frontend
        self.api_keys = api_keys
        self.health = health

    # ------------------------------------------------------------------ generation
    async def Generate(self, request: pb.GenerateRequest, context: RpcContext) -> pb.GenerateResponse:
        """GenerateStream folded into one message, so unary and streamed results cannot drift apart."""
        response = pb.GenerateResponse()
        text = []
        async with aclosing(self.GenerateStream(request, context)) as chunks:
            async for chunk in chunks:
                response.request_id = chunk.request_id
                text.append(chunk.delta_text)
                response.token_ids.extend(chunk.delta_token_ids)
                response.logprobs.extend(chunk.logprobs)
                if chunk.HasField("usage"):
                    response.finish_reason = chunk.finish_reason
                    response.stop_reason = chunk.stop_reason
                    response.usage.CopyFrom(chunk.usage)
        response.text = "".join(text)
        return response

    async def GenerateStream(
        self, request: pb.GenerateRequest, context: RpcContext
    ) -> AsyncIterator[pb.GenerateStreamResponse]:
        trace_context = tracing.carrier_from_metadata(self._authenticate(context))
        with _proto_paths():  # the engine validates too, when the request is added
            engine_request = self.frontend.completion(
                _prompt(request),
                sampling_from_proto(request.sampling),
                request_id=request.request_id or None,
                priority=request.priority,
            )
            async with aclosing(self.frontend.stream(engine_request, trace_context=trace_context)) as outputs:
                async for output in outputs:
                    yield generate_chunk(output)

    async def Chat(self, request: pb.ChatRequest, context: RpcContext) -> pb.ChatResponse:
        """ChatStream folded into one message (thinking, text and tool calls in order)."""
        response = pb.ChatResponse()
        text, thinking = [], []
        async with aclosing(self.ChatStream(request, context)) as chunks:
            async for chunk in chunks:
                response.request_id = chunk.request_id
                kind = chunk.WhichOneof("delta")
                if kind == "text":
                    text.append(chunk.text)
                elif kind == "thinking":
                    thinking.append(chunk.thinking)
                elif kind == "tool_call":
                    response.tool_calls.append(chunk.tool_call)
                if chunk.HasField("usage"):
                    response.finish_reason = chunk.finish_reason
                    response.usage.CopyFrom(chunk.usage)
        response.text = "".join(text)
        response.thinking = "".join(thinking)
        return response

    async def ChatStream(self, request: pb.ChatRequest, context: RpcContext) -> AsyncIterator[pb.ChatStreamResponse]:
        trace_context = tracing.carrier_from_metadata(self._authenticate(context))
        chat = chat_from_proto(request)
        chunker = ChatChunker(self.frontend.count_tokens)
        with _proto_paths(chat.origins):
            engine_request = self.frontend.chat(
                chat.messages,
                sampling_from_proto(request.sampling),
                tools=chat.tools,
                thinking=request.thinking,
                request_id=request.request_id or None,
                priority=request.priority,
            )
            async with aclosing(self.frontend.stream(engine_request, trace_context=trace_context)) as outputs:
                async for output in outputs:
                    for chunk in chunker.chunks(output):
                        yield chunk

    # ------------------------------------------------------------------ utilities
    async def Tokenize(self, request: pb.TokenizeRequest, context: RpcContext) -> pb.TokenizeResponse:
        self._authenticate(context)
        return pb.TokenizeResponse(token_ids=self.frontend.tokenizer.encode(request.text))

    async def CountTokens(self, request: pb.ChatRequest, context: RpcContext) -> pb.CountTokensResponse:
        self._authenticate(context)
        chat = chat_from_proto(request)
        with _proto_paths(chat.origins):
            token_ids = self.frontend.chat_token_ids(chat.messages, tools=chat.tools, thinking=request.thinking)
        return pb.CountTokensResponse(prompt_tokens=len(token_ids))

    async def GetModelInfo(self, request: pb.ModelInfoRequest, context: RpcContext) -> pb.ModelInfo:
        self._authenticate(context)
        model = self.frontend.model
        return pb.ModelInfo(
            model=model.name,
            variant=model.variant,
            max_model_len=model.max_model_len,
            modalities=model.modalities,
            vocab_size=model.vocab_size,
        )

    async def Health(self, request: pb.HealthRequest, context: RpcContext) -> pb.HealthResponse:
        self._authenticate(context)
        if self.health is None:
            return pb.HealthResponse(ready=True, ready_replicas=1)
        return pb.HealthResponse(**await self.health())

    # ------------------------------------------------------------------ helpers
    def _authenticate(self, context: RpcContext) -> list[tuple[str, Any]]:
        """The call's metadata, once its API key checks out (when keys are configured)."""
        metadata = list(context.invocation_metadata() or ())
        if self.api_keys is not None and not any(self._is_known(key) for key in _presented_keys(metadata)):
            raise Unauthenticated("a valid API key is required: send 'authorization: Bearer KEY' or 'x-api-key: KEY'")
        return metadata

    def _is_known(self, key: str) -> bool:
        # Constant-time comparisons against every key: timing reveals neither a prefix nor which key matched.
        matches = [hmac.compare_digest(key.encode(), known.encode()) for known in self.api_keys or ()]
        return any(matches)


def _presented_keys(metadata: Sequence[tuple[str, Any]]) -> Iterator[str]:
    for name, value in metadata:
        if not isinstance(value, str):
            continue
        name = name.lower()
        if name == "authorization":
            scheme, _, token = value.partition(" ")
            if scheme.lower() == "bearer":
                yield token.strip()
        elif name == "x-api-key":
            yield value.strip()


def _prompt(request: pb.GenerateRequest) -> str | list[int]:
    kind = request.WhichOneof("prompt")
    if kind is None:
        raise InvalidArgument("prompt: set text or token_ids", field="prompt")
    return request.text if kind == "text" else list(request.token_ids.ids)


@contextmanager
def _proto_paths(origins: Sequence[tuple[str, str]] = ()) -> Iterator[None]:
    """Re-raise the Frontend's errors naming the proto fields the client sent."""
    try:
        yield
    except ServingError as exc:
        raise with_proto_paths(exc, origins) from exc


# ---------------------------------------------------------------------- grpc.aio glue


def _check_deadline(context: grpc.aio.ServicerContext) -> None:
    remaining = context.time_remaining()
    if remaining is not None and remaining <= 0:
        raise DeadlineExceeded("the deadline passed before the request started")


def _unary(method: Callable[[Gemma4ServingService, Any, Any], Awaitable[Any]]) -> Callable[..., Awaitable[Any]]:
    @functools.wraps(method)
    async def handler(self: GrpcServicer, request: Any, context: grpc.aio.ServicerContext) -> Any:
        try:
            _check_deadline(context)
            return await method(self.service, request, context)
        except ServingError as exc:
            await context.abort(grpc.StatusCode[exc.grpc_code], exc.message)

    return handler


def _streaming(
    method: Callable[[Gemma4ServingService, Any, Any], AsyncIterator[Any]],
) -> Callable[..., AsyncIterator[Any]]:
    @functools.wraps(method)
    async def handler(self: GrpcServicer, request: Any, context: grpc.aio.ServicerContext) -> AsyncIterator[Any]:
        try:
            _check_deadline(context)
            # A cancelled call or an expired deadline cancels this task or closes this generator;
            # either way the service stream is closed and the engine request aborted.
            async with aclosing(method(self.service, request, context)) as responses:
                async for response in responses:
                    yield response
        except ServingError as exc:
            await context.abort(grpc.StatusCode[exc.grpc_code], exc.message)

    return handler


class GrpcServicer(serving_pb2_grpc.Gemma4ServingServicer):
    """The service on a plain `grpc.aio` server: a `ServingError` becomes the call's status."""

    def __init__(self, service: Gemma4ServingService) -> None:
        self.service = service

    Generate = _unary(Gemma4ServingService.Generate)
    GenerateStream = _streaming(Gemma4ServingService.GenerateStream)
    Chat = _unary(Gemma4ServingService.Chat)
    ChatStream = _streaming(Gemma4ServingService.ChatStream)
    Tokenize = _unary(Gemma4ServingService.Tokenize)
    CountTokens = _unary(Gemma4ServingService.CountTokens)
    GetModelInfo = _unary(Gemma4ServingService.GetModelInfo)
    Health = _unary(Gemma4ServingService.Health)


def add_servicer_to_server(server: grpc.aio.Server, service: Gemma4ServingService) -> None:
    """Serve `service` as gemma4.serving.v1.Gemma4Serving on `server`."""
    serving_pb2_grpc.add_Gemma4ServingServicer_to_server(GrpcServicer(service), server)
