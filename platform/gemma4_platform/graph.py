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
import logging
import os
import tempfile
import time
from pathlib import Path
from typing import Any, AsyncIterator, Iterator

import grpc
import ray
from fastapi import FastAPI, Request
from fastapi.responses import Response
from ray import serve
from ray.exceptions import RayActorError
from ray.serve.config import AutoscalingConfig, RequestRouterConfig
from ray.serve.exceptions import BackPressureError, DeploymentUnavailableError, ReplicaUnavailableError
from ray.serve.handle import DeploymentHandle

from gemma4.config import load_config
from gemma4.engine import RequestOutput

from gemma4_platform import tracing
from gemma4_platform.backend import EngineRequest, stream_from_engine
from gemma4_platform.errors import QueueFull, ServingError, Unavailable
from gemma4_platform.frontend import Frontend, ModelDescription
from gemma4_platform.grpc_service import Gemma4ServingService
from gemma4_platform.metrics import GatewayMetrics, MetricsHub, ReplicaMetrics, merge_expositions
from gemma4_platform.openai_api import add_openai_routes
from gemma4_platform.routing import PrefixAffinityRouter
from gemma4_platform.settings import PlatformSettings

logger = logging.getLogger(__name__)
HUB_NAME = "gemma4-metrics-hub"


def resolve_checkpoint(settings: PlatformSettings) -> str:
    """The checkpoint directory; without one, a tiny random-weight model written once per machine.

    The tiny weights are seeded, so every process on every node writes the identical model.
    """
    if settings.model.path:
        return settings.model.path
    from gemma4.tiny import write_tiny_checkpoint

    variant, seed = settings.model.tiny_variant, settings.engine.seed
    target = Path(tempfile.gettempdir()) / f"gemma4-tiny-{variant}-{seed}"
    if not (target / "model.safetensors").is_file():
        staging = Path(tempfile.mkdtemp(prefix=f"gemma4-tiny-{variant}-", dir=tempfile.gettempdir()))
        write_tiny_checkpoint(staging, variant=variant, seed=seed)
        try:
            staging.rename(target)
        except OSError:  # another process won the race: its copy is identical
            pass
    return str(target)


def _device(setting: str) -> str:
    if setting != "auto":
        return setting
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"


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
        import torch

        from gemma4 import LLM, AsyncEngine

        self.settings = PlatformSettings.model_validate(settings)
        tracing.configure("gemma4-replica", self.settings.telemetry.tracing)
        device = _device(self.settings.model.device)
        if device == "cpu" and self.settings.replica.num_cpus >= 1:
            torch.set_num_threads(int(self.settings.replica.num_cpus))
        llm = LLM(
            resolve_checkpoint(self.settings),
            dtype=getattr(torch, self.settings.model.dtype),
            device=device,
            **self.settings.engine.model_dump(),
        )
        self.model = llm.engine.model
        self.engine = AsyncEngine(llm.engine)
        self.replica_id = serve.get_replica_context().replica_id.unique_id
        self.metrics = ReplicaMetrics(self.settings.model.name, self.replica_id)
        self.hub = metrics_hub()
        self._publisher = asyncio.get_event_loop().create_task(self._publish_forever())

    async def _publish_forever(self) -> None:
        while True:
            self.publish_metrics()
            await asyncio.sleep(self.settings.telemetry.metrics_interval_s)

    def publish_metrics(self) -> None:
        self.metrics.update_engine(self.engine.stats(), self.model.expert_load())
        self.hub.publish.remote(self.replica_id, self.metrics.render())

    async def generate(self, request: EngineRequest) -> AsyncIterator[RequestOutput]:
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

    def stats(self) -> Any:
        return self.engine.stats()

    def check_health(self) -> None:
        if not self.engine.is_running:
            raise RuntimeError("the engine loop is not running")

    def __del__(self) -> None:
        """Serve calls this when the replica stops: stop stepping and withdraw this replica's metrics."""
        engine = getattr(self, "engine", None)
        if engine is not None:
            engine.shutdown()
            self.hub.forget.remote(self.replica_id)


class RayReplicaBackend:
    """The replica deployment as a `GenerationBackend`: streaming handle calls, errors mapped."""

    def __init__(self, handle: DeploymentHandle) -> None:
        self.handle = handle.options(stream=True)

    async def generate(self, request: EngineRequest) -> AsyncIterator[RequestOutput]:
        response = self.handle.generate.remote(request)
        finished = False
        try:
            async for output in response:
                finished = output.finished
                yield output
        except BackPressureError as exc:
            raise QueueFull(f"all replicas are at capacity: {exc}") from exc
        except (RayActorError, ReplicaUnavailableError, DeploymentUnavailableError) as exc:
            raise Unavailable(f"the replica serving request {request.request_id} is unavailable: {exc}") from exc
        finally:
            if not finished:
                response.cancel()


app = FastAPI(title="Gemma 4 serving platform")
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
    if _gateway is not None and request.url.path != "/metrics":
        _gateway.metrics.record("http", request.url.path, str(response.status_code), time.monotonic() - start)
    return response


@app.get("/metrics")
async def metrics() -> Response:
    """Prometheus text: this gateway's metrics plus every live replica's."""
    gateway = _current()
    gateway.metrics.pending.labels(gateway.settings.model.name).set(gateway.frontend.pending)
    texts = await gateway.hub.texts.remote()
    body = merge_expositions([gateway.metrics.render(), *texts])
    return Response(body, media_type="text/plain; version=0.0.4; charset=utf-8")


@app.get("/healthz")
async def healthz() -> dict[str, Any]:
    return await _current().health()


@serve.ingress(app)
class Gateway:
    """Ingress for gRPC (methods named as the RPCs) and OpenAI HTTP (the FastAPI app)."""

    def __init__(self, replica: DeploymentHandle, settings: dict[str, Any]) -> None:
        global _gateway
        self.settings = PlatformSettings.model_validate(settings)
        tracing.configure("gemma4-gateway", self.settings.telemetry.tracing)
        checkpoint = resolve_checkpoint(self.settings)
        from gemma4.tokenizer import load_tokenizer

        config = load_config(checkpoint)
        text = config.text
        max_len = min(self.settings.engine.max_model_len or text.max_position_embeddings, text.max_position_embeddings)
        self.replica = replica
        self.metrics = GatewayMetrics(self.settings.model.name)
        self.frontend = Frontend(
            load_tokenizer(checkpoint),
            ModelDescription(self.settings.model.name, config.family, max_len, text.vocab_size),
            RayReplicaBackend(replica),
            max_pending_requests=self.settings.gateway.max_pending_requests,
            default_max_tokens=self.settings.gateway.default_max_tokens,
            metrics=self.metrics,
        )
        self.api_keys = self.settings.api_keys()
        self.grpc = Gemma4ServingService(self.frontend, api_keys=self.api_keys, health=self.health)
        self.hub = metrics_hub()
        _gateway = self

    async def health(self) -> dict[str, Any]:
        """Ready when a replica answers; `ready_replicas` counts the replicas Serve reports running."""
        try:
            await asyncio.wait_for(self.replica.stats.remote(), timeout=5)
        except Exception as exc:  # noqa: BLE001 - any failure means not ready
            logger.warning("health check failed: %s", exc)
            return {"ready": False, "ready_replicas": 0}
        app = serve.get_replica_context().app_name
        status = await asyncio.to_thread(serve.status)
        replicas = status.applications[app].deployments["Replica"].replica_states.get("RUNNING", 0)
        return {"ready": True, "ready_replicas": replicas}

    @contextlib.contextmanager
    def _rpc(self, method: str, context: Any) -> Iterator[None]:
        """Map a ServingError onto Ray's gRPC context (Ray then answers with that code) and record the call."""
        start, code = time.monotonic(), "OK"
        try:
            yield
        except ServingError as exc:
            code = exc.grpc_code
            context.set_code(grpc.StatusCode[exc.grpc_code])
            context.set_details(exc.message)
            raise
        except (asyncio.CancelledError, GeneratorExit):
            code = "CANCELLED"  # the client went away or its deadline passed
            raise
        except BaseException:
            code = "INTERNAL"  # what Ray's proxy answers for an unexpected error
            raise
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


def build_app(args: dict[str, Any]) -> serve.Application:
    """The application: `args` is a `PlatformSettings` dict (validated here, errors name the field)."""
    settings = PlatformSettings.model_validate(args)
    dumped = settings.model_dump()
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
        ray_actor_options={"num_gpus": r.num_gpus, "num_cpus": r.num_cpus},
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
        health_check_timeout_s=10,
        # Drain: a stopping replica gets no new requests and finishes its streams for up to 30 s.
        graceful_shutdown_wait_loop_s=1,
        graceful_shutdown_timeout_s=30,
        **({"request_router_config": router} if router else {}),
    )
    gateway = serve.deployment(
        Gateway,
        name="Gateway",
        num_replicas=settings.gateway.num_replicas,
        ray_actor_options={"num_cpus": 0},
        max_ongoing_requests=settings.gateway.max_pending_requests * 2,
    )
    os.environ.setdefault(tracing.TRACING_ENV, settings.telemetry.tracing)
    return gateway.bind(replica.bind(dumped), dumped)
