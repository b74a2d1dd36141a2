"""The whole platform on a local Ray Serve, for tests that need it served for real: free ports, the
tiny MoE-shaped settings, bounded waits, and a context manager that starts and stops Ray and Serve."""

from __future__ import annotations

import contextlib
import functools
import os
import random
import socket
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any, TypeVar

import ray
from prometheus_client.parser import text_string_to_metric_families
from ray import serve
from ray.serve.config import HTTPOptions, gRPCOptions

from gemma4_platform.graph import build_app
from gemma4_platform.grpc_registration import SERVICER_FUNCTION
from gemma4_platform.proxy_setup import proxy_environment
from gemma4_platform.settings import PlatformSettings

APP = "gemma4"
T = TypeVar("T")

# One CPU replica of a tiny random-weight 26B-A4B-shaped model (MoE layers, so the expert metrics exist).
TINY_MOE_SETTINGS: dict[str, Any] = {
    "model": {"name": "tiny-moe", "tiny_variant": "26b-a4b", "dtype": "float32", "device": "cpu"},
    "engine": {"num_kv_blocks": 512, "max_num_batched_tokens": 256, "max_model_len": 1024, "max_num_seqs": 64},
    "replica": {
        "num_cpus": 0,
        "max_ongoing_requests": 64,
        "autoscaling": {"min_replicas": 1, "max_replicas": 1, "target_ongoing_requests": 2},
    },
    "telemetry": {"metrics_interval_s": 0.5},
}


# Below the kernel's ephemeral range and above Ray's worker ports (10002-19999): a port the OS hands out
# for `bind(0)` can be taken by one of Ray's own servers between our check and the proxy's bind.
_PORT_RANGE = (20000, 32000)
_rng = random.Random()


@functools.cache
def _wildcard_addresses() -> tuple[tuple[socket.AddressFamily, str], ...]:
    """The wildcard addresses this machine can bind (IPv6 only where it exists); probed once."""
    addresses = [(socket.AF_INET, "0.0.0.0")]
    try:
        with socket.socket(socket.AF_INET6) as s:
            s.bind(("::", 0))
        addresses.append((socket.AF_INET6, "::"))
    except OSError:  # no IPv6 on this machine
        pass
    return tuple(addresses)


def free_port() -> int:
    """A port free on every interface (Ray's gRPC proxy binds `[::]`), outside the ephemeral range."""
    for _ in range(200):
        port = _rng.randrange(*_PORT_RANGE)
        try:
            for family, host in _wildcard_addresses():
                with socket.socket(family) as s:
                    s.bind((host, port))
            return port
        except OSError:
            continue
    raise RuntimeError(f"no free port in {_PORT_RANGE}")


def wait_until(predicate: Callable[[], T], timeout: float, interval: float = 0.25, what: str = "condition") -> T:
    """The predicate's first truthy value, polled until `timeout` seconds have passed."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(interval)
    raise AssertionError(f"timed out after {timeout}s waiting for {what}")


def kv_used_and_aborted(metrics_text: str) -> tuple[float, float]:
    """KV blocks in use and aborted requests, summed over every replica, from the gateway's /metrics text."""
    used = aborted = 0.0
    for family in text_string_to_metric_families(metrics_text):
        for sample in family.samples:
            if sample.name == "gemma4_kv_cache_blocks" and sample.labels.get("state") == "used":
                used += sample.value
            if sample.name == "vllm:request_success_total" and sample.labels.get("finished_reason") == "abort":
                aborted += sample.value
    return used, aborted


@dataclass(frozen=True)
class ServedPlatform:
    """Where the served platform listens (all on 127.0.0.1)."""

    http: str  # base URL of the gateway's HTTP port (OpenAI API, /metrics)
    grpc_target: str  # host:port of the gRPC ingress
    ray_metrics: str | None  # Ray's Prometheus export URL, when a metrics port was asked for


@contextlib.contextmanager
def served_platform(
    settings: dict[str, Any], *, ray_metrics_port: int | None = None, num_cpus: int = 4
) -> Iterator[ServedPlatform]:
    """Start Ray, Serve (HTTP and gRPC ingress) and the application; shut all down on exit.

    Ray's processes inherit the proxy hardening's environment from this one (as `gemma4-platform serve`
    sets it up). With `ray_metrics_port`, Ray exports its metrics there and reports them every second.
    """
    validated = PlatformSettings.model_validate(settings)
    http_port, grpc_port = free_port(), free_port()
    metrics_options: dict[str, Any] = {}
    if ray_metrics_port is not None:
        metrics_options = {
            "_metrics_export_port": ray_metrics_port,
            "_system_config": {"metrics_report_interval_ms": 1000},
        }
    environment = proxy_environment(validated)
    saved = {name: os.environ.get(name) for name in environment}
    os.environ.update(environment)
    ray.init(num_cpus=num_cpus, include_dashboard=False, log_to_driver=False, **metrics_options)
    try:
        serve.start(
            http_options=HTTPOptions(host="127.0.0.1", port=http_port),
            grpc_options=gRPCOptions(
                port=grpc_port, grpc_servicer_functions=[SERVICER_FUNCTION], enable_reflection=False
            ),
        )
        serve.run(build_app(validated.model_dump()), name=APP, route_prefix="/")
        yield ServedPlatform(
            http=f"http://127.0.0.1:{http_port}",
            grpc_target=f"127.0.0.1:{grpc_port}",
            ray_metrics=f"http://127.0.0.1:{ray_metrics_port}/metrics" if ray_metrics_port is not None else None,
        )
    finally:
        serve.shutdown()
        ray.shutdown()
        for name, value in saved.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value
