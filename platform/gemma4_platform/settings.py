"""Platform settings: one pydantic model behind the CLI, the Ray Serve config file and the operator.

Unknown keys and bad values fail with messages that name the field. The same object is the Ray
Serve application's `args`, so `gemma4-platform config` can write a Serve config file for KubeRay
that builds exactly the graph `gemma4-platform serve` runs.
"""

from __future__ import annotations

import ipaddress
import os
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from gemma4.config import DEFAULT_SPECULATIVE_TOKENS
from gemma4.parallel.layout import check_parallel_settings

if TYPE_CHECKING:
    from gemma4.config import Gemma4TextConfig

API_KEYS_ENV = "GEMMA4_API_KEYS"  # comma- or newline-separated key entries; or api_keys_file
METRICS_TOKEN_ENV = "GEMMA4_METRICS_TOKEN"


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class ModelSettings(_Strict):
    path: str | None = Field(None, description="checkpoint directory; None = a tiny random-weight model")
    name: str = Field("gemma-4", description="model name reported to clients (/v1/models, GetModelInfo)")
    tiny_variant: Literal["e2b", "e4b", "26b-a4b", "31b"] = "e2b"
    dtype: Literal["bfloat16", "float16", "float32"] = "bfloat16"
    device: str = Field(
        "auto", description="'auto' = the first GPU (NVIDIA or AMD) when there is one, else cpu; or cuda, xla, cpu"
    )
    modalities: Literal["all"] | tuple[Literal["text", "image", "video", "audio"], ...] = Field(
        "all", description="inputs served: 'all' (whatever the checkpoint takes) or a list of text, image, video, "
        "audio; text is always served"
    )

    @field_validator("modalities")
    @classmethod
    def _modalities(cls, value: str | tuple[str, ...]) -> str | tuple[str, ...]:
        if not isinstance(value, str) and (not value or len(set(value)) < len(value)):
            raise ValueError("give 'all' or a non-empty list of distinct modalities")
        return value


class SpeculativeSettings(_Strict):
    """Speculative decoding: a drafter proposes `num_tokens` tokens per request and step, the model verifies
    them in one forward pass (`EngineArgs.speculative_model` / `num_speculative_tokens`)."""

    model: str | None = Field(
        None, description="'ngram' (prompt lookup, no drafter model) or a gemma4_assistant checkpoint directory "
        "(e.g. google/gemma-4-E2B-it-assistant, matching the served variant); None = off"
    )
    num_tokens: int | None = Field(
        None, ge=1, le=16, description="drafts per request and step; None = the variant's default ("
        + ", ".join(f"{v} {n}" for v, n in DEFAULT_SPECULATIVE_TOKENS.items()) + ")"
    )

    @field_validator("model")
    @classmethod
    def _model(cls, value: str | None) -> str | None:
        if value is not None and not value.strip():
            raise ValueError("give 'ngram', a gemma4_assistant checkpoint directory, or null (off)")
        return value

    @model_validator(mode="after")
    def _tokens_need_a_drafter(self) -> "SpeculativeSettings":
        if self.num_tokens is not None and self.model is None:
            raise ValueError("num_tokens needs model ('ngram' or an assistant checkpoint directory)")
        return self

    def check_drafter(self, text: "Gemma4TextConfig") -> None:
        """Refuse an assistant checkpoint readable here that was not trained for a model of `text`'s width."""
        if self.model in (None, "ngram") or not (Path(self.model) / "config.json").is_file():
            return  # off, n-gram, or a directory on the cluster: the replica checks it where it is
        from gemma4.memory import load_drafter_shape

        try:
            drafter = load_drafter_shape(self.model)
        except ValueError as exc:
            raise ValueError(f"engine.speculative.model: {exc}") from None
        if drafter.backbone_hidden_size != text.hidden_size:
            raise ValueError(
                f"engine.speculative.model {self.model} drafts for a model of hidden size "
                f"{drafter.backbone_hidden_size}, but the served model's is {text.hidden_size}: use its own assistant"
            )


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
    cuda_graphs: bool = Field(True, description="capture decode steps as CUDA graphs per batch-size bucket (CUDA only)")
    torch_compile: bool = Field(False, description="torch.compile the decode step (one graph per batch bucket)")
    kernels: Literal["auto", "triton", "torch"] = Field(
        "auto", description="hot-path ops: auto = Triton kernels on CUDA/ROCm, torch reference ops on CPU/XLA"
    )
    tensor_parallel_size: int = Field(
        1, ge=1, description="devices (ranks) per replica: attention, MLPs and vocabulary split this many ways"
    )
    expert_parallel_size: int = Field(
        1, ge=1, description="EP groups the MoE experts are split over (divides tensor_parallel_size; 26b-a4b only)"
    )
    redundant_experts: int = Field(
        0, ge=0, description="extra expert slots per MoE layer for copies of hot experts (a multiple of expert_parallel_size)"
    )
    expert_rebalance_interval: int = Field(
        0, ge=0, description="engine steps between load-aware expert placement recomputations; 0 = never"
    )
    max_num_encoder_tokens: int | None = Field(
        None, ge=1, description="media soft tokens encoded per step at most; None = max_num_batched_tokens"
    )
    encoder_cache_tokens: int | None = Field(
        None, ge=1, description="soft tokens of encoded media kept on the device; None = 2 x max_num_batched_tokens"
    )
    speculative: SpeculativeSettings = SpeculativeSettings()

    def engine_args(self) -> dict[str, Any]:
        """These settings as `EngineArgs` keyword arguments (the speculative section flattened)."""
        spec = self.speculative
        return {**self.model_dump(exclude={"speculative"}), "speculative_model": spec.model,
                "num_speculative_tokens": spec.num_tokens}

    @model_validator(mode="after")
    def _parallel(self) -> "EngineSettings":
        check_parallel_settings(
            self.tensor_parallel_size, self.expert_parallel_size, self.redundant_experts, self.expert_rebalance_interval
        )
        return self


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
    num_gpus: float = Field(
        0, ge=0, description="GPUs per replica (Ray resource); with engine.tensor_parallel_size N > 1: N, or 0 for CPU ranks"
    )
    num_cpus: float = Field(1, ge=0)
    max_ongoing_requests: int = Field(128, ge=1)
    autoscaling: AutoscalingSettings = AutoscalingSettings()


class LimitSettings(_Strict):
    """Bounds on what one request may carry or ask for; beyond them: INVALID_ARGUMENT / HTTP 400 naming the
    field (413 for the body). Checked at the gateway before anything is rendered or tokenized."""

    max_request_bytes: int = Field(8 << 20, ge=1024, description="HTTP body / gRPC message, bytes")
    max_messages: int = Field(1024, ge=1)
    max_content_parts: int = Field(1024, ge=1, description="content parts over all messages")
    max_tools: int = Field(128, ge=0)
    max_json_depth: int = Field(32, ge=2, description="nesting of tool schemas, arguments and results")
    max_stop_strings: int = Field(16, ge=0)
    max_stop_string_chars: int = Field(256, ge=1)
    max_stop_token_ids: int = Field(64, ge=0)
    max_output_tokens: int | None = Field(None, ge=1, description="cap on max_tokens; None = the context length")
    max_logprobs: int = Field(20, ge=0, le=20, description="top-n logprobs; the engine's own ceiling is 20")
    max_prompt_tokens: int | None = Field(None, ge=1, description="None = the context length minus one")
    strict_raw_prompts: bool = Field(
        False, description="tokenize Generate text prompts as plain text too (special-token strings stay text)"
    )
    max_media_items: int = Field(16, ge=0, description="image, audio and video parts over all messages")
    max_media_bytes: int = Field(
        8 << 20, ge=1, description="one media part's encoded bytes (after base64 decoding, or fetched from a URL)"
    )
    max_image_pixels: int = Field(
        25_000_000, ge=1, description="width x height of an image or video frame, checked before decoding"
    )
    media_url_hosts: tuple[str, ...] = Field(
        (), description="hosts http(s) media URLs may name (exact names, redirects included); empty = data URLs only"
    )
    media_url_timeout_s: float = Field(10.0, gt=0, description="a media URL's whole fetch, connect to last byte")

    @field_validator("media_url_hosts")
    @classmethod
    def _hosts(cls, hosts: tuple[str, ...]) -> tuple[str, ...]:
        """Host names as URLs carry them (lower case, no scheme, port or path)."""
        for host in hosts:
            if not host or any(c in host for c in "/:@ ") or host != host.strip():
                raise ValueError(f"{host!r} is not a host name (give names like 'img.example.com', no scheme or port)")
        return tuple(host.lower() for host in hosts)


class GatewaySettings(_Strict):
    num_replicas: int = Field(1, ge=1)
    max_pending_requests: int = Field(256, ge=1, description="per gateway replica; beyond it: RESOURCE_EXHAUSTED / 429")
    default_max_tokens: int = Field(1024, ge=1)
    api_keys_file: str | None = Field(None, description="one key per line, with optional attributes (see auth)")
    allow_unauthenticated: bool = Field(
        False, description="serve without API keys on a non-loopback address (refused otherwise)"
    )
    cache_salt_per_key: bool = Field(True, description="prefix-cache hits only between requests of the same key")
    prefix_affinity: bool = True
    tokenizer_threads: int = Field(2, ge=1, description="threads that render and tokenize large requests")
    media_threads: int = Field(2, ge=1, description="threads that fetch, decode and preprocess images, audio and video")
    health_refresh_s: float = Field(2.0, gt=0, description="how often /healthz state is refreshed")
    stalled_stream_timeout_s: float = Field(
        30.0, gt=0, description="a stream whose client reads nothing this long is aborted (KV freed)"
    )
    stream_buffer_messages: int = Field(256, ge=1, description="messages buffered for a client that is not reading")


class ServerSettings(_Strict):
    host: str = Field("127.0.0.1", description="address of the HTTP port")
    grpc_host: str | None = Field(
        None, description="address of the plaintext gRPC port; None = 127.0.0.1 with a TLS port, else `host`"
    )
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

    @property
    def plaintext_grpc_host(self) -> str:
        """Where the plaintext gRPC port listens: loopback when clients have a TLS port, unless set."""
        if self.grpc_host is not None:
            return self.grpc_host
        return "127.0.0.1" if self.grpc_tls_port is not None else self.host

    @property
    def exposed(self) -> bool:
        """Whether any API port listens beyond this machine (HTTP and the gRPC TLS port use `host`)."""
        return not all(is_loopback(host) for host in (self.host, self.plaintext_grpc_host))


class TelemetrySettings(_Strict):
    tracing: str = Field("none", description="none | console | otlp | jsonl:PATH")
    metrics_interval_s: float = Field(1.0, gt=0, description="how often replicas publish engine metrics")
    metrics_token_file: str | None = Field(
        None, description="file holding a bearer token that /metrics and /debug require (or GEMMA4_METRICS_TOKEN)"
    )
    moe_top_experts: int = Field(8, ge=0, description="hottest (layer, expert) pairs exported per replica")


class PlatformSettings(_Strict):
    model: ModelSettings = ModelSettings()
    engine: EngineSettings = EngineSettings()
    replica: ReplicaSettings = ReplicaSettings()
    gateway: GatewaySettings = GatewaySettings()
    limits: LimitSettings = LimitSettings()
    server: ServerSettings = ServerSettings()
    telemetry: TelemetrySettings = TelemetrySettings()

    @model_validator(mode="after")
    def _replica_devices(self) -> "PlatformSettings":
        """A multi-device replica has one device per rank, on a backend with collectives."""
        tp, gpus = self.engine.tensor_parallel_size, self.replica.num_gpus
        if tp == 1:
            return self
        if gpus not in (0, tp):
            raise ValueError(
                f"replica.num_gpus ({gpus:g}) must equal engine.tensor_parallel_size ({tp}), one GPU per rank, "
                "or be 0 for ranks on the CPU"
            )
        if self.model.device != "auto":
            from gemma4.backends import backend_of

            backend = backend_of(self.model.device)
            if not backend.multi_device:
                raise ValueError(
                    f"engine.tensor_parallel_size={tp}: model.device {self.model.device!r} ({backend.name}) has no "
                    "collectives in this release, so a replica runs on one device there; use tensor_parallel_size 1"
                )
        return self

    def check_model(self, text: "Gemma4TextConfig | None" = None) -> None:
        """Refuse parallel settings the decoder cannot be split by, and an assistant drafter trained for another
        model (ValueError naming the settings).

        Without `text`, the decoder of `model_text_config()`; nothing is checked when that is not readable
        here (the replica checks again where the checkpoint is).
        """
        engine = self.engine
        tp, ep = engine.tensor_parallel_size, engine.expert_parallel_size
        drafter = engine.speculative.model not in (None, "ngram")
        if text is None:
            if (tp, ep) == (1, 1) and not drafter:
                return  # a single-device replica fits every decoder: no config to read
            text = self.model_text_config()
            if text is None:
                return
        engine.speculative.check_drafter(text)
        from gemma4.engine.args import EngineArgs

        try:
            EngineArgs(**engine.engine_args()).check_model(text)
        except ValueError as exc:
            raise ValueError(f"engine.tensor_parallel_size={tp}, engine.expert_parallel_size={ep}: {exc}") from None

    def model_text_config(self) -> "Gemma4TextConfig | None":
        """The decoder these settings serve: the checkpoint's when its config.json is readable here, the tiny
        variant's without a checkpoint, None when the checkpoint is elsewhere (a path on the cluster)."""
        if self.model.path is None:
            from gemma4.tiny import tiny_config

            return tiny_config(self.model.tiny_variant).text
        if not (Path(self.model.path) / "config.json").is_file():
            return None
        from gemma4.config import load_config

        return load_config(self.model.path).text

    def api_key_entries(self) -> list[str]:
        """The raw key entries: lines of the keys file, then the comma- or newline-separated GEMMA4_API_KEYS."""
        entries: list[str] = []
        if self.gateway.api_keys_file:
            entries += _read_secret(self.gateway.api_keys_file, "gateway.api_keys_file").splitlines()
        entries += os.environ.get(API_KEYS_ENV, "").replace(",", "\n").splitlines()
        return [e.strip() for e in entries if e.strip() and not e.strip().startswith("#")]

    def metrics_token(self) -> str | None:
        """The bearer token /metrics and /debug require, or None when they are open."""
        if self.telemetry.metrics_token_file:
            return _read_secret(self.telemetry.metrics_token_file, "telemetry.metrics_token_file").strip() or None
        return os.environ.get(METRICS_TOKEN_ENV, "").strip() or None


def is_loopback(host: str) -> bool:
    """127.0.0.0/8, ::1 and "localhost"; wildcard and other addresses are reachable from elsewhere."""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False  # a host name: assume it resolves beyond this machine


def _read_secret(path: str, field: str) -> str:
    try:
        return Path(path).read_text(encoding="utf-8")
    except OSError as exc:
        raise ValueError(f"{field}: cannot read {path}: {exc}") from None
