"""The proxy patch: a server stream abandoned mid-way cancels the call it made; one read to the end does not."""

from __future__ import annotations

import asyncio
from typing import Any, AsyncIterator

from gemma4_platform import proxy_cancellation


class FakeCall:
    def __init__(self) -> None:
        self.was_cancelled = False

    def cancelled(self) -> bool:
        return self.was_cancelled

    def cancel(self) -> None:
        self.was_cancelled = True


class FakeHandle:
    deployment_name = "Gateway"

    def __init__(self) -> None:
        self.calls: list[FakeCall] = []

    def remote(self, *args: Any) -> FakeCall:
        self.calls.append(FakeCall())
        return self.calls[-1]


async def send_like_ray(self: Any, request_id: str, internal_request_id: str, handle: Any, proxy_request: Any) -> AsyncIterator[str]:
    """Like Ray's: reads attributes through the handle, swallows GeneratorExit, always ends with a status."""
    assert handle.deployment_name == "Gateway"
    handle.remote(proxy_request)
    try:
        for i in range(proxy_request):
            yield f"message {i}"
    except BaseException:  # noqa: BLE001 - what Ray does
        pass
    yield "status"


def run_consumer(messages_wanted: int, messages_sent: int) -> FakeHandle:
    handle = FakeHandle()
    send = proxy_cancellation.cancelling_abandoned_calls(send_like_ray)

    async def consume() -> None:
        stream = send(None, "id", "internal", handle, messages_sent)
        seen = 0
        async for _ in stream:
            seen += 1
            if seen == messages_wanted:
                break
        await stream.aclose()

    asyncio.run(consume())
    return handle


def test_abandoned_stream_cancels_its_call() -> None:
    handle = run_consumer(messages_wanted=2, messages_sent=100)
    assert [c.was_cancelled for c in handle.calls] == [True]


def test_stream_read_to_the_status_is_not_cancelled() -> None:
    handle = run_consumer(messages_wanted=1000, messages_sent=3)
    assert [c.was_cancelled for c in handle.calls] == [False]


def test_install_patches_rays_grpc_proxy_once() -> None:
    from ray.serve._private.proxy import gRPCProxy

    original = gRPCProxy.send_request_to_replica
    unpatched = getattr(original, "__wrapped__", original)
    try:
        gRPCProxy.send_request_to_replica = unpatched
        proxy_cancellation.install()
        proxy_cancellation.install()
        assert gRPCProxy.send_request_to_replica.__wrapped__ is unpatched
    finally:
        gRPCProxy.send_request_to_replica = original
