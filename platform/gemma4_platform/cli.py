"""`gemma4-platform`: run the serving graph locally, or write its Ray Serve config for KubeRay.

    gemma4-platform serve                       # tiny random-weight Gemma 4, HTTP :8000, gRPC :9000
    gemma4-platform serve --checkpoint /models/gemma-4-E4B-it --set replica.num_gpus=1
    gemma4-platform serve --set engine.tensor_parallel_size=2   # one replica over two ranks (CPU here)
    gemma4-platform config --settings prod.yaml # a Serve config file (serveConfigV2) for KubeRay
    gemma4-platform config --env                # the environment the Ray pods need (proxy hardening)
    gemma4-platform plan --variant 31b --dtype fp8 --max-model-len 32768   # GPUs and memory per replica
    gemma4-platform serve --set engine.speculative.model=ngram   # speculative decoding (or an assistant dir)

Settings come from an optional YAML/JSON file, then `--set section.field=value` overrides; they are
validated by `PlatformSettings`, and a bad value exits with a message naming the field.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import signal
import sys
import threading
from pathlib import Path
from typing import Any

import yaml
from pydantic import ValidationError

from gemma4.accelerators import ACCELERATORS, GiB
from gemma4.memory import KV_DTYPE_BYTES, SPECULATIVE_METHODS, WEIGHT_FORMATS, Plan, ServingSpec, plan
from gemma4_platform.grpc_registration import SERVICER_FUNCTION
from gemma4_platform.proxy_setup import proxy_environment
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
        settings = PlatformSettings.model_validate(raw)
    except ValidationError as exc:
        problems = "; ".join(": ".join(filter(None, (".".join(map(str, e["loc"])), e["msg"]))) for e in exc.errors())
        raise SystemExit(f"invalid settings: {problems}") from None
    try:
        settings.check_model()
    except ValueError as exc:
        raise SystemExit(f"invalid settings: {exc}") from None
    return settings


def serve_config(settings: PlatformSettings) -> dict[str, Any]:
    """A Ray Serve config file (the `serveConfigV2` of a KubeRay RayService) for these settings.

    The proxies' hardening is configured by environment (`gemma4_platform.proxy_setup.proxy_environment`),
    which the Ray pods must carry: the operator sets it; print it with `gemma4-platform config --env`.
    """
    server = settings.server
    return {
        "proxy_location": "EveryNode",
        "http_options": {"host": server.host, "port": server.http_port},
        "grpc_options": {
            "port": server.grpc_port,
            "grpc_servicer_functions": [SERVICER_FUNCTION],
            "enable_reflection": False,
        },
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
    """Start Ray locally with the graph; block until SIGINT/SIGTERM, then drain and stop.

    Stopping takes at most the drain time plus a few seconds, also when the signal reached Ray's own
    processes too (a signal to the whole process group kills the GCS, and Serve's shutdown then waits
    for a controller that cannot answer): each step gets a deadline.
    """
    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    server = settings.server
    # Inherited by Ray's proxy processes, which proxy_setup and grpc_registration configure from it.
    os.environ.update(proxy_environment(settings))
    import ray
    from ray import serve
    from ray.serve.config import HTTPOptions, gRPCOptions

    from gemma4_platform.graph import DRAIN_S, build_app, replica_resources

    try:
        application = build_app(settings.model_dump())  # checks the settings (and keys) before Ray starts
    except ValueError as exc:
        raise SystemExit(f"gemma4-platform serve: {exc}") from None

    local = {} if os.environ.get("RAY_ADDRESS") else {"num_cpus": local_cpus(settings, replica_resources(settings))}
    ray.init(include_dashboard=False, ignore_reinit_error=True, **local)
    http = {"host": server.host, "port": server.http_port}
    if server.tls_cert_file:
        http |= {"ssl_certfile": server.tls_cert_file, "ssl_keyfile": server.tls_key_file}
    serve.start(
        http_options=HTTPOptions(**http),
        grpc_options=gRPCOptions(
            port=server.grpc_port, grpc_servicer_functions=[SERVICER_FUNCTION], enable_reflection=False
        ),
    )
    serve.run(application, name=APP_NAME, route_prefix="/")
    scheme = "https" if server.tls_cert_file else "http"
    print(f"gemma4-platform is ready: OpenAI HTTP {scheme}://{server.host}:{server.http_port}/v1, "
          f"gRPC {server.plaintext_grpc_host}:{server.grpc_port}"
          + (f" (TLS {server.host}:{server.grpc_tls_port})" if server.grpc_tls_port else ""),
          flush=True)
    if not block:
        return
    stop = threading.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: stop.set())
    stop.wait()
    if not _finishes_within(5, ray.nodes):  # the GCS does not answer: the signal reached Ray's processes too
        print("Ray's processes are gone: nothing to drain", flush=True)
    else:
        print("draining...", flush=True)
        if not _finishes_within(DRAIN_S + 5, serve.shutdown):
            print("Serve did not stop within the drain time: stopping Ray", flush=True)
    if not _finishes_within(10, ray.shutdown):
        print("Ray did not stop within 10 s: exiting anyway", flush=True)


def local_cpus(settings: PlatformSettings, resources: dict[str, Any]) -> int:
    """Logical CPUs for a local Ray: this machine's, and at least what one replica reserves, so that a
    replica of several CPU ranks starts on a machine with fewer cores (its ranks then share them)."""
    bundles = resources.get("placement_group_bundles") or [{"CPU": settings.replica.num_cpus}]
    return max(os.cpu_count() or 1, math.ceil(sum(b.get("CPU", 0) for b in bundles)))


def _finishes_within(seconds: float, step: Any) -> bool:
    """Run `step` in a daemon thread; whether it returned (without raising) within `seconds`. A step
    that takes longer is abandoned."""
    done = threading.Event()

    def run() -> None:
        try:
            step()
        except Exception:  # noqa: BLE001 - a failed step did not finish
            return
        done.set()

    threading.Thread(target=run, daemon=True).start()
    return done.wait(seconds)


def _gib(n: int) -> str:
    return f"{n / GiB:.2f} GiB"


def format_plan(result: Plan) -> str:
    """The plan as a table: each memory item per GPU and per replica, then the verdict."""
    spec, mem, gpus = result.spec, result.per_gpu, result.gpus_per_replica
    rows = [("weights", mem.weights)]
    rows += [(f"  {name}", size) for name, size in result.weights_per_gpu.items()]
    rows += [
        (f"KV cache ({spec.max_num_seqs} x {spec.max_model_len} tokens)", mem.kv_cache),
        ("activations", mem.activations),
        *([("encoder cache", mem.encoder_cache)] if mem.encoder_cache else []),
        *([(f"speculative decoding ({spec.speculative_tokens} drafts)", mem.speculative)] if mem.speculative else []),
        ("CUDA graphs", mem.cuda_graphs),
        ("runtime overhead", mem.runtime_overhead),
        ("headroom", mem.headroom),
        ("total", mem.total),
        ("usable", mem.capacity),
    ]
    width = max(len(label) for label, _ in rows)
    lines = [
        f"Gemma 4 {spec.variant} on {result.accelerator}: {spec.weight_dtype} weights, {spec.kv_dtype} KV cache, "
        f"{spec.max_num_seqs} sequences x {spec.max_model_len} tokens",
        f"Layout: {gpus} x {result.accelerator} per replica (tensor parallel {result.tensor_parallel}, "
        f"expert parallel {result.expert_parallel})",
        "",
        f"{'':{width}}  {'per GPU':>11}  {'per replica':>11}",
        *(f"{label:{width}}  {_gib(size):>11}  {_gib(size * gpus):>11}" for label, size in rows),
        "",
        f"KV cache budget per GPU: {_gib(result.kv_cache_bytes_per_gpu)} ("
        + ", ".join(f"{name} {blocks} blocks" for name, blocks in result.kv_blocks.items())
        + f" of {spec.block_size} tokens)",
        f"Most sequences at {spec.max_model_len} tokens: {result.max_num_seqs_at_max_model_len}",
        f"Pod memory request: {_gib(result.host_memory_bytes)}",
        "",
    ]
    if result.feasible:
        lines.append("Fits.")
    else:
        lines.append(f"Does not fit: {result.reason}")
        lines += ["What would fit:", *(f"  - {s}" for s in result.suggestions)] if result.suggestions else []
    return "\n".join(lines)


def add_plan_parser(sub: Any) -> None:
    p = sub.add_parser("plan", help="size a replica: GPUs, memory per GPU, KV cache, pod memory")
    p.add_argument("--variant", required=True, help="e2b, e4b, 26b-a4b or 31b")
    p.add_argument("--dtype", default="bf16", choices=list(WEIGHT_FORMATS), help="weight dtype")
    p.add_argument("--kv-dtype", default="bf16", choices=list(KV_DTYPE_BYTES))
    p.add_argument("--accelerator", default="h100-80gb", choices=list(ACCELERATORS))
    p.add_argument("--max-model-len", type=int, default=8192)
    p.add_argument("--max-num-seqs", type=int, default=16)
    p.add_argument("--max-num-batched-tokens", type=int, default=2048)
    p.add_argument("--gpus", type=int, help="devices per replica (default: the fewest that fit)")
    p.add_argument("--modalities", default="text", help="comma-separated text,image,video,audio, or all")
    p.add_argument("--encoder-cache-tokens", type=int,
                   help="encoder-output cache in soft tokens, with media served (default: 2 x max-num-batched-tokens)")
    p.add_argument("--ple-on-host", action="store_true", help="plan the E2B/E4B PLE table in host memory, not on the GPU")
    p.add_argument("--gpu-memory-utilization", type=float, help="default: the accelerator's usable fraction")
    p.add_argument("--speculative", choices=list(SPECULATIVE_METHODS),
                   help="price speculative decoding: n-gram drafting, or the variant's published assistant drafter")
    p.add_argument("--num-speculative-tokens", type=int, help="drafts per sequence and step (default: the variant's)")
    p.add_argument("--json", action="store_true", help="print the plan as JSON")


def run_plan(args: argparse.Namespace) -> int:
    """Print the plan; 0 when it fits, 2 when it does not (or the spec is invalid)."""
    modalities = args.modalities if args.modalities == "all" else tuple(args.modalities.split(","))
    try:
        result = plan(ServingSpec(
            variant=args.variant, weight_dtype=args.dtype, kv_dtype=args.kv_dtype, accelerator=args.accelerator,
            max_model_len=args.max_model_len, max_num_seqs=args.max_num_seqs,
            max_num_batched_tokens=args.max_num_batched_tokens, gpus=args.gpus, modalities=modalities,
            ple_on_device=not args.ple_on_host, gpu_memory_utilization=args.gpu_memory_utilization,
            encoder_cache_tokens=args.encoder_cache_tokens, speculative=args.speculative,
            num_speculative_tokens=args.num_speculative_tokens,
        ))
    except ValueError as exc:
        print(f"gemma4-platform plan: {exc}", file=sys.stderr)
        return 2
    print(json.dumps(result.to_dict(), indent=2) if args.json else format_plan(result))
    return 0 if result.feasible else 2


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="gemma4-platform", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    for name, help_text in (("serve", "run the platform locally"), ("config", "print a Ray Serve config file")):
        p = sub.add_parser(name, help=help_text)
        p.add_argument("--settings", help="YAML or JSON settings file")
        p.add_argument("--checkpoint", help="checkpoint directory (default: a tiny random-weight model)")
        p.add_argument("--set", dest="overrides", action="append", default=[], metavar="SECTION.FIELD=VALUE")
        if name == "config":
            p.add_argument("--env", action="store_true", help="print the Ray pods' environment (NAME=VALUE) instead")
    add_plan_parser(sub)
    args = parser.parse_args(argv)
    if args.command == "plan":
        sys.exit(run_plan(args))
    settings = load_settings(args.settings, args.overrides, args.checkpoint)
    if args.command == "config" and args.env:
        print("\n".join(f"{name}={value}" for name, value in proxy_environment(settings).items()))
    elif args.command == "config":
        yaml.safe_dump(serve_config(settings), sys.stdout, sort_keys=False)
    else:
        run_serve(settings)


if __name__ == "__main__":
    main()
