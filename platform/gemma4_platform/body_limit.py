"""An ASGI middleware that refuses HTTP request bodies over a size limit before they are read.

It runs in Ray Serve's HTTP proxy (so an oversized body never travels on to the gateway) and in front
of the gateway's own app. A declared `Content-Length` over the limit is answered 413 at once, without
reading a byte; a chunked body is counted as it arrives and, once over the limit, the app is told the
client left (so it stops) and the client gets the 413. Paths of Ray's own that are not part of our
contract (`/-/routes`) are 404.
"""

from __future__ import annotations

import json
from typing import Any

from starlette.types import ASGIApp, Message, Receive, Scope, Send

HIDDEN_PATHS = frozenset({"/-/routes"})


def _json_response(status: int, message: str, kind: str, code: str) -> tuple[Message, Message]:
    body = json.dumps({"error": {"message": message, "type": kind, "param": None, "code": code}}).encode()
    start = {
        "type": "http.response.start",
        "status": status,
        "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())],
    }
    return start, {"type": "http.response.body", "body": body, "more_body": False}


class BodyLimit:
    def __init__(self, app: ASGIApp, max_bytes: int) -> None:
        self.app = app
        self.max_bytes = max_bytes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        if scope.get("path") in HIDDEN_PATHS:
            await self._send(send, *_json_response(404, "not found", "invalid_request_error", "not_found"))
            return
        declared = _content_length(scope)
        if declared is not None and declared > self.max_bytes:
            await self._refuse(send, f"the request body has {declared} bytes, more than the limit ({self.max_bytes})")
            return
        await self._call_counting(scope, receive, send)

    async def _call_counting(self, scope: Scope, receive: Receive, send: Send) -> None:
        received = 0
        over = False
        started = False

        async def counting_receive() -> Message:
            nonlocal received, over
            if over:
                return {"type": "http.disconnect"}
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > self.max_bytes:
                    over = True
                    return {"type": "http.disconnect"}  # the app stops as if the client had left
            return message

        async def tracking_send(message: Message) -> None:
            nonlocal started
            if over:
                return  # the app's answer to a "disconnect" is not for the client
            started = started or message["type"] == "http.response.start"
            await send(message)

        await self.app(scope, counting_receive, tracking_send)
        if over and not started:
            await self._refuse(send, f"the request body exceeds the limit ({self.max_bytes} bytes)")

    async def _refuse(self, send: Send, message: str) -> None:
        await self._send(send, *_json_response(413, message, "invalid_request_error", "invalid_argument"))

    @staticmethod
    async def _send(send: Send, *messages: Message) -> None:
        for message in messages:
            await send(message)


def _content_length(scope: Scope) -> int | None:
    for name, value in scope.get("headers", ()):
        if name.lower() == b"content-length":
            text: Any = value.decode("latin-1").strip()
            return int(text) if text.isdigit() else None
    return None
