"""Registers the gRPC service with request parsing that never raises.

gRPC parses a request before any of our code runs; when its bytes are not a valid message (corrupt wire
format, invalid UTF-8 in a string field), the parser's exception becomes `UNKNOWN: Unexpected <class
'DecodeError'>` with no say of ours. Here each method's parser is wrapped: bytes that do not parse
become a `MalformedRequest`, which travels to the service like a request and is refused there as
INVALID_ARGUMENT (`check_request`), after authentication and like any other bad input.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

from google.protobuf.message import DecodeError

from gemma4_platform.api.v1 import serving_pb2_grpc
from gemma4_platform.errors import InvalidArgument


@dataclass(frozen=True)
class MalformedRequest:
    """What a method receives for request bytes that are not its message (picklable: it crosses Ray)."""

    message_type: str


def tolerant(parse: Callable[[bytes], Any]) -> Callable[[bytes], Any]:
    """`parse` (a message class's `FromString`), returning a `MalformedRequest` where it would raise."""
    message_type = parse.__self__.DESCRIPTOR.full_name  # type: ignore[attr-defined]

    def parse_or_flag(data: bytes) -> Any:
        try:
            return parse(data)
        except DecodeError:
            return MalformedRequest(message_type)

    return parse_or_flag


def check_request(request: Any) -> None:
    if isinstance(request, MalformedRequest):
        raise InvalidArgument(f"the request is not a valid {request.message_type} message", field="request")


def _tolerant_handlers(handlers: Mapping[str, Any]) -> dict[str, Any]:
    return {name: h._replace(request_deserializer=tolerant(h.request_deserializer)) for name, h in handlers.items()}


class _TolerantRegistration:
    """Stands in for the server while the generated code registers its handlers, rewriting their parsers."""

    def __init__(self, server: Any) -> None:
        self._server = server

    def add_generic_rpc_handlers(self, generic_handlers: tuple[Any, ...]) -> None:
        for handler in generic_handlers:  # fresh handler objects of the generated code's own making
            handler._method_handlers = _tolerant_handlers(handler._method_handlers)
        self._server.add_generic_rpc_handlers(generic_handlers)

    def add_registered_method_handlers(self, service: str, handlers: Mapping[str, Any]) -> None:
        self._server.add_registered_method_handlers(service, _tolerant_handlers(handlers))


def add_serving_handlers(servicer: Any, server: Any) -> None:
    """`add_Gemma4ServingServicer_to_server`, with parsers that flag malformed requests instead of raising."""
    serving_pb2_grpc.add_Gemma4ServingServicer_to_server(servicer, _TolerantRegistration(server))
