"""Registers the gRPC service on Ray Serve's gRPC proxy, adding a TLS port when configured.

Ray's proxy imports this function by name (`grpc_servicer_functions`) and calls it on its server
before starting it. Ray itself only opens a plaintext port, so when the platform has certificates
this also opens `GEMMA4_GRPC_TLS_PORT` (on `GEMMA4_GRPC_TLS_HOST`) with them: same services, same
proxy, encrypted. The rest of the proxy's hardening happens earlier, in `proxy_setup.configure_proxy`;
this hook checks that it ran (and at least guards the proxy's streams when it did not).
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import grpc

from gemma4_platform import proxy_streams
from gemma4_platform.grpc_handlers import add_serving_handlers
from gemma4_platform.proxy_setup import (
    CALLBACK,
    CALLBACK_ENV,
    TLS_CERT_ENV,
    TLS_HOST_ENV,
    TLS_KEY_ENV,
    TLS_PORT_ENV,
    grpc_address,
    stream_policy,
)
from gemma4_platform.serve_logs import serve_logger

SERVICER_FUNCTION = "gemma4_platform.grpc_registration.add_servicer"
logger = serve_logger(__name__)


def add_servicer(servicer: Any, server: Any) -> None:
    proxy_streams.install(stream_policy())  # a no-op when configure_proxy already did it
    if os.environ.get(CALLBACK_ENV) != CALLBACK:
        logger.warning(
            "%s is not %s: this proxy serves Ray's own gRPC services, binds every interface and has no "
            "request size or stalled-stream limits (set the environment from gemma4_platform.proxy_setup)",
            CALLBACK_ENV, CALLBACK,
        )
    add_serving_handlers(servicer, server)
    port = os.environ.get(TLS_PORT_ENV)
    if port:
        key = Path(os.environ[TLS_KEY_ENV]).read_bytes()
        cert = Path(os.environ[TLS_CERT_ENV]).read_bytes()
        host = os.environ.get(TLS_HOST_ENV, "::")
        server.add_secure_port(grpc_address(host, port), grpc.ssl_server_credentials([(key, cert)]))
