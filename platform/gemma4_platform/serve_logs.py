"""Logging into Ray Serve's own log files, with client errors as one line, not a traceback in every
process they pass through.

Our modules log through children of Ray Serve's logger (`serve_logger`), so their lines land in the same
per-replica and per-proxy files as Ray's own, with the request id.

Ray Serve logs each exception a replica raises with its traceback ("Request failed."), in the
replica that raised it, in the gateway that relayed it and in the proxy that answered. For a request
that was refused (a `ServingError` with a client status: bad argument, no key, rate limit, ...) that
is noise, and 460 bad requests made over a thousand tracebacks. This filter, installed on Ray Serve's
logger in each of our processes, turns such records into one line naming the status and the reason;
unexpected errors keep their traceback.
"""

from __future__ import annotations

import logging
from typing import Any

from gemma4_platform.errors import CLIENT_CODES, ServingError

SERVE_LOGGER = "ray.serve"


def serve_logger(name: str) -> logging.Logger:
    """A logger whose records reach Ray Serve's log handlers (outside Ray: the root logger's)."""
    return logging.getLogger(f"{SERVE_LOGGER}.{name}")


def client_error_summary(exc: BaseException | None) -> str | None:
    """`CODE: message` when `exc` (or what it wraps) is a client error, else None."""
    seen = 0
    while exc is not None and seen < 8:
        seen += 1
        if isinstance(exc, ServingError):
            return f"{exc.grpc_code}: {exc.message}" if exc.is_client_error else None
        code: Any = getattr(exc, "grpc_code", None)  # Ray's gRPCStatusError
        if code is not None and getattr(code, "name", None) in CLIENT_CODES:
            return f"{code.name}: {getattr(exc, 'grpc_details', '')}"
        exc = getattr(exc, "cause", None) or getattr(exc, "original_exception", None) or exc.__cause__
    return None


class ClientErrorsAsOneLine(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        if record.exc_info and record.exc_info[1] is not None:
            summary = client_error_summary(record.exc_info[1])
            if summary is not None:
                record.msg, record.args = f"{record.getMessage()} {summary}", ()
                record.exc_info, record.exc_text = None, None
                record.levelno, record.levelname = logging.INFO, "INFO"
        return True


def install() -> None:
    """Add the filter to Ray Serve's logger in this process (once)."""
    logger = logging.getLogger(SERVE_LOGGER)
    if not any(isinstance(f, ClientErrorsAsOneLine) for f in logger.filters):
        logger.addFilter(ClientErrorsAsOneLine())
