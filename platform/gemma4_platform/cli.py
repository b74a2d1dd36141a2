"""`gemma4-platform`: run the serving graph locally, or write its Ray Serve config for KubeRay.

    gemma4-platform serve                       # tiny random-weight Gemma 4, HTTP :8000, gRPC :9000
    gemma4-platform serve --checkpoint /models/gemma-4-E4B-it --set replica.num_gpus=1
    gemma4-platform config --settings prod.yaml # a Serve config file (serveConfigV2) for KubeRay

Settings come from an optional YAML/JSON file, then `--set section.field=value` overrides; they are
validated by `PlatformSettings`, and a bad value exits with a message naming the field.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import sys
import threading
from pathlib import Path
from typing import Any

import yaml
from pydantic import ValidationError

from gemma4_platform.grpc_registration import SERVICER_FUNCTION, TLS_CERT_ENV, TLS_KEY_ENV, TLS_PORT_ENV
from gemma4_platform.settings import PlatformSettings

APP_NAME = "gemma4"


def load_settings(path: str | None, overrides: list[str], checkpoint: str | None) -> PlatformSettings:
    raw: dict[str, Any] = {}
    if path:
        text = Path(path).read_text(encoding="utf-8")
        raw = (json.loads(text) if path.endswith(".json") else yaml.safe_load(text)) or {}
    for item in overrides:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise SystemExit(f"--set expects section.field=value, got {item!r}")
        target = raw
        *parents, leaf = key.split(".")
        for part in parents:
            target = target.setdefault(part, {})
        target[leaf] = yaml.safe_load(value)
    if checkpoint:
        raw.setdefault("model", {})["path"] = checkpoint
    try:
        return PlatformSettings.model_validate(raw)
    except ValidationError as exc:
        problems = "; ".join(f"{'.'.join(str(p) for p in e['loc'])}: {e['msg']}" for e in exc.errors())
        raise SystemExit(f"invalid settings: {problems}") from None


def serve_config(settings: PlatformSettings) -> dict[str, Any]:
    """A Ray Serve config file (the `serveConfigV2` of a KubeRay RayService) for these settings."""
    server = settings.server
    return {
        "proxy_location": "EveryNode",
        "http_options": {"host": "0.0.0.0", "port": server.http_port},
        "grpc_options": {"port": server.grpc_port, "grpc_servicer_functions": [SERVICER_FUNCTION]},
        "applications": [
            {
                "name": APP_NAME,
                "route_prefix": "/",
                "import_path": "gemma4_platform.graph:build_app",
                "args": settings.model_dump(mode="json"),
            }
        ],
    }


def run_serve(settings: PlatformSettings, *, block: bool = True) -> None:
    """Start Ray locally with the graph; block until SIGINT/SIGTERM, then drain and stop."""
    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    server = settings.server
    if server.grpc_tls_port is not None:
        # Inherited by Ray's proxy process, where grpc_registration opens the TLS port.
        os.environ[TLS_PORT_ENV] = str(server.grpc_tls_port)
        os.environ[TLS_CERT_ENV] = str(server.tls_cert_file)
        os.environ[TLS_KEY_ENV] = str(server.tls_key_file)
    import ray
    from ray import serve
    from ray.serve.config import HTTPOptions, gRPCOptions

    from gemma4_platform.graph import build_app

    ray.init(include_dashboard=False, ignore_reinit_error=True)
    http = {"host": server.host, "port": server.http_port}
    if server.tls_cert_file:
        http |= {"ssl_certfile": server.tls_cert_file, "ssl_keyfile": server.tls_key_file}
    serve.start(
        http_options=HTTPOptions(**http),
        grpc_options=gRPCOptions(port=server.grpc_port, grpc_servicer_functions=[SERVICER_FUNCTION]),
    )
    serve.run(build_app(settings.model_dump()), name=APP_NAME, route_prefix="/")
    scheme = "https" if server.tls_cert_file else "http"
    print(f"gemma4-platform is ready: OpenAI HTTP {scheme}://{server.host}:{server.http_port}/v1, "
          f"gRPC {server.host}:{server.grpc_port}" + (f" (TLS :{server.grpc_tls_port})" if server.grpc_tls_port else ""),
          flush=True)
    if not block:
        return
    stop = threading.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: stop.set())
    stop.wait()
    print("draining...", flush=True)
    serve.shutdown()
    ray.shutdown()


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="gemma4-platform", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    for name, help_text in (("serve", "run the platform locally"), ("config", "print a Ray Serve config file")):
        p = sub.add_parser(name, help=help_text)
        p.add_argument("--settings", help="YAML or JSON settings file")
        p.add_argument("--checkpoint", help="checkpoint directory (default: a tiny random-weight model)")
        p.add_argument("--set", dest="overrides", action="append", default=[], metavar="SECTION.FIELD=VALUE")
    args = parser.parse_args(argv)
    settings = load_settings(args.settings, args.overrides, args.checkpoint)
    if args.command == "config":
        yaml.safe_dump(serve_config(settings), sys.stdout, sort_keys=False)
    else:
        run_serve(settings)


if __name__ == "__main__":
    main()
