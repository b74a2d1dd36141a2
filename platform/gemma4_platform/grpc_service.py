"""The gRPC API (gemma4.serving.v1) over a `Frontend`, and the glue that mounts it on a grpc.aio server.

`Gemma4ServingService` is the protocol logic (auth, proto conversion, aggregation of streams) and
raises `ServingError` for every failure, so any host can map errors its own way: the Ray gateway sets
the code on Ray's context, `GrpcServicer` calls `context.abort` on a plain `grpc.aio` server (tests,
local mode). Streams are closed when their consumer stops, which aborts the engine request.
"""

from __future__ import annotations

import functools
import math
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator, Mapping, Sequence
from contextlib import aclosing, contextmanager
from typing import Any, Protocol

import grpc

from gemma4_platform import tracing
from gemma4_platform.api.v1 import serving_pb2 as pb
from gemma4_platform.api.v1 import serving_pb2_grpc
from gemma4_platform.auth import NO_KEYS, ApiKeys, KeyGrant, presented_keys
from gemma4_platform.errors import DeadlineExceeded, InvalidArgument, ServingError, reported
from gemma4_platform.frontend import Frontend
from gemma4_platform.grpc_handlers import add_serving_handlers, check_request
from gemma4_platform.grpc_convert import (
    ChatChunker,
    chat_from_proto,
    chat_sampling,
    generate_chunk,
    generate_sampling,
    with_proto_paths,
)
from gemma4_platform.media_input import MediaOptions
from gemma4_platform.serve_logs import serve_logger


logger = serve_logger(__name__)


class RpcContext(Protocol):
    """What the service reads from a call: grpc.aio's ServicerContext and Ray's RayServegRPCContext both fit."""

    def invocation_metadata(self) -> Sequence[tuple[str, Any]] | None: ...


class Gemma4ServingService:
    """One method per RPC, `(request, context)`; streaming RPCs are async generators.

    Every RPC needs a known API key (`authorization: Bearer KEY` or `x-api-key: KEY`) when `api_keys`
    has any; the key's grant decides the priorities it may ask for and its rate and stream limits.
    `health` returns HealthResponse fields from the host's cached state; without it this process is
    the one ready replica.
    """

    def __init__(
        self,
        frontend: Frontend,
        *,
        api_keys: ApiKeys = NO_KEYS,
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
        caller, trace_context = self._authenticate(context, request)
        with self.frontend.admit(caller), _proto_paths():  # the engine validates too, when the request is added
            engine_request = await self.frontend.completion(
                _prompt(request),
                generate_sampling(request),
                caller=caller,
                request_id=request.request_id or None,
                priority=request.priority if request.HasField("priority") else None,
                cache_salt=request.cache_salt or None,
            )
            async with aclosing(self.frontend.stream(engine_request, trace_context=trace_context)) as outputs:
                async for output in outputs:
                    yield generate_chunk(output, engine_request.client_request_id)

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
        caller, trace_context = self._authenticate(context, request)
        with self.frontend.admit(caller):
            chat = chat_from_proto(request)
            with _proto_paths(chat.origins):
                engine_request = await self.frontend.chat(
                    chat.messages,
                    chat_sampling(request, chat.tools),
                    caller=caller,
                    tools=chat.prompt_tools,
                    thinking=request.thinking,
                    media=MediaOptions(truncate_audio=request.truncate_audio),
                    request_id=request.request_id or None,
                    priority=request.priority if request.HasField("priority") else None,
                    cache_salt=request.cache_salt or None,
                )
                chunker = ChatChunker(engine_request.client_request_id, self.frontend.count_tokens)
                async with aclosing(self.frontend.stream(engine_request, trace_context=trace_context)) as outputs:
                    async for output in outputs:
                        for chunk in await chunker.chunks(output):
                            yield chunk

    # ------------------------------------------------------------------ utilities
    async def Tokenize(self, request: pb.TokenizeRequest, context: RpcContext) -> pb.TokenizeResponse:
        caller, _ = self._authenticate(context, request)
        with self.frontend.admit(caller), _proto_paths():
            return pb.TokenizeResponse(token_ids=await self.frontend.tokenize(request.text))

    async def CountTokens(self, request: pb.ChatRequest, context: RpcContext) -> pb.CountTokensResponse:
        caller, _ = self._authenticate(context, request)
        with self.frontend.admit(caller):
            chat = chat_from_proto(request)
            with _proto_paths(chat.origins):
                prompt = await self.frontend.chat_prompt(
                    chat.messages,
                    tools=chat.prompt_tools,
                    thinking=request.thinking,
                    media=MediaOptions(truncate_audio=request.truncate_audio),
                )
        return pb.CountTokensResponse(prompt_tokens=len(prompt.token_ids))

    async def GetModelInfo(self, request: pb.ModelInfoRequest, context: RpcContext) -> pb.ModelInfo:
        self._authenticate(context, request)
        model = self.frontend.model
        return pb.ModelInfo(
            model=model.name,
            variant=model.variant,
            max_model_len=model.max_model_len,
            modalities=model.modalities,
            vocab_size=model.vocab_size,
        )

    async def Health(self, request: pb.HealthRequest, context: RpcContext) -> pb.HealthResponse:
        self._authenticate(context, request)
        if self.health is None:
            return pb.HealthResponse(ready=True, ready_replicas=1)
        return pb.HealthResponse(**await self.health())

    # ------------------------------------------------------------------ helpers
    def _authenticate(self, context: RpcContext, request: Any) -> tuple[KeyGrant, dict[str, str]]:
        """The caller's grant, once its API key checks out, and the trace context it sent; then the
        request must have parsed."""
        metadata = list(context.invocation_metadata() or ())
        caller = self.api_keys.authenticate(presented_keys(metadata))
        check_request(request)
        return caller, tracing.carrier_from_metadata(metadata)


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


async def _abort(context: grpc.aio.ServicerContext, exc: BaseException, method: str) -> None:
    """End the call with the error's status (an unexpected one as INTERNAL with an error id)."""
    error = reported(logger, f"gRPC {method}", exc)
    context.set_trailing_metadata(retry_metadata(error))
    await context.abort(grpc.StatusCode[error.grpc_code], error.message)


def retry_metadata(error: ServingError) -> tuple[tuple[str, str], ...]:
    """`retry-after` (whole seconds) and gRPC's own retry pushback, when the error says when to retry."""
    if error.retry_after_s is None:
        return ()
    return (
        ("retry-after", str(max(1, math.ceil(error.retry_after_s)))),
        ("grpc-retry-pushback-ms", str(max(1, round(error.retry_after_s * 1000)))),
    )


def _unary(method: Callable[[Gemma4ServingService, Any, Any], Awaitable[Any]]) -> Callable[..., Awaitable[Any]]:
    @functools.wraps(method)
    async def handler(self: GrpcServicer, request: Any, context: grpc.aio.ServicerContext) -> Any:
        try:
            _check_deadline(context)
            return await method(self.service, request, context)
        except Exception as exc:  # noqa: BLE001 - every failure gets a status, none a traceback
            await _abort(context, exc, method.__name__)

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
        except Exception as exc:  # noqa: BLE001
            await _abort(context, exc, method.__name__)

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
    add_serving_handlers(GrpcServicer(service), server)
