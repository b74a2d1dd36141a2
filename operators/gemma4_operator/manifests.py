"""Pure builders of the objects a Gemma4Service owns: a spec and a plan in, plain dicts out.

No API calls here, so every object can be validated offline. Names derive from the resource's name
alone (`NAME` for the RayService and NetworkPolicy, `NAME-grpc`, `NAME-http`, `NAME-workers`), so a
restarted operator finds what it created instead of duplicating it; every object carries an owner
reference to the resource, so deleting it garbage-collects them.

The Ray cluster: the head runs the Serve controller and the HTTP/gRPC proxies and no replica
(`num-cpus: 0`, no accelerators); one worker group runs one engine replica per pod, each pod
requesting exactly the plan's devices, scaled by the Ray autoscaler between the resource's min and
max replicas. A replica of several devices is a Ray placement group packed on one node (its actor's
CPU bundle, then `{"CPU": 1, "GPU": 1}` per rank), so each worker pod offers Ray exactly one
replica's CPUs and devices (`pod_ray_resources`): a replica's ranks all land on one pod and no two
replicas share one. TPU pods count their chip as Ray's `TPU` resource and run the engine on XLA. The worker group's `replicas` is left out on purpose: the autoscaler owns it, and
applying it would reset every scale-up. Every Ray pod mounts the checkpoint (a read-only PVC, or an
emptyDir an init container downloads into): the gateway needs no CPU slot, so Ray may place it on
the head, and it reads the tokenizer and config from the checkpoint.

The Serve config is the platform's own shape (see `gemma4_platform.cli.serve_config`), with the
plan's engine settings as the application's args; the platform is not imported (it pulls Ray), a
test checks the args against its settings model. Ray starts the proxies itself, so their hardening
(our gRPC bind address, message caps, stalled-stream aborts) reaches them through every pod's
environment: what `gemma4_platform.proxy_setup.proxy_environment` gives for the args, with TLS set
there and in a mounted Secret rather than in the args. TLS: gRPC gets an extra TLS port (9443)
through the platform's servicer registration, and plaintext gRPC then listens on loopback only
(unless `gateway.plaintextGrpc`), so neither Service nor NetworkPolicy offers port 9000; HTTP stays
plaintext on 8000, because KubeRay health-checks the Serve proxy there over plain HTTP, so HTTPS
terminates at an ingress in front of it.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from importlib import metadata
from typing import Any

import yaml

from gemma4.accelerators import Accelerator, GiB, get_accelerator
from gemma4.memory import Plan

from gemma4_operator.crd import API_VERSION, GROUP, KIND
from gemma4_operator.planner import modalities_of
from gemma4_operator.spec import Checkpoint, Downloader, Gemma4ServiceSpec

MANAGER = "gemma4-operator"
IMAGE_REPOSITORY = "ghcr.io/gemma4-platform/gemma4-platform"  # deploy/docker/serving*.Dockerfile
IMAGE_TAG = metadata.version("gemma4-platform")
RAY_VERSION = "2.60.0"  # the platform's Ray pin (pyproject `platform` extra)

HTTP_PORT, GRPC_PORT, GRPC_TLS_PORT, METRICS_PORT = 8000, 9000, 9443, 8080
GCS_PORT, DASHBOARD_PORT, DASHBOARD_AGENT_PORT, CLIENT_PORT = 6379, 8265, 52365, 10001

# Names the platform reads (gemma4_platform.cli / settings / grpc_registration / proxy_setup).
APP_NAME = "gemma4"
IMPORT_PATH = "gemma4_platform.graph:build_app"
SERVICER_FUNCTION = "gemma4_platform.grpc_registration.add_servicer"
API_KEYS_ENV, METRICS_TOKEN_ENV = "GEMMA4_API_KEYS", "GEMMA4_METRICS_TOKEN"
TLS_PORT_ENV, TLS_HOST_ENV = "GEMMA4_GRPC_TLS_PORT", "GEMMA4_GRPC_TLS_HOST"
TLS_CERT_ENV, TLS_KEY_ENV = "GEMMA4_TLS_CERT_FILE", "GEMMA4_TLS_KEY_FILE"
PROXY_CALLBACK_ENV = "RAY_SERVE_HTTP_PROXY_CALLBACK_IMPORT_PATH"
PROXY_CALLBACK = "gemma4_platform.proxy_setup.configure_proxy"
GRPC_HOST_ENV, MAX_REQUEST_BYTES_ENV = "GEMMA4_GRPC_HOST", "GEMMA4_MAX_REQUEST_BYTES"
STALLED_TIMEOUT_ENV = "GEMMA4_STALLED_STREAM_TIMEOUT_S"

# Written into the args (the gateway's checks) and the environment (the proxies'), so both agree.
MAX_REQUEST_BYTES = 8 << 20
STALLED_STREAM_TIMEOUT_S = 30.0

ANY_ADDRESS, LOOPBACK = "0.0.0.0", "127.0.0.1"
API_KEYS_SECRET_KEY, METRICS_TOKEN_SECRET_KEY = "api-keys", "token"
CHECKPOINT_DIR = "/models"
ASSISTANT_DIR = "/models-assistant"  # the speculative-decoding drafter's checkpoint
TLS_DIR = "/etc/gemma4/tls"
WORKER_GROUP = "gpu"
HEAD_CPU, HEAD_MEMORY, WORKER_CPU = "2", "8Gi", "8"
REPLICA_CPUS = 1  # Ray CPUs of a replica's actor (the placement group's first bundle)
# Ray's object store lives in the pod's memory on top of the plan's host memory (Ray would take 30%).
OBJECT_STORE_BYTES = 2 * GiB
CLIENT_LABEL = f"{GROUP}/client"  # pods in other namespaces with this label may call the APIs

# Default downloader per checkpoint scheme; the URI and target directory come in the environment.
DOWNLOADERS = {
    "gs": Downloader(image="gcr.io/google.com/cloudsdktool/google-cloud-cli:stable", command=[
        "sh", "-c", 'gcloud storage cp --recursive "$GEMMA4_CHECKPOINT_URI/*" "$GEMMA4_CHECKPOINT_DIR/"']),
    "s3": Downloader(image="amazon/aws-cli:latest", command=[
        "sh", "-c", 'aws s3 sync "$GEMMA4_CHECKPOINT_URI" "$GEMMA4_CHECKPOINT_DIR"']),
    "hf": Downloader(image="python:3.11-slim", command=[
        "sh", "-c", ('pip install --quiet "huggingface_hub>=0.34" && '
                     'hf download "${GEMMA4_CHECKPOINT_URI#hf://}" --local-dir "$GEMMA4_CHECKPOINT_DIR"')]),
}


@dataclass(frozen=True)
class Owner:
    """The Gemma4Service the objects belong to."""

    name: str
    namespace: str
    uid: str

    def reference(self) -> dict[str, Any]:
        return {"apiVersion": API_VERSION, "kind": KIND, "name": self.name, "uid": self.uid,
                "controller": True, "blockOwnerDeletion": True}


def instance_labels(owner: Owner) -> dict[str, str]:
    """Labels on everything of one resource; they also select its pods."""
    return {"app.kubernetes.io/name": "gemma4", "app.kubernetes.io/instance": owner.name}


def _labels(owner: Owner, component: str) -> dict[str, str]:
    return {**instance_labels(owner), "app.kubernetes.io/component": component, "app.kubernetes.io/managed-by": MANAGER}


def _metadata(owner: Owner, name: str, component: str) -> dict[str, Any]:
    return {"name": name, "namespace": owner.namespace, "labels": _labels(owner, component),
            "ownerReferences": [owner.reference()]}


def grpc_service_name(owner: Owner) -> str:
    return f"{owner.name}-grpc"


def http_service_name(owner: Owner) -> str:
    return f"{owner.name}-http"


# ---------------------------------------------------------------------------- the Serve application


def _checkpoints(spec: Gemma4ServiceSpec) -> list[tuple[str, Checkpoint, str]]:
    """(volume name, checkpoint, mount directory) of the model and, with an assistant drafter, of the drafter."""
    out = [("checkpoint", spec.model.checkpoint, CHECKPOINT_DIR)]
    if spec.speculative.assistant is not None:
        out.append(("assistant", spec.speculative.assistant, ASSISTANT_DIR))
    return out


def _directory(checkpoint: Checkpoint, mount: str) -> str:
    pvc = checkpoint.pvc
    return f"{mount}/{pvc.path.strip('/')}".rstrip("/") if pvc else mount


def checkpoint_path(spec: Gemma4ServiceSpec) -> str:
    return _directory(spec.model.checkpoint, CHECKPOINT_DIR)


def speculative_model(spec: Gemma4ServiceSpec) -> str | None:
    """`engine.speculative.model`: None (off), 'ngram', or the mounted drafter's directory."""
    method, assistant = spec.speculative.method, spec.speculative.assistant
    if method == "off":
        return None
    return _directory(assistant, ASSISTANT_DIR) if assistant is not None else method


def grpc_host(spec: Gemma4ServiceSpec) -> str:
    """Where plaintext gRPC listens: every address, or loopback when clients have the TLS port instead."""
    return ANY_ADDRESS if spec.gateway.plaintext_grpc_exposed else LOOPBACK


def engine_settings(spec: Gemma4ServiceSpec, plan: Plan) -> dict[str, Any]:
    """The args' `engine` section: the plan's layout and sizes as the engine's settings."""
    return {
        "block_size": plan.spec.block_size,
        "max_num_seqs": plan.spec.max_num_seqs,
        "max_num_batched_tokens": plan.spec.max_num_batched_tokens,
        "max_model_len": plan.spec.max_model_len,
        "kv_cache_memory_bytes": plan.kv_cache_bytes_per_gpu,
        "tensor_parallel_size": plan.tensor_parallel,
        "expert_parallel_size": plan.expert_parallel,
        "redundant_experts": plan.spec.redundant_experts,
        "expert_rebalance_interval": spec.parallelism.expert_rebalance_interval,
        "encoder_cache_tokens": plan.spec.encoder_cache_tokens,
        "speculative": {"model": speculative_model(spec), "num_tokens": spec.speculative.num_tokens},
    }


def replica_num_gpus(plan: Plan) -> int:
    """`replica.num_gpus`, the GPUs of the replica's own actor: its device when it runs on one GPU; none when
    its ranks' bundles hold the devices (tensor parallel) or the devices are no Ray GPUs (TPU chips)."""
    on_gpus = get_accelerator(plan.accelerator).runtime.ray_resource == "GPU"
    return 1 if on_gpus and plan.tensor_parallel == 1 else 0


def pod_ray_resources(plan: Plan) -> dict[str, int]:
    """What one worker pod offers Ray: the CPUs one replica takes (its actor, plus one per rank of a
    placement group) and the replica's devices under the vendor's Ray resource name."""
    ranks = plan.tensor_parallel if plan.tensor_parallel > 1 else 0
    devices = get_accelerator(plan.accelerator).runtime.ray_resource
    return {"CPU": REPLICA_CPUS + ranks, devices: plan.gpus_per_replica}


def platform_args(spec: Gemma4ServiceSpec, plan: Plan) -> dict[str, Any]:
    """The application's args: a `PlatformSettings` dict carrying the plan's engine settings."""
    scaling = spec.autoscaling
    return {
        "model": {"path": checkpoint_path(spec), "name": spec.served_model_name,
                  "device": get_accelerator(plan.accelerator).runtime.device, "modalities": modalities_of(plan)},
        "engine": engine_settings(spec, plan),
        "replica": {
            "num_gpus": replica_num_gpus(plan),
            "num_cpus": REPLICA_CPUS,
            "autoscaling": {
                "min_replicas": scaling.min_replicas,
                "max_replicas": scaling.max_replicas,
                "target_ongoing_requests": scaling.target_ongoing_requests,
            },
        },
        "gateway": {
            "num_replicas": spec.gateway.replicas,
            "allow_unauthenticated": spec.gateway.allow_unauthenticated,
            "stalled_stream_timeout_s": STALLED_STREAM_TIMEOUT_S,
        },
        "limits": {"max_request_bytes": MAX_REQUEST_BYTES},
        "server": {"host": ANY_ADDRESS, "grpc_host": grpc_host(spec), "http_port": HTTP_PORT, "grpc_port": GRPC_PORT},
    }


def serve_config(spec: Gemma4ServiceSpec, plan: Plan) -> dict[str, Any]:
    """The Ray Serve config file (a RayService's `serveConfigV2`), as `gemma4-platform config` writes it."""
    return {
        "proxy_location": "EveryNode",
        "http_options": {"host": ANY_ADDRESS, "port": HTTP_PORT},
        "grpc_options": {"port": GRPC_PORT, "grpc_servicer_functions": [SERVICER_FUNCTION], "enable_reflection": False},
        "applications": [{
            "name": APP_NAME,
            "route_prefix": "/",
            "import_path": IMPORT_PATH,
            "args": platform_args(spec, plan),
        }],
    }


# ---------------------------------------------------------------------------- pods


def node_selector(spec: Gemma4ServiceSpec, devices: int) -> dict[str, str]:
    """The cloud's labels for the accelerator, else the vendor's node-labeller labels; TPUs exist on GKE
    only, so they always get GKE's accelerator and slice-topology labels."""
    accelerator = get_accelerator(spec.accelerator.type)
    chosen: dict[str, str] = {}
    if spec.cloud == "gke" or accelerator.gke_tpu_topologies:
        chosen = accelerator.gke_selector(devices)  # ValueError for a TPU count no slice has
    elif spec.cloud == "eks":
        chosen = dict(accelerator.eks_node_selector)
    return chosen or dict(accelerator.node_selector)


def serving_image(spec: Gemma4ServiceSpec) -> str:
    """The spec's image, else this release's serving image for the vendor (its -rocm and -tpu builds)."""
    if spec.image:
        return spec.image
    return f"{IMAGE_REPOSITORY}:{IMAGE_TAG}{get_accelerator(spec.accelerator.type).runtime.image_suffix}"


def proxy_environment(spec: Gemma4ServiceSpec) -> dict[str, str]:
    """`gemma4_platform.proxy_setup.proxy_environment` for our args, plus the TLS port the args leave out."""
    env = {
        PROXY_CALLBACK_ENV: PROXY_CALLBACK,
        GRPC_HOST_ENV: grpc_host(spec),
        MAX_REQUEST_BYTES_ENV: str(MAX_REQUEST_BYTES),
        STALLED_TIMEOUT_ENV: str(STALLED_STREAM_TIMEOUT_S),
    }
    if spec.gateway.tls_secret_name:
        env |= {TLS_PORT_ENV: str(GRPC_TLS_PORT), TLS_HOST_ENV: ANY_ADDRESS,
                TLS_CERT_ENV: f"{TLS_DIR}/tls.crt", TLS_KEY_ENV: f"{TLS_DIR}/tls.key"}
    return env


def _env(spec: Gemma4ServiceSpec) -> list[dict[str, Any]]:
    """The proxies' environment, and the gateway's secrets (API keys, scrape token): every Ray pod runs a
    proxy, and Ray may place the gateway on any of them."""
    secrets = [(API_KEYS_ENV, spec.gateway.api_key_secret_name, API_KEYS_SECRET_KEY),
               (METRICS_TOKEN_ENV, spec.monitoring.metrics_token_secret_name, METRICS_TOKEN_SECRET_KEY)]
    return [{"name": name, "value": value} for name, value in proxy_environment(spec).items()] + [
        {"name": name, "valueFrom": {"secretKeyRef": {"name": secret, "key": key}}}
        for name, secret, key in secrets if secret]


def _volumes(spec: Gemma4ServiceSpec) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """(volumes, mounts) for the checkpoints (model and drafter) and the TLS secret."""
    volumes, mounts = [], []
    for name, checkpoint, mount in _checkpoints(spec):
        pvc = checkpoint.pvc
        source = {"persistentVolumeClaim": {"claimName": pvc.claim_name, "readOnly": True}} if pvc else {"emptyDir": {}}
        volumes.append({"name": name, **source})
        mounts.append({"name": name, "mountPath": mount, "readOnly": True})
    if spec.gateway.tls_secret_name:
        volumes.append({"name": "tls", "secret": {"secretName": spec.gateway.tls_secret_name}})
        mounts.append({"name": "tls", "mountPath": TLS_DIR, "readOnly": True})
    return volumes, mounts


def _downloaders(spec: Gemma4ServiceSpec) -> list[dict[str, Any]]:
    """The init containers that fill the checkpoint volumes from their `uri` (none for a PVC)."""
    containers = []
    for name, checkpoint, mount in _checkpoints(spec):
        if checkpoint.uri is None:
            continue
        tool = checkpoint.downloader or DOWNLOADERS[checkpoint.uri.split("://", 1)[0]]
        container: dict[str, Any] = {
            "name": f"download-{name}",
            "image": tool.image,
            "command": list(tool.command),
            "env": [{"name": "GEMMA4_CHECKPOINT_URI", "value": checkpoint.uri},
                    {"name": "GEMMA4_CHECKPOINT_DIR", "value": mount}],
            "volumeMounts": [{"name": name, "mountPath": mount}],
        }
        if checkpoint.credentials_secret_name:
            container["envFrom"] = [{"secretRef": {"name": checkpoint.credentials_secret_name}}]
        containers.append(container)
    return containers


def _pod_template(owner: Owner, spec: Gemma4ServiceSpec, container: dict[str, Any], component: str,
                  extra_volumes: tuple[dict[str, Any], ...] = (), **pod_spec: Any) -> dict[str, Any]:
    """A Ray pod: the serving image with the secrets' env and the checkpoint (and TLS) mounted."""
    volumes, mounts = _volumes(spec)
    container = {**container, "image": serving_image(spec), "env": _env(spec),
                 "volumeMounts": mounts + container.get("volumeMounts", [])}
    body: dict[str, Any] = {"containers": [container], "volumes": volumes + list(extra_volumes), **pod_spec}
    if init := _downloaders(spec):
        body["initContainers"] = init
    # Only our labels: KubeRay adds its own (ray.io/node-type, ray.io/cluster, ...) to the pods.
    return {"metadata": {"labels": _labels(owner, component)}, "spec": body}


def _requests_and_limits(resources: dict[str, str]) -> dict[str, dict[str, str]]:
    return {"requests": dict(resources), "limits": dict(resources)}


def _grpc_ports(spec: Gemma4ServiceSpec) -> list[dict[str, Any]]:
    """The gRPC ports others may reach: plaintext unless it listens on loopback only, and TLS with a Secret."""
    ports: list[dict[str, Any]] = []
    if spec.gateway.plaintext_grpc_exposed:
        ports.append({"name": "grpc", "port": GRPC_PORT, "appProtocol": "kubernetes.io/h2c"})
    if spec.gateway.tls_secret_name:
        ports.append({"name": "grpc-tls", "port": GRPC_TLS_PORT})
    return ports


def _head_template(owner: Owner, spec: Gemma4ServiceSpec) -> dict[str, Any]:
    ports = [("gcs-server", GCS_PORT), ("dashboard", DASHBOARD_PORT), ("client", CLIENT_PORT),
             ("serve", HTTP_PORT), ("metrics", METRICS_PORT)] + [(p["name"], p["port"]) for p in _grpc_ports(spec)]
    head = spec.resources.head
    container = {
        "name": "ray-head",
        "ports": [{"name": name, "containerPort": port} for name, port in ports],
        "resources": _requests_and_limits({"cpu": head.cpu or HEAD_CPU, "memory": head.memory or HEAD_MEMORY}),
    }
    return _pod_template(owner, spec, container, "head")


def worker_memory(spec: Gemma4ServiceSpec, plan: Plan) -> str:
    if spec.resources.worker.memory:
        return spec.resources.worker.memory
    return f"{math.ceil((plan.host_memory_bytes + OBJECT_STORE_BYTES) / GiB)}Gi"


def _worker_template(owner: Owner, spec: Gemma4ServiceSpec, plan: Plan) -> dict[str, Any]:
    accelerator = get_accelerator(spec.accelerator.type)
    host = {"cpu": spec.resources.worker.cpu or WORKER_CPU, "memory": worker_memory(spec, plan)}
    container = {
        "name": "ray-worker",
        "resources": {"requests": host, "limits": {**host, accelerator.resource_name: str(plan.gpus_per_replica)}},
        # NCCL and Ray exchange tensors through /dev/shm, which defaults to 64 MiB in a container.
        "volumeMounts": [{"name": "dshm", "mountPath": "/dev/shm"}],
    }
    return _pod_template(
        owner, spec, container, "worker", ({"name": "dshm", "emptyDir": {"medium": "Memory"}},),
        nodeSelector=node_selector(spec, plan.gpus_per_replica),
        tolerations=[dict(t) for t in accelerator.tolerations],
    )


def _worker_start_params(accelerator: Accelerator, plan: Plan) -> dict[str, str]:
    """`ray start` flags of a worker pod: the object store, and exactly `pod_ray_resources` (Ray would
    otherwise count the container's CPUs and leave room for a second replica)."""
    offered = pod_ray_resources(plan)
    params = {"object-store-memory": str(OBJECT_STORE_BYTES), "num-cpus": str(offered.pop("CPU"))}
    if accelerator.runtime.ray_resource == "GPU":
        params["num-gpus"] = str(offered.pop("GPU"))
    if offered:  # custom resources: a JSON object, quoted for the shell KubeRay runs `ray start` in
        params["resources"] = '"' + json.dumps(offered).replace('"', '\\"') + '"'
    return params


# ---------------------------------------------------------------------------- owned objects


def ray_service(owner: Owner, spec: Gemma4ServiceSpec, plan: Plan) -> dict[str, Any]:
    scaling = spec.autoscaling
    return {
        "apiVersion": "ray.io/v1",
        "kind": "RayService",
        "metadata": _metadata(owner, owner.name, "ray"),
        "spec": {
            # Cluster-level changes roll out on a new cluster that takes traffic once it is ready.
            "upgradeStrategy": {"type": "NewCluster"},
            "serveConfigV2": yaml.safe_dump(serve_config(spec, plan), sort_keys=False),
            "rayClusterConfig": {
                "rayVersion": RAY_VERSION,
                # Ray 2.60 turns token authentication on; KubeRay generates the token for all pods.
                "authOptions": {"mode": "token"},
                "enableInTreeAutoscaling": True,
                "autoscalerOptions": {"upscalingMode": "Default", "idleTimeoutSeconds": 60},
                "headGroupSpec": {
                    "rayStartParams": {"num-cpus": "0", "dashboard-host": "0.0.0.0",
                                       "metrics-export-port": str(METRICS_PORT)},
                    "template": _head_template(owner, spec),
                },
                "workerGroupSpecs": [{
                    "groupName": WORKER_GROUP,
                    "minReplicas": scaling.min_replicas,
                    "maxReplicas": scaling.max_replicas,
                    "rayStartParams": _worker_start_params(get_accelerator(spec.accelerator.type), plan),
                    "template": _worker_template(owner, spec, plan),
                }],
            },
        },
    }


def _pods(owner: Owner, component: str) -> dict[str, str]:
    """Selects the head or the worker pods of one resource."""
    return {**instance_labels(owner), "app.kubernetes.io/component": component}


def _serving_pods(owner: Owner) -> dict[str, str]:
    """Head pods whose Serve proxy KubeRay found healthy (it maintains the `ray.io/serve` label)."""
    return {**_pods(owner, "head"), "ray.io/serve": "true"}


def _service(owner: Owner, name: str, component: str, ports: list[dict[str, Any]]) -> dict[str, Any]:
    return {
        "apiVersion": "v1",
        "kind": "Service",
        "metadata": _metadata(owner, name, component),
        "spec": {"type": "ClusterIP", "selector": _serving_pods(owner), "ports": ports},
    }


def grpc_service(owner: Owner, spec: Gemma4ServiceSpec) -> dict[str, Any]:
    return _service(owner, grpc_service_name(owner), "grpc", [{**p, "targetPort": p["port"]} for p in _grpc_ports(spec)])


def http_service(owner: Owner) -> dict[str, Any]:
    return _service(owner, http_service_name(owner), "http", [
        {"name": "http", "port": HTTP_PORT, "targetPort": HTTP_PORT, "appProtocol": "http"},
        {"name": "metrics", "port": METRICS_PORT, "targetPort": METRICS_PORT},
    ])


def pod_disruption_budget(owner: Owner) -> dict[str, Any]:
    """Voluntary disruptions (node drains) take down at most one replica at a time."""
    return {
        "apiVersion": "policy/v1",
        "kind": "PodDisruptionBudget",
        "metadata": _metadata(owner, f"{owner.name}-workers", "worker"),
        "spec": {"maxUnavailable": 1,
                 "selector": {"matchLabels": _pods(owner, "worker")}},
    }


def _tcp(*ports: int) -> list[dict[str, Any]]:
    return [{"protocol": "TCP", "port": port} for port in ports]


def _from_anywhere(labels: dict[str, str]) -> dict[str, Any]:
    return {"namespaceSelector": {}, "podSelector": {"matchLabels": labels}}


def network_policy(owner: Owner, spec: Gemma4ServiceSpec) -> dict[str, Any]:
    """Ray's pods talk freely among themselves; others reach only what they need.

    Clients: any pod of the namespace, or pods labelled `serving.gemma4.dev/client: "true"` anywhere.
    KubeRay's operator: the dashboard (it submits the Serve config) and the proxies (health checks).
    Prometheus: the metrics ports.
    """
    api_ports = [HTTP_PORT] + [p["port"] for p in _grpc_ports(spec)]
    return {
        "apiVersion": "networking.k8s.io/v1",
        "kind": "NetworkPolicy",
        "metadata": _metadata(owner, owner.name, "ray"),
        "spec": {
            "podSelector": {"matchLabels": instance_labels(owner)},
            "policyTypes": ["Ingress"],
            "ingress": [
                {"from": [{"podSelector": {"matchLabels": instance_labels(owner)}}]},
                {"from": [{"podSelector": {}}, _from_anywhere({CLIENT_LABEL: "true"})], "ports": _tcp(*api_ports)},
                {"from": [_from_anywhere({"app.kubernetes.io/name": "kuberay-operator"})],
                 "ports": _tcp(DASHBOARD_PORT, DASHBOARD_AGENT_PORT, HTTP_PORT)},
                {"from": [_from_anywhere({"app.kubernetes.io/name": "prometheus"})],
                 "ports": _tcp(HTTP_PORT, METRICS_PORT)},
            ],
        },
    }


def service_monitor(owner: Owner, spec: Gemma4ServiceSpec) -> dict[str, Any]:
    """Prometheus Operator scraping: the platform's /metrics on the HTTP port (with the scrape token when the
    gateway requires one; `authorization` is the successor of the deprecated `bearerTokenSecret`), and Ray's own."""
    gateway: dict[str, Any] = {"port": "http", "path": "/metrics", "interval": "15s"}
    if spec.monitoring.metrics_token_secret_name:
        gateway["authorization"] = {"type": "Bearer", "credentials": {
            "name": spec.monitoring.metrics_token_secret_name, "key": METRICS_TOKEN_SECRET_KEY}}
    return {
        "apiVersion": "monitoring.coreos.com/v1",
        "kind": "ServiceMonitor",
        "metadata": _metadata(owner, owner.name, "metrics"),
        "spec": {
            "selector": {"matchLabels": {**instance_labels(owner), "app.kubernetes.io/component": "http"}},
            "endpoints": [gateway, {"port": "metrics", "path": "/metrics", "interval": "15s"}],
        },
    }


def endpoints(owner: Owner, spec: Gemma4ServiceSpec) -> dict[str, str]:
    """Where clients in the cluster connect."""
    host = f"{grpc_service_name(owner)}.{owner.namespace}.svc"
    status_keys = {"grpc": "grpc", "grpc-tls": "grpcTls"}
    out = {status_keys[p["name"]]: f"{host}:{p['port']}" for p in _grpc_ports(spec)}
    out["http"] = f"http://{http_service_name(owner)}.{owner.namespace}.svc:{HTTP_PORT}"
    return out


def desired_objects(owner: Owner, spec: Gemma4ServiceSpec, plan: Plan, *, with_service_monitor: bool) -> list[dict[str, Any]]:
    """Everything one feasible Gemma4Service owns, RayService first."""
    objects = [ray_service(owner, spec, plan), grpc_service(owner, spec), http_service(owner),
               pod_disruption_budget(owner), network_policy(owner, spec)]
    if with_service_monitor:
        objects.append(service_monitor(owner, spec))
    return objects
