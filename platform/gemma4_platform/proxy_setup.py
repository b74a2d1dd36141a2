"""Hardening of Ray Serve's proxy processes: only our contract, on the addresses we chose, with our limits.

Ray starts its proxies itself, so the platform reaches them in two ways: environment variables
(`proxy_environment(settings)`: set before `ray.init` locally, in the pod spec on Kubernetes) and
Ray's HTTP-proxy callback, `RAY_SERVE_HTTP_PROXY_CALLBACK_IMPORT_PATH = configure_proxy`, which each
proxy calls while it starts, before its servers bind. `configure_proxy`:

* binds the plaintext gRPC port to `GEMMA4_GRPC_HOST` (Ray itself always binds `[::]`),
* drops Ray's own `RayServeAPIService` (ListApplications, Healthz), which would answer outside our
  API keys, and caps gRPC messages at `GEMMA4_MAX_REQUEST_BYTES` (Ray allows 2 GiB),
* cancels abandoned and stalled streams (`proxy_streams`), and passes a refusal's retry hint on as
  `retry-after` trailing metadata (Ray's proxy keeps only the code and details of a replica's error),
* keeps client errors out of the proxy log's tracebacks,
* returns the HTTP middleware that refuses oversized bodies (413) and hides `/-/routes`.
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Callable
from typing import Any

from gemma4_platform.proxy_streams import StreamPolicy
from gemma4_platform.settings import PlatformSettings

CALLBACK_ENV = "RAY_SERVE_HTTP_PROXY_CALLBACK_IMPORT_PATH"
CALLBACK = "gemma4_platform.proxy_setup.configure_proxy"
GRPC_HOST_ENV = "GEMMA4_GRPC_HOST"
MAX_REQUEST_BYTES_ENV = "GEMMA4_MAX_REQUEST_BYTES"
STALLED_TIMEOUT_ENV = "GEMMA4_STALLED_STREAM_TIMEOUT_S"
TLS_PORT_ENV = "GEMMA4_GRPC_TLS_PORT"  # read by grpc_registration, which opens the TLS port
TLS_HOST_ENV = "GEMMA4_GRPC_TLS_HOST"
TLS_CERT_ENV = "GEMMA4_TLS_CERT_FILE"
TLS_KEY_ENV = "GEMMA4_TLS_KEY_FILE"
DEFAULT_MAX_REQUEST_BYTES = PlatformSettings().limits.max_request_bytes


def proxy_environment(settings: PlatformSettings) -> dict[str, str]:
    """What every Ray process of this platform needs in its environment for the proxies to be hardened."""
    return {
        CALLBACK_ENV: CALLBACK,
        GRPC_HOST_ENV: settings.server.plaintext_grpc_host,
        MAX_REQUEST_BYTES_ENV: str(settings.limits.max_request_bytes),
        STALLED_TIMEOUT_ENV: str(settings.gateway.stalled_stream_timeout_s),
        **tls_environment(settings),
    }


def tls_environment(settings: PlatformSettings) -> dict[str, str]:
    """The proxy's TLS port settings (empty without a TLS port)."""
    server = settings.server
    if server.grpc_tls_port is None:
        return {}
    return {
        TLS_PORT_ENV: str(server.grpc_tls_port),
        TLS_HOST_ENV: server.host,
        TLS_CERT_ENV: str(server.tls_cert_file),
        TLS_KEY_ENV: str(server.tls_key_file),
    }


def stream_policy() -> StreamPolicy:
    return StreamPolicy(stalled_timeout_s=float(os.environ.get(STALLED_TIMEOUT_ENV, "30")))


def with_retry_hint(grpc_response_status: Callable[..., Any]) -> Callable[..., Any]:
    """Ray's error-to-status mapping, carrying a ServingError's retry hint in the status's `headers`."""
    from gemma4_platform.errors import ServingError
    from gemma4_platform.grpc_service import retry_metadata

    def status(exc: BaseException, *args: Any) -> Any:
        result = grpc_response_status(exc, *args)
        error = getattr(exc, "original_exception", None)  # Ray's gRPCStatusError around what the gateway raised
        if isinstance(error, ServingError) and error.retry_after_s is not None:
            return dataclasses.replace(result, headers=list(retry_metadata(error)))
        return result

    return status


def grpc_address(host: str, port: int | str) -> str:
    """`host:port` as gRPC expects it (IPv6 literals in brackets)."""
    return f"[{host}]:{port}" if ":" in host and not host.startswith("[") else f"{host}:{port}"


def binding_plaintext_on(host: str) -> Callable[[Any, str], Any]:
    """Ray's `add_grpc_address`, binding `host` instead of the `[::]:PORT` Ray passes."""

    def add_grpc_address(server: Any, address: str) -> Any:
        return server.add_insecure_port(grpc_address(host, address.rsplit(":", 1)[1]))

    return add_grpc_address


def configure_proxy() -> list[Any]:
    """Ray's HTTP-proxy callback: runs in each proxy process before its servers start."""
    from ray.serve._private import constants, default_impl, grpc_util, proxy
    from starlette.middleware import Middleware

    from gemma4_platform import proxy_streams, serve_logs
    from gemma4_platform.body_limit import BodyLimit

    max_bytes = int(os.environ.get(MAX_REQUEST_BYTES_ENV, DEFAULT_MAX_REQUEST_BYTES))
    host = os.environ.get(GRPC_HOST_ENV)
    if host:
        default_impl.add_grpc_address = binding_plaintext_on(host)
    grpc_util.add_RayServeAPIServiceServicer_to_server = lambda servicer, server: None
    constants.DEFAULT_GRPC_SERVER_OPTIONS[:] = [
        ("grpc.max_send_message_length", max_bytes),
        ("grpc.max_receive_message_length", max_bytes),
    ]
    proxy.get_grpc_response_status = with_retry_hint(proxy.get_grpc_response_status)
    proxy_streams.install(stream_policy())
    serve_logs.install()
    return [Middleware(BodyLimit, max_bytes=max_bytes)]
