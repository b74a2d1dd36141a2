"""Registers the gRPC service on Ray Serve's gRPC proxy, adding a TLS port when configured.

Ray's proxy imports this function by name (`grpc_servicer_functions`) and calls it on its server
before starting it. Ray itself only opens a plaintext port, so when the platform has certificates
this also opens `GEMMA4_GRPC_TLS_PORT` with them: same services, same proxy, encrypted. Running in the
proxy process, it also makes the proxy cancel abandoned streams (see `proxy_cancellation`).
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import grpc

from gemma4_platform import proxy_cancellation
from gemma4_platform.api.v1 import serving_pb2_grpc

TLS_PORT_ENV = "GEMMA4_GRPC_TLS_PORT"
TLS_CERT_ENV = "GEMMA4_TLS_CERT_FILE"
TLS_KEY_ENV = "GEMMA4_TLS_KEY_FILE"
SERVICER_FUNCTION = "gemma4_platform.grpc_registration.add_servicer"


def add_servicer(servicer: Any, server: Any) -> None:
    proxy_cancellation.install()
    serving_pb2_grpc.add_Gemma4ServingServicer_to_server(servicer, server)
    port = os.environ.get(TLS_PORT_ENV)
    if port:
        key = Path(os.environ[TLS_KEY_ENV]).read_bytes()
        cert = Path(os.environ[TLS_CERT_ENV]).read_bytes()
        server.add_secure_port(f"[::]:{port}", grpc.ssl_server_credentials([(key, cert)]))
