"""Makes Ray Serve's gRPC proxy cancel the gateway call when a client abandons a server stream.

Ray Serve 2.60's proxy cancels the downstream call only when the client goes away while the proxy is
waiting for the next message. When it goes away while the proxy is handing a message to gRPC (the
proxy's generator is suspended at `yield`), gRPC closes the generator, `send_request_to_replica`
swallows the `GeneratorExit`, and the gateway (and the engine request behind it) runs to the end
with nobody reading: a cancelled 4k-token stream keeps its KV blocks and its batch slot.

`install()` wraps the proxy's `send_request_to_replica` so that any call it issued is cancelled when
its stream ends without reaching the final status, however it ends. It runs in the proxy process, from
the servicer registration hook, once per process.
"""

from __future__ import annotations

import functools
from typing import Any, AsyncIterator, Callable

_INSTALLED_MARK = "_gemma4_cancels_abandoned_calls"


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


def cancelling_abandoned_calls(send_request_to_replica: Callable[..., AsyncIterator[Any]]) -> Callable[..., AsyncIterator[Any]]:
    """`send_request_to_replica`, cancelling its calls unless its stream was read to the end."""

    @functools.wraps(send_request_to_replica)
    async def wrapper(self: Any, request_id: str, internal_request_id: str, handle: Any, *args: Any, **kwargs: Any) -> AsyncIterator[Any]:
        recording = RecordingHandle(handle)
        completed = False
        try:
            async for message in send_request_to_replica(self, request_id, internal_request_id, recording, *args, **kwargs):
                yield message
            completed = True
        finally:
            if not completed:
                recording.cancel_unfinished()

    setattr(wrapper, _INSTALLED_MARK, True)
    return wrapper


def install() -> None:
    """Patch Ray Serve's gRPC proxy class in this process (idempotent)."""
    from ray.serve._private.proxy import gRPCProxy

    if not getattr(gRPCProxy.send_request_to_replica, _INSTALLED_MARK, False):
        gRPCProxy.send_request_to_replica = cancelling_abandoned_calls(gRPCProxy.send_request_to_replica)
