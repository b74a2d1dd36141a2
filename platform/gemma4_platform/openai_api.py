"""OpenAI-compatible HTTP routes (`/v1/chat/completions`, `/v1/completions`, `/v1/models`, and on models with
audio `/v1/audio/transcriptions` and `/v1/audio/translations`) over a `Frontend`.

Routes are added to an existing FastAPI app (`add_openai_routes`) so that a Ray Serve ingress class can
own the app; `build_openai_app` makes a standalone one. Every failure, including a malformed body or a
missing API key, is answered in OpenAI's error format with the `ServingError`'s HTTP status.

A client that goes away must not keep its request generating: streamed responses watch for the
disconnect and always close the frontend stream (which aborts the engine request and frees its KV
blocks), and unary requests are cancelled the same way.

Bodies are read only up to `limits.max_request_bytes` (413 beyond it, as soon as the excess arrives)
and parsed off the event loop when large; a request names a model, and a name other than the served
one is 404 as OpenAI answers it. Only these routes exist: no `/docs` or `/openapi.json`.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import math
import time
from typing import Any, AsyncIterator, Awaitable, Callable, Coroutine, TypeVar

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response, StreamingResponse
from pydantic import BaseModel, ValidationError
from starlette.types import Receive, Scope, Send

from gemma4.engine import RequestOutput

from gemma4_platform import tracing
from gemma4_platform.auth import NO_KEYS, ApiKeys, KeyGrant, presented_keys
from gemma4_platform.backend import EngineRequest
from gemma4_platform.errors import (
    ModelNotFound,
    PayloadTooLarge,
    ServingError,
    Unimplemented,
    reported,
)
from gemma4_platform.frontend import Frontend
from gemma4_platform.media_input import MediaOptions
from gemma4_platform.openai_audio import (
    TRANSCRIBE,
    TRANSLATE,
    as_file_error,
    audio_response,
    audio_result,
    parse_audio_form,
)
from gemma4_platform.openai_schemas import (
    ChatCompletionRequest,
    CompletionRequest,
    ResponseMeta,
    TokenText,
    chat_completion,
    chat_completion_chunks,
    error_body,
    invalid_request,
    models_body,
    text_completion,
    text_completion_chunks,
)
from gemma4_platform.serve_logs import serve_logger

logger = serve_logger(__name__)

T = TypeVar("T")
M = TypeVar("M", bound=BaseModel)
Handler = Callable[[Request, KeyGrant, contextlib.ExitStack], Awaitable[Response]]
Endpoint = Callable[[Request], Awaitable[Response]]
Outputs = AsyncIterator[RequestOutput]
CLIENT_CLOSED_REQUEST = 499  # nginx's status for "the client left before the answer"
INLINE_PARSE_BYTES = 65_536  # larger bodies are parsed on a worker thread


def build_openai_app(get_frontend: Callable[[], Frontend], *, api_keys: ApiKeys = NO_KEYS) -> FastAPI:
    """A FastAPI app serving only the OpenAI routes."""
    app = FastAPI(title="Gemma 4 OpenAI-compatible API", docs_url=None, redoc_url=None, openapi_url=None)
    add_openai_routes(app, get_frontend, lambda: api_keys)
    return app


def add_openai_routes(
    app: FastAPI,
    get_frontend: Callable[[], Frontend],
    get_api_keys: Callable[[], ApiKeys] = lambda: NO_KEYS,
) -> None:
    """Register the routes on `app`; `get_frontend` and `get_api_keys` are called per request (both may be
    known only once the serving process has started).

    With API keys configured, every route needs `Authorization: Bearer <key>` (or `x-api-key`).
    """
    created = int(time.time())

    def route(path: str, method: str) -> Callable[[Handler], Endpoint]:
        def register(handler: Handler) -> Endpoint:
            endpoint = _openai_endpoint(handler, get_api_keys, get_frontend)
            app.add_api_route(path, endpoint, methods=[method], response_class=Response)
            return endpoint

        return register

    @route("/v1/models", "GET")
    async def list_models(request: Request, caller: KeyGrant, admitted: contextlib.ExitStack) -> Response:
        model = get_frontend().model
        return JSONResponse(models_body(model.name, model.max_model_len, created))

    @route("/v1/chat/completions", "POST")
    async def chat_completions(request: Request, caller: KeyGrant, admitted: contextlib.ExitStack) -> Response:
        frontend = get_frontend()
        body = await _parse(request, ChatCompletionRequest, frontend)
        meta = ResponseMeta.new("chatcmpl", frontend.model.name)
        engine_request = await frontend.chat(
            body.messages,
            body.sampling(),
            caller=caller,
            tools=body.prompt_tools,
            thinking=body.thinking_enabled,
            media=MediaOptions(truncate_audio=body.truncate_audio),
            priority=body.priority,
            cache_salt=body.cache_salt,
        )
        token_text = _token_text(frontend)
        return await _respond(
            request,
            frontend,
            engine_request,
            admitted,
            stream=body.stream,
            unary=lambda outputs: chat_completion(meta, outputs, token_text=token_text, logprobs=body.logprobs),
            chunks=lambda outputs: chat_completion_chunks(
                meta, outputs, token_text=token_text, logprobs=body.logprobs, include_usage=body.include_usage
            ),
        )

    @route("/v1/audio/transcriptions", "POST")
    async def transcriptions(request: Request, caller: KeyGrant, admitted: contextlib.ExitStack) -> Response:
        return await _audio_task(request, get_frontend(), caller, TRANSCRIBE)

    @route("/v1/audio/translations", "POST")
    async def translations(request: Request, caller: KeyGrant, admitted: contextlib.ExitStack) -> Response:
        return await _audio_task(request, get_frontend(), caller, TRANSLATE)

    @route("/v1/completions", "POST")
    async def completions(request: Request, caller: KeyGrant, admitted: contextlib.ExitStack) -> Response:
        frontend = get_frontend()
        body = await _parse(request, CompletionRequest, frontend)
        meta = ResponseMeta.new("cmpl", frontend.model.name)
        engine_request = await frontend.completion(
            body.single_prompt(), body.sampling(), caller=caller, priority=body.priority, cache_salt=body.cache_salt
        )
        token_text = _token_text(frontend)
        return await _respond(
            request,
            frontend,
            engine_request,
            admitted,
            stream=body.stream,
            unary=lambda outputs: text_completion(meta, outputs, token_text=token_text),
            chunks=lambda outputs: text_completion_chunks(
                meta, outputs, token_text=token_text, include_usage=body.include_usage
            ),
        )


async def _audio_task(request: Request, frontend: Frontend, caller: KeyGrant, instruction: str) -> Response:
    """A transcription or translation: the uploaded audio and `instruction` as one chat turn, run unary."""
    if "audio" not in frontend.model.modalities:
        raise Unimplemented(
            f"this deployment serves no audio (modalities: {', '.join(frontend.model.modalities)})", field="file"
        )
    body = await read_body(request, frontend.limits.max_request_bytes)
    form = await parse_audio_form(body, request.headers.get("content-type", ""))
    _check_model(form.model, frontend)
    try:
        engine_request = await frontend.chat(form.messages(instruction), form.sampling(), caller=caller)
    except ServingError as exc:
        raise as_file_error(exc) from None
    outputs = frontend.stream(engine_request, trace_context=tracing.carrier_from_metadata(request.headers))
    result = await _unless_client_leaves(request.receive, audio_result(outputs))
    if result is None:
        return Response(status_code=CLIENT_CLOSED_REQUEST)
    return audio_response(*result, form.response_format)


def _openai_endpoint(
    handler: Handler, get_api_keys: Callable[[], ApiKeys], get_frontend: Callable[[], Frontend]
) -> Endpoint:
    """Check the API key and admit the request (the key's rate and streams, the gateway's queue), then
    run `handler`, answering any failure in OpenAI's error format. The handler gets the admission slot
    and owns it: what it does not release stays held until this returns (`_respond` keeps it for the
    whole answer, stream included).

    (Not `functools.wraps`: FastAPI would read the handler's own signature and take `caller` for a body.)
    """

    async def endpoint(request: Request) -> Response:
        try:
            caller = get_api_keys().authenticate(presented_keys(request.headers))
            with contextlib.ExitStack() as admitted:
                admitted.enter_context(get_frontend().admit(caller))
                return await handler(request, caller, admitted)
        except Exception as exc:  # noqa: BLE001 - a client still gets a well-formed error, never a traceback
            return error_response(reported(logger, f"{request.method} {request.url.path}", exc))

    endpoint.__name__ = endpoint.__qualname__ = handler.__name__
    return endpoint


def error_response(exc: ServingError) -> JSONResponse:
    """The OpenAI error body with the error's status (and `Retry-After` when it says when to retry)."""
    headers = {} if exc.retry_after_s is None else {"Retry-After": str(max(1, math.ceil(exc.retry_after_s)))}
    return JSONResponse(error_body(exc), status_code=exc.http_status, headers=headers)


async def read_body(request: Request, max_bytes: int) -> bytes:
    """The request body, refused with 413 as soon as it is known to exceed `max_bytes`."""
    declared = request.headers.get("content-length", "")
    if declared.isdigit() and int(declared) > max_bytes:
        raise PayloadTooLarge(f"the request body has {declared} bytes, more than the limit ({max_bytes})")
    chunks, size = [], 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > max_bytes:
            raise PayloadTooLarge(f"the request body exceeds the limit ({max_bytes} bytes)")
        chunks.append(chunk)
    return b"".join(chunks)


async def _parse(request: Request, model: type[M], frontend: Frontend) -> M:
    """The body as `model`, after the size limit; a `model` field naming another model is 404."""
    body = await read_body(request, frontend.limits.max_request_bytes)
    try:
        if len(body) <= INLINE_PARSE_BYTES:
            parsed = model.model_validate_json(body)
        else:
            parsed = await asyncio.get_running_loop().run_in_executor(None, model.model_validate_json, body)
    except ValidationError as exc:
        raise invalid_request(exc) from None
    _check_model(getattr(parsed, "model", None), frontend)
    return parsed


def _check_model(name: str | None, frontend: Frontend) -> None:
    """A request naming another model than the served one is 404, as OpenAI answers it."""
    if name is not None and name != frontend.model.name:
        raise ModelNotFound(f"The model `{name}` does not exist (this deployment serves `{frontend.model.name}`)", field="model")


def _token_text(frontend: Frontend) -> TokenText:
    """How logprobs name a token: its decoded text."""
    return lambda token_id: frontend.tokenizer.decode([token_id])


async def _respond(
    request: Request,
    frontend: Frontend,
    engine_request: EngineRequest,
    admitted: contextlib.ExitStack,
    *,
    stream: bool,
    unary: Callable[[Outputs], Coroutine[Any, Any, dict[str, Any]]],
    chunks: Callable[[Outputs], AsyncIterator[dict[str, Any]]],
) -> Response:
    """Run the request in the caller's trace; answer with `unary(outputs)` or an SSE stream of `chunks(outputs)`.

    `admitted` (the request's admission slot) is released when the answer is complete: after the unary
    body, or when the event stream ends however it ends.
    """
    with contextlib.ExitStack() as cleanup:
        cleanup.push(admitted.pop_all())
        outputs = frontend.stream(engine_request, trace_context=tracing.carrier_from_metadata(request.headers))
        if not stream:
            return await _unary(request, unary(outputs))
        replay = await _unless_client_leaves(request.receive, _started(outputs))
        if replay is None:
            return Response(status_code=CLIENT_CLOSED_REQUEST)
        return _EventStream(chunks(replay), source=outputs, release=cleanup.pop_all())


async def _started(outputs: Outputs) -> Outputs:
    """Wait for the first output now, so that a request refused before generating (queue full, invalid
    for the engine) gets its HTTP status instead of a 200 stream; returns an iterator that replays it."""
    first = await anext(outputs)

    async def replay() -> Outputs:
        yield first
        async for output in outputs:
            yield output

    return replay()


async def _unary(request: Request, body: Coroutine[Any, Any, dict[str, Any]]) -> Response:
    result = await _unless_client_leaves(request.receive, body)
    return JSONResponse(result) if result is not None else Response(status_code=CLIENT_CLOSED_REQUEST)


async def _unless_client_leaves(receive: Receive, work: Coroutine[Any, Any, T]) -> T | None:
    """`work`'s result, or None if the client disconnects first: `work` is then cancelled, which closes
    the frontend stream it iterates and so aborts the engine request."""
    task = asyncio.ensure_future(work)
    watcher = asyncio.ensure_future(_client_gone(receive))
    try:
        await asyncio.wait((task, watcher), return_when=asyncio.FIRST_COMPLETED)
    finally:
        watcher.cancel()
        task.cancel()
        await asyncio.wait((task,))  # its cleanup (the engine abort) has run when we return
    return None if task.cancelled() else task.result()


async def _client_gone(receive: Receive) -> None:
    """Returns once the server reports the client disconnected (the body has already been read)."""
    while (await receive())["type"] != "http.disconnect":
        pass


class _EventStream(StreamingResponse):
    """Server-sent events ending with `[DONE]`; errors after the first byte become an error event.

    Unlike Starlette's own response, it watches for the disconnect whatever the server's ASGI version,
    and closes both its chunk generator and the frontend stream `source` however it ends.
    """

    media_type = "text/event-stream"

    def __init__(self, chunks: AsyncIterator[dict[str, Any]], *, source: Outputs, release: contextlib.ExitStack) -> None:
        super().__init__(_sse(chunks), headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})
        self._source = source
        self._release = release

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        with self._release:
            try:
                await _unless_client_leaves(receive, self._send_all(send))
            finally:
                await self.body_iterator.aclose()
                await self._source.aclose()

    async def _send_all(self, send: Send) -> None:
        try:
            await self.stream_response(send)
        except OSError:  # ASGI 2.4 servers raise on sending to a client that has gone
            pass


async def _sse(chunks: AsyncIterator[dict[str, Any]]) -> AsyncIterator[str]:
    try:
        async for chunk in chunks:
            yield _event(chunk)
    except Exception as exc:  # noqa: BLE001 - the stream has started: report in-band
        yield _event(error_body(reported(logger, "OpenAI stream", exc)))
    yield "data: [DONE]\n\n"


def _event(body: dict[str, Any]) -> str:
    return f"data: {json.dumps(body, ensure_ascii=False, separators=(',', ':'))}\n\n"
