"""Errors every front end maps the same way: one gRPC status code and one HTTP status per kind."""

from __future__ import annotations


class ServingError(Exception):
    """A request that cannot be served; `grpc_code` is a `grpc.StatusCode` name."""

    grpc_code = "INTERNAL"
    http_status = 500
    openai_type = "server_error"

    def __init__(self, message: str, *, field: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.field = field


class InvalidArgument(ServingError):
    grpc_code = "INVALID_ARGUMENT"
    http_status = 400
    openai_type = "invalid_request_error"


class Unauthenticated(ServingError):
    grpc_code = "UNAUTHENTICATED"
    http_status = 401
    openai_type = "authentication_error"


class QueueFull(ServingError):
    grpc_code = "RESOURCE_EXHAUSTED"
    http_status = 429
    openai_type = "rate_limit_error"


class Unavailable(ServingError):
    grpc_code = "UNAVAILABLE"
    http_status = 503
    openai_type = "server_error"


class Unimplemented(ServingError):
    grpc_code = "UNIMPLEMENTED"
    http_status = 501
    openai_type = "invalid_request_error"


class DeadlineExceeded(ServingError):
    grpc_code = "DEADLINE_EXCEEDED"
    http_status = 504
    openai_type = "timeout_error"


def invalid_from_value_error(exc: ValueError) -> InvalidArgument:
    """Engine/config validation messages start with the offending field's name: keep it as `field`."""
    message = str(exc)
    head = message.split(" ", 1)[0]
    field = head.split("[", 1)[0] if head.replace("_", "").replace("[", "").replace("]", "").isalnum() else None
    return InvalidArgument(message, field=field)
