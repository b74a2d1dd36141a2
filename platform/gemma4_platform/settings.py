"""Platform settings: one pydantic model behind the CLI, the Ray Serve config file and the operator.

Unknown keys and bad values fail with messages that name the field. The same object is the Ray
Serve application's `args`, so `gemma4-platform config` can write a Serve config file for KubeRay
that builds exactly the graph `gemma4-platform serve` runs.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

API_KEYS_ENV = "GEMMA4_API_KEYS"  # comma-separated keys; or api_keys_file


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class ModelSettings(_Strict):
    path: str | None = Field(None, description="checkpoint directory; None = a tiny random-weight model")
    name: str = Field("gemma-4", description="model name reported to clients (/v1/models, GetModelInfo)")
    tiny_variant: Literal["e2b", "e4b", "26b-a4b", "31b"] = "e2b"
    dtype: Literal["bfloat16", "float16", "float32"] = "bfloat16"
    device: str = Field("auto", description="'auto' = cuda when available, else cpu")


class EngineSettings(_Strict):
    block_size: int = Field(16, ge=1, le=256)
    max_num_seqs: int = Field(64, ge=1)
    max_num_batched_tokens: int = Field(2048, ge=1)
    max_model_len: int | None = Field(None, ge=1)
    num_kv_blocks: int | None = Field(None, ge=1)
    kv_cache_memory_bytes: int | None = Field(
        None, ge=1, description="KV budget per replica; None = sized by gemma4.memory from the GPU (1 GiB on CPU)"
    )
    gpu_memory_utilization: float = Field(0.90, gt=0, le=1)
    enable_prefix_caching: bool = True
    seed: int = 0


class AutoscalingSettings(_Strict):
    min_replicas: int = Field(1, ge=0)
    max_replicas: int = Field(1, ge=1)
    target_ongoing_requests: float = Field(16, gt=0)
    upscale_delay_s: float = Field(5.0, ge=0)
    downscale_delay_s: float = Field(30.0, ge=0)

    @model_validator(mode="after")
    def _order(self) -> "AutoscalingSettings":
        if self.min_replicas > self.max_replicas:
            raise ValueError(f"min_replicas ({self.min_replicas}) exceeds max_replicas ({self.max_replicas})")
        return self


class ReplicaSettings(_Strict):
    num_gpus: float = Field(0, ge=0, description="GPUs per replica (Ray resource)")
    num_cpus: float = Field(1, ge=0)
    max_ongoing_requests: int = Field(128, ge=1)
    autoscaling: AutoscalingSettings = AutoscalingSettings()


class GatewaySettings(_Strict):
    num_replicas: int = Field(1, ge=1)
    max_pending_requests: int = Field(256, ge=1, description="per gateway replica; beyond it: RESOURCE_EXHAUSTED / 429")
    default_max_tokens: int = Field(1024, ge=1)
    api_keys_file: str | None = None
    prefix_affinity: bool = True


class ServerSettings(_Strict):
    host: str = "127.0.0.1"
    http_port: int = Field(8000, ge=1, le=65535)
    grpc_port: int = Field(9000, ge=1, le=65535)
    grpc_tls_port: int | None = Field(None, ge=1, le=65535, description="extra TLS port for gRPC")
    tls_cert_file: str | None = None
    tls_key_file: str | None = None

    @model_validator(mode="after")
    def _tls(self) -> "ServerSettings":
        if (self.tls_cert_file is None) != (self.tls_key_file is None):
            raise ValueError("tls_cert_file and tls_key_file must be given together")
        for name in ("tls_cert_file", "tls_key_file"):
            path = getattr(self, name)
            if path is not None and not Path(path).is_file():
                raise ValueError(f"{name}: {path} does not exist")
        if self.grpc_tls_port is not None and self.tls_cert_file is None:
            raise ValueError("grpc_tls_port needs tls_cert_file and tls_key_file")
        return self


class TelemetrySettings(_Strict):
    tracing: str = Field("none", description="none | console | otlp | jsonl:PATH")
    metrics_interval_s: float = Field(1.0, gt=0, description="how often replicas publish engine metrics")


class PlatformSettings(_Strict):
    model: ModelSettings = ModelSettings()
    engine: EngineSettings = EngineSettings()
    replica: ReplicaSettings = ReplicaSettings()
    gateway: GatewaySettings = GatewaySettings()
    server: ServerSettings = ServerSettings()
    telemetry: TelemetrySettings = TelemetrySettings()

    def api_keys(self) -> frozenset[str] | None:
        """Keys from the keys file (one per line) and GEMMA4_API_KEYS; None when auth is off."""
        keys: set[str] = set()
        if self.gateway.api_keys_file:
            try:
                text = Path(self.gateway.api_keys_file).read_text(encoding="utf-8")
            except OSError as exc:
                raise ValueError(f"gateway.api_keys_file: cannot read {self.gateway.api_keys_file}: {exc}") from None
            keys.update(line.strip() for line in text.splitlines() if line.strip() and not line.startswith("#"))
        keys.update(k.strip() for k in os.environ.get(API_KEYS_ENV, "").split(",") if k.strip())
        return frozenset(keys) or None
