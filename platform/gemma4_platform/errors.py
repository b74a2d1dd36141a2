"""Errors every front end maps the same way: one gRPC status code and one HTTP status per kind.

A `ServingError` is a client-visible outcome: its message goes to the client as it is, so it never
holds a traceback, a path or an address. Anything else that escapes a request is an internal error:
`reported` logs it once with a short error id and gives the client only that id.
"""

from __future__ import annotations

import copy
import logging
import uuid

from gemma4.media.inputs import MediaError

# gRPC codes that report a problem with the request or the caller, not with the server: logged as one
# line, never as a traceback.
CLIENT_CODES = frozenset({
    "CANCELLED", "INVALID_ARGUMENT", "DEADLINE_EXCEEDED", "NOT_FOUND", "PERMISSION_DENIED",
    "RESOURCE_EXHAUSTED", "UNAUTHENTICATED", "UNIMPLEMENTED", "FAILED_PRECONDITION", "OUT_OF_RANGE",
})


class ServingError(Exception):
    """A request that cannot be served; `grpc_code` is a `grpc.StatusCode` name.

    `retry_after_s` (when set) tells the client when to try again (HTTP `Retry-After`, gRPC
    `retry-after` and `grpc-retry-pushback-ms` trailing metadata).
    """

    grpc_code = "INTERNAL"
    http_status = 500
    openai_type = "server_error"
    openai_code: str | None = None  # OpenAI's `error.code`; default: the gRPC code in lower case

    def __init__(self, message: str, *, field: str | None = None, retry_after_s: float | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.field = field
        self.retry_after_s = retry_after_s

    def with_message(self, message: str, *, field: str | None) -> "ServingError":
        """The same error (same class and retry hint) with another message and field."""
        clone = copy.copy(self)
        Exception.__init__(clone, message)
        clone.message, clone.field = message, field
        return clone

    @property
    def is_client_error(self) -> bool:
        return self.grpc_code in CLIENT_CODES


class InvalidArgument(ServingError):
    grpc_code = "INVALID_ARGUMENT"
    http_status = 400
    openai_type = "invalid_request_error"


class PayloadTooLarge(InvalidArgument):
    """The request body or message exceeds `limits.max_request_bytes`."""

    http_status = 413


class NotFound(ServingError):
    grpc_code = "NOT_FOUND"
    http_status = 404
    openai_type = "invalid_request_error"


class ModelNotFound(NotFound):
    openai_code = "model_not_found"


class Unauthenticated(ServingError):
    grpc_code = "UNAUTHENTICATED"
    http_status = 401
    openai_type = "authentication_error"


class QueueFull(ServingError):
    grpc_code = "RESOURCE_EXHAUSTED"
    http_status = 429
    openai_type = "rate_limit_error"


class RateLimited(QueueFull):
    """A key's request rate or concurrent-stream limit was reached."""


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


class Internal(ServingError):
    """An unexpected failure, reported to the client only by its error id."""

    def __init__(self, error_id: str) -> None:
        super().__init__(f"internal server error (error id {error_id})")
        self.error_id = error_id


def invalid_from_value_error(exc: ValueError) -> InvalidArgument:
    """Engine/config validation messages start with the offending field's name: keep it as `field`
    (a `MediaError` names its part, `messages[1].content[0]`, in `where`)."""
    message = str(exc)
    if isinstance(exc, MediaError):
        return InvalidArgument(message, field=exc.where)
    head = message.split(" ", 1)[0]
    field = head.split("[", 1)[0] if head.replace("_", "").replace("[", "").replace("]", "").isalnum() else None
    return InvalidArgument(message, field=field)


def reported(logger: logging.Logger, what: str, exc: BaseException) -> ServingError:
    """The error the client gets for `exc`, logged once: a refusal as one line; anything unexpected with
    its traceback and a fresh error id, which is all the client learns of it."""
    if isinstance(exc, ServingError):
        if exc.is_client_error:
            logger.info("%s refused: %s: %s", what, exc.grpc_code, exc.message)
        return exc
    error_id = uuid.uuid4().hex[:12]
    logger.error("%s failed (error id %s)", what, error_id, exc_info=(type(exc), exc, exc.__traceback__))
    return Internal(error_id)
