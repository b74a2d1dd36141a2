"""How Ray Serve's proxies stream to clients: abandoned streams cancel their call, stalled ones abort it.

Two gaps in Ray Serve 2.60's proxies, both fixed by wrapping their `send_request_to_replica`:

* Abandoned streams: the gRPC proxy cancels the downstream call only when the client goes away while
  the proxy waits for the next message. When it goes away while the proxy is handing a message to
  gRPC (the proxy's generator is suspended at `yield`), gRPC closes the generator,
  `send_request_to_replica` swallows the `GeneratorExit`, and the gateway (and the engine request
  behind it) runs to the end with nobody reading. The wrapper cancels every call it issued unless its
  stream was read through to the final status, however it ends.
* Stalled streams: a client that opens a stream and stops reading holds its KV cache and batch slot
  until its request ends. While the client accepts nothing, the proxy stops taking messages from the
  gateway (the transport's flow-control window is the buffer); once it has accepted nothing for
  `stalled_timeout_s`, the call is cancelled, which aborts the engine request and frees its KV, and
  the client's stream ends with RESOURCE_EXHAUSTED (gRPC) or a closed body (HTTP). Ray Serve has no
  end-to-end stream backpressure, so the engine keeps generating until that abort.

On the gRPC path the wrapper also turns a final status's `headers` into trailing metadata: that is how a
refusal's retry hint (`retry-after`) reaches the client (see `proxy_setup`).

`install(policy)` patches both proxy classes in the proxy process, once.
"""

from __future__ import annotations

import asyncio
import functools
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from typing import Any

_INSTALLED_MARK = "_gemma4_guards_streams"


@dataclass(frozen=True)
class StreamPolicy:
    stalled_timeout_s: float = 30.0


class RecordingHandle:
    """A deployment handle that remembers the calls made through it, so they can be cancelled."""

    def __init__(self, handle: Any) -> None:
        self._handle = handle
        self.calls: list[Any] = []

    def remote(self, *args: Any, **kwargs: Any) -> Any:
        call = self._handle.remote(*args, **kwargs)
        self.calls.append(call)
        return call

    def cancel_unfinished(self) -> None:
        for call in self.calls:
            if not call.cancelled():
                call.cancel()

    def __getattr__(self, name: str) -> Any:
        return getattr(self._handle, name)


StalledEnding = Callable[[float], list[Any]]  # the messages that end a stalled stream, given the timeout
StatusHook = Callable[[Any, Any], None]  # (proxy request, message): sees every message before it goes out


def guarded(
    send_request_to_replica: Callable[..., AsyncIterator[Any]],
    policy: StreamPolicy,
    stalled_ending: StalledEnding,
    on_message: StatusHook = lambda request, message: None,
) -> Callable[..., AsyncIterator[Any]]:
    """`send_request_to_replica`, cancelling its calls when its stream is abandoned or stalls."""

    @functools.wraps(send_request_to_replica)
    async def wrapper(self: Any, request_id: str, internal_request_id: str, handle: Any, proxy_request: Any, *args: Any, **kwargs: Any) -> AsyncIterator[Any]:
        recording = RecordingHandle(handle)
        inner = send_request_to_replica(self, request_id, internal_request_id, recording, proxy_request, *args, **kwargs)
        stalled = False

        def on_stall() -> None:
            nonlocal stalled
            stalled = True
            recording.cancel_unfinished()

        loop = asyncio.get_running_loop()
        completed = False
        try:
            async for message in inner:
                on_message(proxy_request, message)
                timer = loop.call_later(policy.stalled_timeout_s, on_stall)
                try:
                    yield message  # suspended for as long as the client does not accept the message
                finally:
                    timer.cancel()
                if stalled:
                    break
            else:
                completed = True
            if stalled:
                await _close_quietly(inner)
                for ending in stalled_ending(policy.stalled_timeout_s):
                    yield ending
                completed = True
        finally:
            if not completed:
                recording.cancel_unfinished()

    setattr(wrapper, _INSTALLED_MARK, True)
    return wrapper


async def _close_quietly(stream: Any) -> None:
    """Close Ray's generator, which swallows GeneratorExit (Python then raises RuntimeError)."""
    try:
        await stream.aclose()
    except RuntimeError:
        pass


def _stalled_message(timeout_s: float) -> str:
    return (
        f"the stream was aborted: the client accepted no message for {timeout_s:g} s "
        "(gateway.stalled_stream_timeout_s)"
    )


def grpc_stalled_ending(timeout_s: float) -> list[Any]:
    import grpc
    from ray.serve._private.proxy_request_response import ResponseStatus

    return [ResponseStatus(code=grpc.StatusCode.RESOURCE_EXHAUSTED, is_error=True, message=_stalled_message(timeout_s))]


def grpc_trailing_metadata(proxy_request: Any, message: Any) -> None:
    """A final status's `headers` (which Ray uses on HTTP only) become the gRPC call's trailing metadata."""
    from ray.serve._private.proxy_request_response import ResponseStatus

    if isinstance(message, ResponseStatus) and message.headers:
        proxy_request.context.set_trailing_metadata(tuple(message.headers))


def http_stalled_ending(timeout_s: float) -> list[Any]:
    from ray.serve._private.proxy_request_response import ResponseStatus

    # The status line went out long ago: end the body, and record the outcome as 429.
    return [
        {"type": "http.response.body", "body": b"", "more_body": False},
        ResponseStatus(code="429", is_error=True, message=_stalled_message(timeout_s)),
    ]


def install(policy: StreamPolicy) -> None:
    """Patch Ray Serve's gRPC and HTTP proxy classes in this process (idempotent)."""
    from ray.serve._private.proxy import HTTPProxy, gRPCProxy

    grpc_guard = functools.partial(guarded, stalled_ending=grpc_stalled_ending, on_message=grpc_trailing_metadata)
    http_guard = functools.partial(guarded, stalled_ending=http_stalled_ending)
    for proxy, guard in ((gRPCProxy, grpc_guard), (HTTPProxy, http_guard)):
        if not getattr(proxy.send_request_to_replica, _INSTALLED_MARK, False):
            proxy.send_request_to_replica = guard(proxy.send_request_to_replica, policy)
