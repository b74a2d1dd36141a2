"""The Ray Serve graph: a gateway ingress (gRPC + OpenAI HTTP) in front of autoscaled engine replicas.

`build_app(settings)` is the application builder for `serve.run` and for Serve config files
(`import_path: gemma4_platform.graph:build_app`, `args:` = `PlatformSettings`). Replicas load the
model in their constructor, so Serve reports them ready only once the model is loaded; the gateway
tokenizes, validates and routes with prefix affinity; a lost replica ends its streams with
UNAVAILABLE; closing a stream cancels the replica-side generator, which aborts the engine request.
"""

from __future__ import annotations

import asyncio
import contextlib
import hmac
import os
import tempfile
import time
from pathlib import Path
from typing import Any, AsyncIterator, Iterator

import grpc
import ray
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response
from ray import serve
from ray.exceptions import RayActorError, RayTaskError
from ray.serve.config import AutoscalingConfig, RequestRouterConfig
from ray.serve.exceptions import BackPressureError, DeploymentUnavailableError, ReplicaUnavailableError
from ray.serve.handle import DeploymentHandle

from gemma4.backends import backend_of
from gemma4.config import load_config
from gemma4.engine import LLMEngine, RequestOutput
from gemma4.engine.executor import WorkerFailure

from gemma4_platform import serve_logs, tracing
from gemma4_platform.auth import ApiKeys
from gemma4_platform.backend import EngineRequest, stream_from_engine
from gemma4_platform.errors import (
    QueueFull,
    ServingError,
    Unauthenticated,
    Unavailable,
    reported,
)
from gemma4_platform.frontend import Frontend, GatewayPolicy, ModelDescription
from gemma4_platform.grpc_service import Gemma4ServingService, retry_metadata
from gemma4_platform.metrics import GatewayMetrics, MetricsHub, ReplicaMetrics, ReplicaReport, merge_expositions
from gemma4_platform.openai_api import add_openai_routes, error_response
from gemma4_platform.ray_executor import RayExecutor
from gemma4_platform.routing import PrefixAffinityRouter
from gemma4_platform.settings import PlatformSettings
from gemma4_platform.serve_logs import serve_logger

logger = serve_logger(__name__)
HUB_NAME = "gemma4-metrics-hub"
TINY_FORMAT = 2  # in the tiny checkpoint's cache path: bump when write_tiny_checkpoint's output changes (2: towers)
DRAIN_S = 30  # a stopping deployment finishes its in-flight streams for up to this long
HEALTH_CHECK_TIMEOUT_S = 10
RANK_PING_TIMEOUT_S = 5  # within the health check's timeout: a rank that does not answer fails the check


def resolve_checkpoint(settings: PlatformSettings) -> str:
    """The checkpoint directory; without one, a tiny random-weight model written once per machine.

    The tiny weights are seeded, so every process on every node writes the identical model.
    """
    if settings.model.path:
        return settings.model.path
    from gemma4.tiny import write_tiny_checkpoint

    variant, seed = settings.model.tiny_variant, settings.engine.seed
    target = Path(tempfile.gettempdir()) / f"gemma4-tiny-{variant}-{seed}-v{TINY_FORMAT}"
    if not (target / "model.safetensors").is_file():
        staging = Path(tempfile.mkdtemp(prefix=f"gemma4-tiny-{variant}-", dir=tempfile.gettempdir()))
        write_tiny_checkpoint(staging, variant=variant, seed=seed)
        try:
            staging.rename(target)
        except OSError:  # another process won the race: its copy is identical
            pass
    return str(target)


def replica_device(settings: PlatformSettings) -> str:
    """The device the replica's model runs on. `auto` is the first GPU where there is one; a multi-device
    replica's own actor holds no device (its ranks have one each), so there `auto` follows the rank
    bundles: GPUs when the replica asks for them, else the CPU."""
    if settings.model.device != "auto":
        return settings.model.device
    if settings.engine.tensor_parallel_size > 1:
        return "cuda" if settings.replica.num_gpus else "cpu"
    from gemma4.backends import default_device

    return default_device()


def served_modalities(checkpoint: tuple[str, ...], setting: str | tuple[str, ...]) -> tuple[str, ...]:
    """What the gateway accepts: the checkpoint's modalities (`model.modalities: all`) or those of the
    setting's list that the checkpoint has; text always."""
    if setting == "all":
        return checkpoint
    return ("text", *(m for m in checkpoint if m != "text" and m in setting))


def replica_resources(settings: PlatformSettings) -> dict[str, Any]:
    """The replica deployment's resource options.

    One device: the replica actor holds it. N > 1 ranks: a placement group packed on one node, bundle 0
    for the replica actor (the engine core, no device) and one bundle per rank (a GPU and a CPU, or a
    CPU), which the `RayExecutor`'s rank actors fill.
    """
    r, ranks = settings.replica, settings.engine.tensor_parallel_size
    if ranks == 1:
        return {"ray_actor_options": {"num_gpus": r.num_gpus, "num_cpus": r.num_cpus}}
    rank_bundle = {"CPU": 1, "GPU": 1} if r.num_gpus else {"CPU": 1}
    return {
        "ray_actor_options": {"num_gpus": 0, "num_cpus": r.num_cpus},
        # A bundle may not be empty: a replica that asks for no CPU still reserves a sliver of one.
        "placement_group_bundles": [{"CPU": max(r.num_cpus, 0.01)}] + [dict(rank_bundle) for _ in range(ranks)],
        "placement_group_strategy": "STRICT_PACK",
    }


def metrics_hub() -> Any:
    """The graph's metrics hub actor, created on first use and detached, so that it does not share the
    fate of whichever replica happened to create it."""
    return (
        ray.remote(MetricsHub)
        .options(name=HUB_NAME, get_if_exists=True, num_cpus=0, lifetime="detached")
        .remote()
    )


class Replica:
    """One engine: loads the model, streams requests, publishes its metrics."""

    def __init__(self, settings: dict[str, Any]) -> None:
        from gemma4 import AsyncEngine

        self.settings = PlatformSettings.model_validate(settings)
        tracing.configure("gemma4-replica", self.settings.telemetry.tracing)
        checkpoint = resolve_checkpoint(self.settings)
        text = load_config(checkpoint).text
        self.settings.check_model(text)
        self.replica_id = serve.get_replica_context().replica_id.unique_id
        self.executor: RayExecutor | None = None
        self.engine = AsyncEngine(self._build_engine(checkpoint))
        self.metrics = ReplicaMetrics(
            self.settings.model.name, self.replica_id, moe_top_experts=self.settings.telemetry.moe_top_experts,
            speculative_tokens=self.engine.engine.args.speculative_tokens(text),
        )
        self.hub = metrics_hub()
        serve_logs.install()
        self._publisher = asyncio.get_event_loop().create_task(self._publish_forever())

    def _build_engine(self, checkpoint: str) -> LLMEngine:
        """One device: the model in this process. Several: this process runs the engine core and one rank
        actor per device runs its model shard."""
        import torch

        from gemma4 import LLM
        from gemma4.engine import EngineArgs
        from gemma4.engine.worker import WorkerConfig
        from gemma4.tokenizer import load_tokenizer

        settings, device = self.settings, replica_device(self.settings)
        dtype = getattr(torch, settings.model.dtype)
        engine = settings.engine
        if engine.tensor_parallel_size == 1:
            if backend_of(device).host_memory and settings.replica.num_cpus >= 1:  # CPU inference threads
                torch.set_num_threads(int(settings.replica.num_cpus))
            return LLM(checkpoint, dtype=dtype, device=device, **engine.engine_args()).engine
        args = EngineArgs(**engine.engine_args())
        self.executor = RayExecutor(WorkerConfig.of(checkpoint, dtype, device, args), f"gemma4-{self.replica_id}")
        tokenizer = load_tokenizer(checkpoint) if (Path(checkpoint) / "tokenizer.json").is_file() else None
        return LLMEngine(self.executor, tokenizer, args)

    async def _publish_forever(self) -> None:
        while True:
            await self.publish_metrics()
            await asyncio.sleep(self.settings.telemetry.metrics_interval_s)

    async def publish_metrics(self) -> None:
        """Engine stats, expert load and readiness to the hub. The expert counters may live in the rank
        actors, so they are read off the event loop; a replica whose ranks failed reports not ready."""
        engine = self.engine.engine
        expert_load: dict[int, list[int]] = {}
        if self.engine.is_running:
            try:
                expert_load, placements = await asyncio.to_thread(
                    lambda: (engine.expert_load(), engine.expert_placements())
                )
            except WorkerFailure as exc:
                logger.warning("expert load unavailable: %s", exc)
            else:
                self.metrics.update_engine(self.engine.stats(), expert_load, placements)
        report = ReplicaReport(self.metrics.render(), ready=self.engine.is_running, expert_load=expert_load)
        self.hub.publish.remote(self.replica_id, report)

    async def generate(self, request: EngineRequest) -> AsyncIterator[RequestOutput]:
        """Stream the engine's delta outputs through Ray: each message is as small at the thousandth
        token as at the first; only the final one carries the totals."""
        finished = False
        with tracing.span("replica.generate", parent=request.trace_context, replica=self.replica_id) as carrier:
            with tracing.span("engine.request", parent=carrier, prompt_tokens=len(request.prompt_token_ids)):
                try:
                    async for output in stream_from_engine(self.engine, request):
                        if output.finished:
                            finished = True
                            self.metrics.observe_finished(output)
                        yield output
                finally:
                    if not finished:
                        self.metrics.request_success.labels(
                            model_name=self.settings.model.name, replica=self.replica_id, finished_reason="abort"
                        ).inc()

    async def check_health(self) -> None:
        """Unhealthy (Serve replaces the replica) once the engine stopped or a rank stopped answering."""
        if not self.engine.is_running:
            raise RuntimeError("the engine loop is not running")
        if self.executor is not None:
            await self.executor.check_alive(timeout_s=RANK_PING_TIMEOUT_S)

    def __del__(self) -> None:
        """Serve calls this when the replica stops: stop stepping and withdraw this replica's metrics."""
        engine = getattr(self, "engine", None)
        if engine is not None:
            engine.shutdown()
            self.hub.forget.remote(self.replica_id)
        executor = getattr(self, "executor", None)
        if executor is not None:
            executor.shutdown()


class RayReplicaBackend:
    """The replica deployment as a `GenerationBackend`: streaming handle calls, errors mapped.

    The request (media tensors included) is an argument of one actor call per request: Ray ships it once,
    through the object store when it is large (over Ray's inline-argument size), never per output.
    """

    def __init__(self, handle: DeploymentHandle) -> None:
        self.handle = handle.options(stream=True)

    async def generate(self, request: EngineRequest) -> AsyncIterator[RequestOutput]:
        response = self.handle.generate.remote(request)
        finished = False
        try:
            async for output in response:
                finished = output.finished
                yield output
        except BackPressureError:
            raise QueueFull("all replicas are at capacity; retry later", retry_after_s=1.0) from None
        except RayTaskError as exc:
            # An error the replica raised, wrapped by Ray: a ServingError is passed on as itself (a fresh
            # instance: Ray's wrapper class cannot be rebuilt); anything else stays an internal error.
            if isinstance(exc.cause, ServingError):
                raise exc.cause.with_message(exc.cause.message, field=exc.cause.field) from None
            raise
        except (RayActorError, ReplicaUnavailableError, DeploymentUnavailableError) as exc:
            raise Unavailable(f"the replica serving request {request.request_id} is unavailable") from exc
        finally:
            if not finished:
                response.cancel()


app = FastAPI(title="Gemma 4 serving platform", docs_url=None, redoc_url=None, openapi_url=None)
_gateway: "Gateway | None" = None  # this process's gateway (one per gateway replica process)


def _current() -> "Gateway":
    if _gateway is None:
        raise Unavailable("the gateway is starting")
    return _gateway


add_openai_routes(app, lambda: _current().frontend, lambda: _current().api_keys)


@app.middleware("http")
async def record_http(request: Request, call_next: Any) -> Any:
    """Count every HTTP request by path and status (streams: when the response starts)."""
    start = time.monotonic()
    response = await call_next(request)
    if _gateway is not None and request.url.path in _gateway.recorded_paths:
        _gateway.metrics.record("http", request.url.path, str(response.status_code), time.monotonic() - start)
    return response


def _operator_endpoint(handler: Any) -> Any:
    """/metrics and /debug: the scrape token when one is configured; errors in OpenAI's format."""

    async def endpoint(request: Request) -> Response:
        try:
            gateway = _current()
            gateway.check_scrape_token(request)
            return await handler(gateway)
        except ServingError as exc:
            return error_response(exc)

    endpoint.__name__ = handler.__name__
    return endpoint


@app.get("/metrics")
@_operator_endpoint
async def metrics(gateway: "Gateway") -> Response:
    """Prometheus text: this gateway's metrics plus every live replica's."""
    gateway.metrics.pending.labels(gateway.settings.model.name).set(gateway.frontend.pending)
    texts = await gateway.hub.texts.remote()
    body = merge_expositions([gateway.metrics.render(), *texts])
    return Response(body, media_type="text/plain; version=0.0.4; charset=utf-8")


@app.get("/debug/moe/experts")
@_operator_endpoint
async def expert_load(gateway: "Gateway") -> Response:
    """The full per-replica, per-layer, per-expert token counts (Prometheus gets only a bounded top-N)."""
    return JSONResponse({"replicas": await gateway.hub.expert_load.remote()})


@app.get("/healthz")
async def healthz() -> dict[str, Any]:
    """Readiness and ready replicas, from state refreshed in the background (no replica call per probe)."""
    return await _current().health()


@app.get("/livez")
async def livez() -> dict[str, Any]:
    """The gateway process answers: nothing else is checked."""
    return {"live": True}


@app.get("/readyz")
async def readyz() -> Response:
    """200 when at least one replica is ready to serve, 503 otherwise."""
    health = await _current().health()
    return JSONResponse(health, status_code=200 if health["ready"] else 503)


@serve.ingress(app)
class Gateway:
    """Ingress for gRPC (methods named as the RPCs) and OpenAI HTTP (the FastAPI app)."""

    def __init__(self, replica: DeploymentHandle, settings: dict[str, Any]) -> None:
        global _gateway
        self.settings = PlatformSettings.model_validate(settings)
        self.api_keys = ApiKeys(self.settings.api_key_entries())
        self.scrape_token = self.settings.metrics_token()
        tracing.configure("gemma4-gateway", self.settings.telemetry.tracing)
        serve_logs.install()
        checkpoint = resolve_checkpoint(self.settings)
        from gemma4.tokenizer import load_tokenizer

        config = load_config(checkpoint)
        text = config.text
        max_len = min(self.settings.engine.max_model_len or text.max_position_embeddings, text.max_position_embeddings)
        gateway = self.settings.gateway
        self.metrics = GatewayMetrics(self.settings.model.name)
        self.frontend = Frontend(
            load_tokenizer(checkpoint),
            ModelDescription(
                self.settings.model.name, config.family, max_len, text.vocab_size,
                served_modalities(config.modalities, self.settings.model.modalities),
            ),
            RayReplicaBackend(replica),
            policy=GatewayPolicy(
                limits=self.settings.limits,
                max_pending_requests=gateway.max_pending_requests,
                default_max_tokens=gateway.default_max_tokens,
                cache_salt_per_key=gateway.cache_salt_per_key,
                tokenizer_threads=gateway.tokenizer_threads,
                media_threads=gateway.media_threads,
            ),
            metrics=self.metrics,
        )
        # Unknown paths are not recorded: their names are the client's choice, unbounded series.
        self.recorded_paths = {path for route in app.routes if (path := getattr(route, "path", None))} - {"/metrics"}
        self.grpc = Gemma4ServingService(self.frontend, api_keys=self.api_keys, health=self.health)
        self.hub = metrics_hub()
        self._health = {"ready": False, "ready_replicas": 0}
        self._health_lock = asyncio.Lock()
        self._health_refresher = asyncio.get_event_loop().create_task(self._refresh_health_forever())
        _gateway = self

    async def health(self) -> dict[str, Any]:
        """Ready when a replica reported a running engine lately. A ready state is answered from the cache
        (refreshed every `health_refresh_s`); a not-ready one is checked again first, so a platform that
        just became ready says so at once. Neither costs a call to a replica: readiness comes from the
        reports replicas publish to the metrics hub."""
        if not self._health["ready"]:
            await self._refresh_health()
        return dict(self._health)

    async def _refresh_health(self) -> None:
        async with self._health_lock:  # concurrent probes share one refresh
            try:
                ready = await asyncio.wait_for(self.hub.ready_replicas.remote(), timeout=5)
                self._health = {"ready": ready > 0, "ready_replicas": ready}
            except Exception as exc:  # noqa: BLE001 - any failure means not ready
                logger.warning("health refresh failed: %s", exc)
                self._health = {"ready": False, "ready_replicas": 0}

    async def _refresh_health_forever(self) -> None:
        while True:
            await self._refresh_health()
            await asyncio.sleep(self.settings.gateway.health_refresh_s)

    def check_scrape_token(self, request: Request) -> None:
        if self.scrape_token is None:
            return
        scheme, _, token = request.headers.get("authorization", "").partition(" ")
        if scheme.lower() != "bearer" or not hmac.compare_digest(token.strip().encode(), self.scrape_token.encode()):
            raise Unauthenticated("this endpoint needs the metrics scrape token ('Authorization: Bearer TOKEN')")

    @contextlib.contextmanager
    def _rpc(self, method: str, context: Any) -> Iterator[None]:
        """Map every failure onto Ray's gRPC context (Ray then answers with that code) and record the call.

        A ServingError keeps its code and message; anything else is logged once with an error id and
        answered INTERNAL with only that id. Either way no traceback reaches the client.
        """
        start, code = time.monotonic(), "OK"
        try:
            yield
        except (asyncio.CancelledError, GeneratorExit):
            code = "CANCELLED"  # the client went away or its deadline passed
            raise
        except Exception as exc:  # noqa: BLE001
            error = reported(logger, f"gRPC {method}", exc)
            code = error.grpc_code
            context.set_code(grpc.StatusCode[error.grpc_code])
            context.set_details(error.message)
            context.set_trailing_metadata(list(retry_metadata(error)))
            raise error from None
        finally:
            self.metrics.record("grpc", method, code, time.monotonic() - start)

    async def _unary(self, method: str, request: Any, context: Any) -> Any:
        with self._rpc(method, context):
            return await getattr(self.grpc, method)(request, context)

    async def _stream(self, method: str, request: Any, context: Any) -> AsyncIterator[Any]:
        with self._rpc(method, context):
            async with contextlib.aclosing(getattr(self.grpc, method)(request, context)) as messages:
                async for message in messages:
                    yield message

    async def Generate(self, request: Any, grpc_context: Any) -> Any:  # noqa: N802 - RPC name
        return await self._unary("Generate", request, grpc_context)

    async def GenerateStream(self, request: Any, grpc_context: Any) -> AsyncIterator[Any]:  # noqa: N802
        async for message in self._stream("GenerateStream", request, grpc_context):
            yield message

    async def Chat(self, request: Any, grpc_context: Any) -> Any:  # noqa: N802
        return await self._unary("Chat", request, grpc_context)

    async def ChatStream(self, request: Any, grpc_context: Any) -> AsyncIterator[Any]:  # noqa: N802
        async for message in self._stream("ChatStream", request, grpc_context):
            yield message

    async def Tokenize(self, request: Any, grpc_context: Any) -> Any:  # noqa: N802
        return await self._unary("Tokenize", request, grpc_context)

    async def CountTokens(self, request: Any, grpc_context: Any) -> Any:  # noqa: N802
        return await self._unary("CountTokens", request, grpc_context)

    async def GetModelInfo(self, request: Any, grpc_context: Any) -> Any:  # noqa: N802
        return await self._unary("GetModelInfo", request, grpc_context)

    async def Health(self, request: Any, grpc_context: Any) -> Any:  # noqa: N802
        return await self._unary("Health", request, grpc_context)


def check_exposure(settings: PlatformSettings, api_keys: ApiKeys) -> None:
    """Serving anyone who can reach a non-loopback port takes `gateway.allow_unauthenticated: true`."""
    if api_keys.enabled or not settings.server.exposed:
        return
    where = f"HTTP on {settings.server.host}, gRPC on {settings.server.plaintext_grpc_host}"
    if not settings.gateway.allow_unauthenticated:
        raise ValueError(
            f"no API keys are configured and the platform listens beyond this machine ({where}): set "
            "gateway.api_keys_file or GEMMA4_API_KEYS, or gateway.allow_unauthenticated: true to serve anyone"
        )
    logger.warning("serving WITHOUT authentication on %s (gateway.allow_unauthenticated is true)", where)


def build_app(args: dict[str, Any]) -> serve.Application:
    """The application: `args` is a `PlatformSettings` dict (validated here, errors name the field)."""
    settings = PlatformSettings.model_validate(args)
    dumped = settings.model_dump()
    settings.check_model()  # refuse a layout the model cannot be split by before anything is deployed
    r, scaling = settings.replica, settings.replica.autoscaling
    router = (
        RequestRouterConfig(
            request_router_class=PrefixAffinityRouter,
            request_router_kwargs={"block_size": settings.engine.block_size},
        )
        if settings.gateway.prefix_affinity
        else None
    )
    replica = serve.deployment(
        Replica,
        name="Replica",
        max_ongoing_requests=r.max_ongoing_requests,
        autoscaling_config=AutoscalingConfig(
            min_replicas=scaling.min_replicas,
            max_replicas=scaling.max_replicas,
            initial_replicas=max(scaling.min_replicas, 1),
            target_ongoing_requests=scaling.target_ongoing_requests,
            upscale_delay_s=scaling.upscale_delay_s,
            downscale_delay_s=scaling.downscale_delay_s,
        ),
        health_check_period_s=2,
        health_check_timeout_s=HEALTH_CHECK_TIMEOUT_S,
        # Drain: a stopping replica gets no new requests and finishes its streams for up to DRAIN_S.
        graceful_shutdown_wait_loop_s=1,
        graceful_shutdown_timeout_s=DRAIN_S,
        **replica_resources(settings),
        **({"request_router_config": router} if router else {}),
    )
    gateway = serve.deployment(
        Gateway,
        name="Gateway",
        num_replicas=settings.gateway.num_replicas,
        ray_actor_options={"num_cpus": 0},
        max_ongoing_requests=settings.gateway.max_pending_requests * 2,
        # Serve stops the gateway first, then the replicas: the gateway's drain covers the streams.
        graceful_shutdown_wait_loop_s=1,
        graceful_shutdown_timeout_s=DRAIN_S,
    )
    os.environ.setdefault(tracing.TRACING_ENV, settings.telemetry.tracing)
    check_exposure(settings, ApiKeys(settings.api_key_entries()))  # fail at deploy time, naming the fix
    return gateway.bind(replica.bind(dumped), dumped)
