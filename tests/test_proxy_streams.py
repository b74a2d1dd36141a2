"""The proxy patch: an abandoned server stream cancels the call it made, one read to the end does not, and a
stream whose client accepts nothing for the stall timeout is cancelled and ends with the stall status."""

from __future__ import annotations

import asyncio
from typing import Any, AsyncIterator

from gemma4_platform import proxy_streams

POLICY = proxy_streams.StreamPolicy(stalled_timeout_s=0.2)


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
    call = handle.remote(proxy_request)
    try:
        for i in range(proxy_request):
            if call.cancelled():
                raise asyncio.CancelledError
            yield f"message {i}"
    except BaseException:  # noqa: BLE001 - what Ray does
        pass
    yield "status"


def stalled_ending(timeout_s: float) -> list[str]:
    return [f"stalled after {timeout_s}"]


def guarded_send() -> Any:
    return proxy_streams.guarded(send_like_ray, POLICY, stalled_ending)


def run_consumer(messages_wanted: int, messages_sent: int) -> FakeHandle:
    handle = FakeHandle()
    send = guarded_send()

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


def test_a_consumer_that_stops_accepting_has_its_call_cancelled_and_gets_the_stall_status() -> None:
    handle = FakeHandle()
    stream = guarded_send()(None, "id", "internal", handle, 100)

    async def consume() -> list[str]:
        received = [await anext(stream)]
        # The consumer (the proxy writing to a client that does not read) holds the stream at its yield
        # until the timer fires; the wait is bounded by waiting for the cancellation itself.
        for _ in range(200):
            if handle.calls[0].was_cancelled:
                break
            await asyncio.sleep(0.05)
        received += [message async for message in stream]
        return received

    received = asyncio.run(consume())
    assert handle.calls[0].was_cancelled
    assert received == ["message 0", f"stalled after {POLICY.stalled_timeout_s}"]


def test_a_slow_but_steady_consumer_is_not_cancelled() -> None:
    handle = FakeHandle()
    stream = guarded_send()(None, "id", "internal", handle, 5)

    async def consume() -> list[str]:
        received = []
        async for message in stream:
            received.append(message)
            await asyncio.sleep(POLICY.stalled_timeout_s / 4)
        return received

    assert asyncio.run(consume()) == [f"message {i}" for i in range(5)] + ["status"]
    assert not handle.calls[0].was_cancelled


def test_install_patches_both_of_rays_proxies_once() -> None:
    from ray.serve._private.proxy import HTTPProxy, gRPCProxy

    originals = {proxy: proxy.send_request_to_replica for proxy in (gRPCProxy, HTTPProxy)}
    try:
        for proxy, original in originals.items():
            proxy.send_request_to_replica = getattr(original, "__wrapped__", original)
        proxy_streams.install(POLICY)
        proxy_streams.install(POLICY)
        for proxy, original in originals.items():
            assert proxy.send_request_to_replica.__wrapped__ is getattr(original, "__wrapped__", original)
    finally:
        for proxy, original in originals.items():
            proxy.send_request_to_replica = original
