"""The `Gemma4Service` spec as pydantic models: the one source of its fields, defaults and limits.

`crd.py` turns these models into the CRD's openAPIV3Schema, and the handlers parse the live object
with them, so the API server and the operator agree on every default (an emulator or an old CRD
that skips server-side defaulting still yields the same spec). Field names are camelCase on the
wire, snake_case in Python. Rules that span fields are checked here and also carried into the CRD
as CEL (`x-kubernetes-validations`) so a real API server rejects them at admission.
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator
from pydantic.alias_generators import to_camel

from gemma4.accelerators import ACCELERATORS
from gemma4.config import DEFAULT_SPECULATIVE_TOKENS, VARIANTS
from gemma4.memory import MODALITIES

# Literal types built from the catalogues, so a new variant or accelerator reaches the CRD enum.
VariantName = Literal[tuple(VARIANTS)]  # type: ignore[valid-type]
AcceleratorName = Literal[tuple(ACCELERATORS)]  # type: ignore[valid-type]
ModalityName = Literal[("all", *MODALITIES)]  # type: ignore[valid-type]
CHECKPOINT_URI_PATTERN = r"^(gs|s3|hf)://\S+$"
ALL_ALONE = "'all' stands alone: give [all] or a list of modalities"
QUANTITY_PATTERN = r"^([0-9]+(\.[0-9]*)?|\.[0-9]+)([KMGTPE]i|[numkMGTPE]|[eE][0-9]+)?$"


def _cel(rule: str, message: str) -> dict[str, Any]:
    return {"x-kubernetes-validations": [{"rule": rule, "message": message}]}


class _Spec(BaseModel):
    model_config = ConfigDict(alias_generator=to_camel, populate_by_name=True, extra="forbid", frozen=True)


class PVCCheckpoint(_Spec):
    claim_name: str = Field(min_length=1, description="PersistentVolumeClaim holding the checkpoint "
                            "(ReadOnlyMany or ReadWriteMany: every Ray pod mounts it read-only)")
    path: str = Field("", description="checkpoint directory inside the claim ('' = its root)")


class Downloader(_Spec):
    image: str = Field(min_length=1, description="init-container image that downloads the checkpoint")
    command: list[str] = Field(min_length=1, description="its command; GEMMA4_CHECKPOINT_URI and "
                               "GEMMA4_CHECKPOINT_DIR are set in its environment")


class Checkpoint(_Spec):
    model_config = ConfigDict(json_schema_extra=_cel("has(self.uri) != has(self.pvc)",
                                                     "set exactly one of checkpoint.uri and checkpoint.pvc"))

    uri: str | None = Field(None, pattern=CHECKPOINT_URI_PATTERN,
                            description="gs://, s3:// or hf:// source, downloaded by an init container "
                            "into an emptyDir on every Ray pod")
    pvc: PVCCheckpoint | None = None
    credentials_secret_name: str | None = Field(None, description="Secret whose keys become the downloader's "
                                                "environment (HF_TOKEN, AWS_ACCESS_KEY_ID, ...)")
    downloader: Downloader | None = Field(None, description="override the default downloader of the uri's scheme")

    @model_validator(mode="after")
    def _one_source(self) -> Checkpoint:
        if (self.uri is None) == (self.pvc is None):
            raise ValueError("set exactly one of checkpoint.uri and checkpoint.pvc")
        return self


class ModelSpec(_Spec):
    variant: VariantName  # type: ignore[valid-type]
    checkpoint: Checkpoint
    dtype: Literal["bf16", "fp8", "int8", "int4"] = Field("bf16", description="weight dtype of the checkpoint")
    kv_dtype: Literal["bf16", "fp8"] = "bf16"
    name: str | None = Field(None, description="model name reported to clients (default gemma-4-VARIANT)")


class Speculative(_Spec):
    model_config = ConfigDict(json_schema_extra=_cel("(self.method == 'assistant') == has(self.assistant)",
                                                     "speculative.assistant is set exactly when method is assistant"))

    method: Literal["off", "ngram", "assistant"] = Field(
        "off", description="speculative decoding: ngram (prompt lookup, no drafter model) or assistant (the "
        "variant's gemma4_assistant drafter, e.g. hf://google/gemma-4-E2B-it-assistant); priced in the plan")
    assistant: Checkpoint | None = Field(None, description="the drafter checkpoint (method assistant only)")
    num_tokens: int | None = Field(None, ge=1, le=16, description="drafts per request and step (default: the "
                                   "variant's, " + ", ".join(f"{v} {n}" for v, n in DEFAULT_SPECULATIVE_TOKENS.items())
                                   + ")")

    @model_validator(mode="after")
    def _assistant(self) -> Speculative:
        if (self.method == "assistant") != (self.assistant is not None):
            raise ValueError("speculative.assistant is set exactly when method is assistant")
        return self


class Serving(_Spec):
    max_model_len: int = Field(8192, ge=1, description="longest prompt + completion, in tokens")
    max_concurrent_sequences: int = Field(16, ge=1, description="sequences one replica runs at once")


class AcceleratorSpec(_Spec):
    type: AcceleratorName = "h100-80gb"  # type: ignore[valid-type]
    count: int | None = Field(None, ge=1, description="devices per replica (default: the fewest that fit)")


class Parallelism(_Spec):
    model_config = ConfigDict(json_schema_extra=_cel("self.mode == 'auto' || has(self.tensorParallel)",
                                                     "parallelism.mode explicit needs tensorParallel"))

    mode: Literal["auto", "explicit"] = "auto"
    tensor_parallel: int | None = Field(None, ge=1)
    expert_parallel: int | None = Field(None, ge=1)
    redundant_experts: int = Field(0, ge=0, description="extra expert slots per MoE layer for copies of hot "
                                   "experts (26b-a4b; a multiple of the expert-parallel degree), in any mode")
    expert_rebalance_interval: int = Field(0, ge=0, description="engine steps between load-aware expert "
                                           "placements (0 = keep the balanced start)")

    @model_validator(mode="after")
    def _explicit(self) -> Parallelism:
        if self.mode == "explicit" and self.tensor_parallel is None:
            raise ValueError("parallelism.mode explicit needs tensorParallel")
        return self


class Autoscaling(_Spec):
    model_config = ConfigDict(json_schema_extra=_cel("self.minReplicas <= self.maxReplicas",
                                                     "minReplicas must not exceed maxReplicas"))

    min_replicas: int = Field(1, ge=0)
    max_replicas: int = Field(1, ge=1)
    target_ongoing_requests: float = Field(16, gt=0, description="Serve scales replicas to keep this many "
                                           "requests in flight per replica")

    @model_validator(mode="after")
    def _order(self) -> Autoscaling:
        if self.min_replicas > self.max_replicas:
            raise ValueError("minReplicas must not exceed maxReplicas")
        return self


class Gateway(_Spec):
    replicas: int = Field(1, ge=1)
    tls_secret_name: str | None = Field(None, min_length=1, description="kubernetes.io/tls Secret: gRPC over TLS "
                                        "on port 9443 (plaintext gRPC then listens on loopback only, see plaintextGrpc)")
    plaintext_grpc: bool = Field(False, description="with tlsSecretName: keep plaintext gRPC on port 9000 "
                                 "open to the cluster too")
    api_key_secret_name: str | None = Field(None, min_length=1,
                                            description="Secret with key 'api-keys' (comma-separated)")
    allow_unauthenticated: bool = Field(False, description="serve without API keys: anyone who reaches the "
                                        "Services may call the model (without it or apiKeySecretName, the "
                                        "operator deploys nothing)")

    @property
    def plaintext_grpc_exposed(self) -> bool:
        """Whether plaintext gRPC listens beyond the pod: clients with a TLS port get only that one by default."""
        return self.tls_secret_name is None or self.plaintext_grpc


class Monitoring(_Spec):
    metrics_token_secret_name: str | None = Field(
        None, min_length=1, description="Secret with key 'token': the bearer token the gateway's /metrics and "
        "/debug require; the operator's ServiceMonitor scrapes with it")


class PodResources(_Spec):
    cpu: str | None = Field(None, pattern=QUANTITY_PATTERN, description="CPU request and limit")
    memory: str | None = Field(None, pattern=QUANTITY_PATTERN, description="memory request and limit")


class Resources(_Spec):
    head: PodResources = Field(PodResources(), description="default: 2 CPUs, 8Gi")
    worker: PodResources = Field(PodResources(), description="default: 8 CPUs and the plan's host memory")


def _modality_rules() -> dict[str, Any]:
    rule = _cel("!('all' in self) || size(self) == 1", ALL_ALONE)
    return {**rule, "x-kubernetes-list-type": "set"}  # items unique, as a structural schema says it


class Gemma4ServiceSpec(_Spec):
    model: ModelSpec
    modalities: list[ModalityName] = Field(  # type: ignore[valid-type]
        ["all"], min_length=1, json_schema_extra=_modality_rules(),
        description="inputs to serve: text, image, video, audio, or [all] (the default: every one the variant "
        "takes; E2B/E4B add audio to the others' text, image and video). Text is always served; each media "
        "modality loads its tower and an encoder-output cache, priced in the plan")
    serving: Serving = Serving()
    speculative: Speculative = Speculative()
    accelerator: AcceleratorSpec = AcceleratorSpec()
    parallelism: Parallelism = Parallelism()
    autoscaling: Autoscaling = Autoscaling()
    gateway: Gateway = Gateway()
    monitoring: Monitoring = Monitoring()
    image: str | None = Field(None, min_length=1, description="the platform's serving image (default: "
                              "ghcr.io/gemma4-platform/gemma4-platform:VERSION, its -rocm build on AMD)")
    resources: Resources = Resources()
    cloud: Literal["gke", "eks", "generic"] = Field("generic", description="which node labels select the accelerator")

    @field_validator("modalities")
    @classmethod
    def _modalities(cls, value: list[str]) -> list[str]:
        if "all" in value and len(value) > 1:
            raise ValueError(ALL_ALONE)
        if len(set(value)) < len(value):
            raise ValueError("each modality at most once")
        return value

    @property
    def served_model_name(self) -> str:
        return self.model.name or f"gemma-4-{self.model.variant}"
