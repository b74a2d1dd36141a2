"""The operator's pure parts: the CRD (schema, defaults, committed YAML), the manifest builders
(validated offline against Kubernetes' and KubeRay's schemas), the plan glue and the status."""

from __future__ import annotations

import copy
import os
import subprocess
import sys
import tomllib
from pathlib import Path
from typing import Any

import jsonschema
import kubernetes_validate
import pytest
import yaml
from pydantic import ValidationError

from gemma4.memory import ServingSpec, plan
from gemma4_operator import manifests, planner, status
from gemma4_operator.crd import CRD_PATH, crd_manifest, crd_yaml
from gemma4_operator.manifests import Owner
from gemma4_operator.spec import Gemma4ServiceSpec

REPO = Path(__file__).resolve().parents[1]
KUBE_VERSIONS = ("1.31", "1.33")
OWNER = Owner(name="chat", namespace="serving", uid="5b1f0c8e-0000-4000-8000-000000000001")
KUBERAY_SCHEMA = yaml.safe_load((Path(__file__).parent / "data" / "kuberay-rayservice-v1.schema.yaml").read_text())
# The strict Prometheus Operator subset the Helm chart's tests use for the same kinds.
PROMETHEUS_OPERATOR_SCHEMAS = yaml.safe_load(
    (Path(__file__).parent / "data" / "prometheus-operator-subset.schema.yaml").read_text())
PVC = {"pvc": {"claimName": "models", "path": "gemma-4-e4b-it"}}
KEYS = {"apiKeySecretName": "gemma-keys"}
TLS = {"tlsSecretName": "gemma-tls", **KEYS}


def sample(**spec: Any) -> dict[str, Any]:
    """A Gemma4Service spec as a user writes it (camelCase, defaults left out), with API keys."""
    body: dict[str, Any] = {"model": {"variant": "e4b", "checkpoint": PVC}, "gateway": KEYS}
    body.update(spec)
    return body


def build(**spec: Any) -> tuple[Gemma4ServiceSpec, Any, list[dict[str, Any]]]:
    parsed = Gemma4ServiceSpec.model_validate(sample(**spec))
    result = planner.plan_for(parsed)
    return parsed, result, manifests.desired_objects(OWNER, parsed, result, with_service_monitor=True)


def by_kind(objects: list[dict[str, Any]], kind: str) -> list[dict[str, Any]]:
    return [o for o in objects if o["kind"] == kind]


def pod_templates(objects: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The head's and the workers' pod templates of the RayService."""
    cluster = by_kind(objects, "RayService")[0]["spec"]["rayClusterConfig"]
    return [cluster["headGroupSpec"]["template"]] + [g["template"] for g in cluster["workerGroupSpecs"]]


# The replica's parallel layout (issue 12): the engine's settings of these names arrive in the platform's
# EngineSettings in the same change; until they do, `args_settings` validates the args without them.
def serve_args(objects: list[dict[str, Any]]) -> dict[str, Any]:
    """The application's args in the RayService's Serve config, as written."""
    config = yaml.safe_load(by_kind(objects, "RayService")[0]["spec"]["serveConfigV2"])
    return config["applications"][0]["args"]


def args_settings(objects: list[dict[str, Any]]) -> Any:
    """The platform's settings from the application's args in the RayService's Serve config."""
    from gemma4_platform.settings import PlatformSettings

    return PlatformSettings.model_validate(serve_args(objects))


def crd_schema() -> dict[str, Any]:
    return crd_manifest()["spec"]["versions"][0]["schema"]["openAPIV3Schema"]


def with_defaults(schema: dict[str, Any], value: Any) -> Any:
    """Structural defaulting as the API server does it: fill absent properties, then descend."""
    if not isinstance(value, dict) or "properties" not in schema:
        return value
    out = dict(value)
    for name, prop in schema["properties"].items():
        if name not in out and "default" in prop:
            out[name] = copy.deepcopy(prop["default"])
        if name in out:
            out[name] = with_defaults(prop, out[name])
    return out


# ---------------------------------------------------------------------------- the package


def test_the_operator_imports_neither_torch_nor_ray_nor_the_platform() -> None:
    code = ("import sys, gemma4_operator, gemma4_operator.handlers, gemma4_operator.__main__; "
            "print(sorted(m for m in sys.modules if m.split('.')[0] in ('torch', 'ray', 'gemma4_platform')))")
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(str(REPO / p) for p in ("model", "operators"))}
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, check=True)
    assert result.stdout.strip() == "[]"


def test_committed_crd_yaml_is_generated_from_the_schema_code() -> None:
    assert CRD_PATH.read_text() == crd_yaml(), "regenerate: python -m gemma4_operator crd > operators/gemma4_operator/crd.yaml"
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(str(REPO / p) for p in ("model", "operators"))}
    printed = subprocess.run([sys.executable, "-m", "gemma4_operator", "crd"], capture_output=True, text=True,
                             env=env, check=True).stdout
    assert printed == crd_yaml()


def test_runner_passes_namespaces_and_peering_to_kopf(monkeypatch: pytest.MonkeyPatch) -> None:
    import kopf

    from gemma4_operator.__main__ import main

    calls: list[dict[str, Any]] = []
    monkeypatch.setattr(kopf, "configure", lambda **_: None)
    monkeypatch.setattr(kopf, "run", lambda **kwargs: calls.append(kwargs))
    main([])
    main(["-n", "serving", "-n", "staging", "--peering", "gemma4", "--liveness", "http://0.0.0.0:8080/healthz"])
    assert calls[0] == {"clusterwide": True, "namespaces": [], "standalone": True, "peering_name": None,
                        "priority": 0, "liveness_endpoint": None}
    assert calls[1] == {"clusterwide": False, "namespaces": ["serving", "staging"], "standalone": False,
                        "peering_name": "gemma4", "priority": 0, "liveness_endpoint": "http://0.0.0.0:8080/healthz"}


def test_constants_shared_with_the_platform_agree() -> None:
    from gemma4_platform import cli, grpc_registration, proxy_setup, settings

    assert manifests.SERVICER_FUNCTION == grpc_registration.SERVICER_FUNCTION
    assert (manifests.TLS_PORT_ENV, manifests.TLS_HOST_ENV, manifests.TLS_CERT_ENV, manifests.TLS_KEY_ENV) == (
        proxy_setup.TLS_PORT_ENV, proxy_setup.TLS_HOST_ENV, proxy_setup.TLS_CERT_ENV,
        proxy_setup.TLS_KEY_ENV)
    assert (manifests.PROXY_CALLBACK_ENV, manifests.PROXY_CALLBACK, manifests.GRPC_HOST_ENV,
            manifests.MAX_REQUEST_BYTES_ENV, manifests.STALLED_TIMEOUT_ENV) == (
        proxy_setup.CALLBACK_ENV, proxy_setup.CALLBACK, proxy_setup.GRPC_HOST_ENV,
        proxy_setup.MAX_REQUEST_BYTES_ENV, proxy_setup.STALLED_TIMEOUT_ENV)
    assert (manifests.API_KEYS_ENV, manifests.METRICS_TOKEN_ENV) == (settings.API_KEYS_ENV, settings.METRICS_TOKEN_ENV)
    assert manifests.APP_NAME == cli.APP_NAME
    pins = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["optional-dependencies"]["platform"]
    assert f"ray[serve]=={manifests.RAY_VERSION}" in pins


# ---------------------------------------------------------------------------- the CRD


@pytest.mark.parametrize("version", KUBE_VERSIONS)
def test_crd_is_a_valid_customresourcedefinition(version: str) -> None:
    kubernetes_validate.validate(crd_manifest(), version, strict=True)


def test_crd_spec_schema_is_structural() -> None:
    """Every node typed; none of what JSON Schema allows but a structural schema rejects."""
    def walk(node: dict[str, Any], where: str) -> None:
        assert "type" in node, where
        assert not {"$ref", "$defs", "anyOf", "oneOf", "allOf", "title"} & node.keys(), where
        assert node.get("additionalProperties", {}) is not False and node.get("default", "") is not None, where
        if node["type"] == "object" and "default" in node:
            assert node["default"] == {} and "required" not in node, where
        for name, prop in node.get("properties", {}).items():
            walk(prop, f"{where}.{name}")
        for key in ("items", "additionalProperties"):
            if isinstance(node.get(key), dict):
                walk(node[key], f"{where}[{key}]")

    walk(crd_schema()["properties"]["spec"], "spec")


def test_sample_validates_against_the_crd_and_server_defaults_equal_the_operators() -> None:
    cr = {"apiVersion": "serving.gemma4.dev/v1alpha1", "kind": "Gemma4Service",
          "metadata": {"name": "chat"}, "spec": sample(autoscaling={"maxReplicas": 4})}
    jsonschema.Draft4Validator(crd_schema()).validate(cr)
    defaulted = with_defaults(crd_schema()["properties"]["spec"], cr["spec"])
    jsonschema.Draft4Validator(crd_schema()).validate({**cr, "spec": defaulted})
    parsed = Gemma4ServiceSpec.model_validate(cr["spec"])
    assert defaulted == parsed.model_dump(by_alias=True, exclude_none=True)
    assert parsed.autoscaling.max_replicas == 4 and parsed.serving.max_model_len == 8192


@pytest.mark.parametrize("spec", [
    sample(model={"variant": "7b", "checkpoint": PVC}),                      # unknown variant
    sample(autoscaling={"minReplicas": -1}),                                 # negative replicas
    sample(autoscaling={"maxReplicas": 0}),
    sample(accelerator={"type": "v100"}),
    sample(model={"variant": "e4b", "checkpoint": {"uri": "ftp://x/y"}}),   # scheme not supported
    sample(model={"variant": "e4b", "checkpoint": PVC, "dtype": "fp4"}),
    sample(resources={"worker": {"memory": "lots"}}),
    sample(autoscaling={"targetOngoingRequests": 0}),
    sample(modalities=["text", "smell"]),                                    # unknown modality
    sample(modalities=[]),
    sample(modalities="all"),                                                # a list, even for all
    sample(speculative={"method": "eagle"}),
    sample(speculative={"method": "ngram", "numTokens": 0}),
    {"serving": {"maxModelLen": 4096}},                                      # no model
])
def test_invalid_specs_are_rejected_by_the_crd_schema_and_the_operator(spec: dict[str, Any]) -> None:
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.Draft4Validator(crd_schema()["properties"]["spec"]).validate(spec)
    with pytest.raises(ValidationError):
        Gemma4ServiceSpec.model_validate(spec)


@pytest.mark.parametrize("spec,message", [
    (sample(autoscaling={"minReplicas": 3, "maxReplicas": 2}), "minReplicas must not exceed maxReplicas"),
    (sample(model={"variant": "e4b", "checkpoint": {**PVC, "uri": "gs://b/m"}}), "exactly one of"),
    (sample(parallelism={"mode": "explicit"}), "explicit needs tensorParallel"),
    (sample(modalities=["all", "audio"]), "'all' stands alone"),
    (sample(speculative={"method": "assistant"}), "speculative.assistant is set exactly when method is assistant"),
    (sample(speculative={"method": "ngram", "assistant": PVC}), "speculative.assistant is set exactly when"),
])
def test_cross_field_rules_are_checked_and_carried_into_the_crd_as_cel(spec: dict[str, Any], message: str) -> None:
    with pytest.raises(ValidationError, match=message):
        Gemma4ServiceSpec.model_validate(spec)
    rules = [r["message"] for r in _walk_validations(crd_schema())]
    assert any(message in rule for rule in rules)


def _walk_validations(schema: dict[str, Any]) -> list[dict[str, str]]:
    found = list(schema.get("x-kubernetes-validations", []))
    for prop in schema.get("properties", {}).values():
        found += _walk_validations(prop)
    return found


def test_crd_shape_printer_columns_and_status_subresource() -> None:
    crd = crd_manifest()
    assert crd["spec"]["names"]["shortNames"] == ["g4s"] and crd["spec"]["scope"] == "Namespaced"
    version = crd["spec"]["versions"][0]
    assert version["subresources"] == {"status": {}}
    assert [c["name"] for c in version["additionalPrinterColumns"]] == [
        "Variant", "Accelerator", "GPUs/replica", "Replicas", "Ready", "Age"]
    spec_schema = crd_schema()["properties"]["spec"]
    assert spec_schema["properties"]["accelerator"]["properties"]["type"]["enum"][:2] == ["h100-80gb", "h200-141gb"]


# ---------------------------------------------------------------------------- built-in objects


@pytest.mark.parametrize("version", KUBE_VERSIONS)
@pytest.mark.parametrize("spec", [{"gateway": {"allowUnauthenticated": True}},
                                  {"gateway": TLS, "monitoring": {"metricsTokenSecretName": "scrape-token"}}])
def test_builtin_objects_and_pod_templates_validate_strictly(version: str, spec: dict[str, Any]) -> None:
    _, _, objects = build(**spec, model={"variant": "e4b", "checkpoint": {
        "uri": "hf://google/gemma-4-E4B-it", "credentialsSecretName": "hf-token"}})
    builtins = [o for o in objects if o["kind"] not in ("RayService", "ServiceMonitor")]
    assert sorted(o["kind"] for o in builtins) == ["NetworkPolicy", "PodDisruptionBudget", "Service", "Service"]
    for obj in builtins:
        kubernetes_validate.validate(obj, version, strict=True)
    for template in pod_templates(objects):
        kubernetes_validate.validate({"apiVersion": "v1", "kind": "PodTemplate", "metadata": {"name": "t"},
                                      "template": template}, version, strict=True)


def test_rayservice_validates_against_kuberays_schema() -> None:
    for spec in (sample(), sample(gateway=TLS, accelerator={"type": "mi300x"})):
        _, _, objects = build(**spec)
        jsonschema.Draft4Validator(KUBERAY_SCHEMA).validate(by_kind(objects, "RayService")[0])
    broken = copy.deepcopy(by_kind(build()[2], "RayService")[0])
    broken["spec"]["rayClusterConfig"]["workerGroupSpecs"][0]["maxReplica"] = 3
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.Draft4Validator(KUBERAY_SCHEMA).validate(broken)


def test_every_object_is_owned_by_the_resource_and_named_after_it() -> None:
    _, _, objects = build()
    assert [(o["kind"], o["metadata"]["name"]) for o in objects] == [
        ("RayService", "chat"), ("Service", "chat-grpc"), ("Service", "chat-http"),
        ("PodDisruptionBudget", "chat-workers"), ("NetworkPolicy", "chat"), ("ServiceMonitor", "chat")]
    for obj in objects:
        assert obj["metadata"]["namespace"] == "serving"
        assert obj["metadata"]["ownerReferences"] == [{
            "apiVersion": "serving.gemma4.dev/v1alpha1", "kind": "Gemma4Service", "name": "chat",
            "uid": OWNER.uid, "controller": True, "blockOwnerDeletion": True}]
        assert obj["metadata"]["labels"]["app.kubernetes.io/instance"] == "chat"


# ---------------------------------------------------------------------------- the Ray cluster and Serve config


def test_worker_pods_request_exactly_the_planned_devices_and_memory() -> None:
    _, result, objects = build(model={"variant": "26b-a4b", "checkpoint": PVC}, accelerator={"type": "l4"},
                               autoscaling={"minReplicas": 2, "maxReplicas": 5})
    assert result.feasible and result.gpus_per_replica > 1
    cluster = by_kind(objects, "RayService")[0]["spec"]["rayClusterConfig"]
    (group,) = cluster["workerGroupSpecs"]
    assert (group["minReplicas"], group["maxReplicas"]) == (2, 5) and "replicas" not in group
    worker = group["template"]["spec"]
    limits = worker["containers"][0]["resources"]["limits"]
    assert limits["nvidia.com/gpu"] == str(result.gpus_per_replica)
    memory_gib = int(limits["memory"].removesuffix("Gi"))
    assert memory_gib * 2**30 >= result.host_memory_bytes + manifests.OBJECT_STORE_BYTES
    assert worker["nodeSelector"] == {"nvidia.com/gpu.product": "NVIDIA-L4"}
    assert worker["tolerations"] == [{"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"}]
    head = cluster["headGroupSpec"]
    assert head["rayStartParams"]["num-cpus"] == "0"
    head_container = head["template"]["spec"]["containers"][0]
    assert "nvidia.com/gpu" not in head_container["resources"]["limits"]
    assert {p["containerPort"] for p in head_container["ports"]} >= {8000, 9000, 8080}
    assert cluster["enableInTreeAutoscaling"] is True


@pytest.mark.parametrize("cloud,expected", [
    ("gke", {"cloud.google.com/gke-accelerator": "nvidia-h100-80gb"}),
    ("eks", {"karpenter.k8s.aws/instance-gpu-name": "h100"}),
    ("generic", {"nvidia.com/gpu.product": "NVIDIA-H100-80GB-HBM3"}),
])
def test_cloud_selects_the_node_labels(cloud: str, expected: dict[str, str]) -> None:
    worker = by_kind(build(cloud=cloud)[2], "RayService")[0]["spec"]["rayClusterConfig"]["workerGroupSpecs"][0]
    assert worker["template"]["spec"]["nodeSelector"] == expected


def test_amd_gets_the_rocm_image_and_its_device_resource() -> None:
    _, result, objects = build(accelerator={"type": "mi300x"})
    group = by_kind(objects, "RayService")[0]["spec"]["rayClusterConfig"]["workerGroupSpecs"][0]
    container = group["template"]["spec"]["containers"][0]
    assert container["image"] == f"{manifests.IMAGE_REPOSITORY}:{manifests.IMAGE_TAG}-rocm"
    assert container["resources"]["limits"]["amd.com/gpu"] == str(result.gpus_per_replica)
    # Ray counts AMD GPUs as "GPU" and torch's ROCm build calls them "cuda".
    assert group["rayStartParams"]["num-gpus"] == str(result.gpus_per_replica)
    assert serve_args(objects)["model"]["device"] == "cuda"
    assert build(image="registry.example/gemma:dev")[2][0]["spec"]["rayClusterConfig"]["headGroupSpec"][
        "template"]["spec"]["containers"][0]["image"] == "registry.example/gemma:dev"


def test_serve_config_is_the_platforms_shape_with_the_plans_engine_settings() -> None:
    from gemma4_platform.cli import serve_config

    _, result, objects = build(serving={"maxModelLen": 32768, "maxConcurrentSequences": 24},
                               autoscaling={"minReplicas": 1, "maxReplicas": 3, "targetOngoingRequests": 8},
                               gateway={**KEYS, "replicas": 2})
    ours = yaml.safe_load(by_kind(objects, "RayService")[0]["spec"]["serveConfigV2"])
    settings = args_settings(objects)
    assert ours == {**serve_config(settings), "applications": [{
        **serve_config(settings)["applications"][0], "args": ours["applications"][0]["args"]}]}
    assert settings.replica.num_gpus == result.gpus_per_replica == 1  # one GPU: the replica's actor holds it
    engine = serve_args(objects)["engine"]
    assert (engine["tensor_parallel_size"], engine["expert_parallel_size"]) == (1, 1)
    assert (engine["redundant_experts"], engine["expert_rebalance_interval"]) == (0, 0)
    assert settings.model.device == "cuda"
    assert settings.engine.kv_cache_memory_bytes == result.kv_cache_bytes_per_gpu
    assert (settings.engine.max_model_len, settings.engine.max_num_seqs) == (32768, 24)
    assert settings.engine.block_size == result.spec.block_size
    scaling = settings.replica.autoscaling
    assert (scaling.min_replicas, scaling.max_replicas, scaling.target_ongoing_requests) == (1, 3, 8)
    assert settings.gateway.num_replicas == 2
    assert settings.model.path == "/models/gemma-4-e4b-it" and settings.model.name == "gemma-4-e4b"


@pytest.mark.parametrize("gateway", [{}, TLS, {**TLS, "plaintextGrpc": True}])
def test_pods_carry_the_platforms_proxy_environment(gateway: dict[str, Any]) -> None:
    """What `proxy_environment` gives for the args, with the TLS port the operator configures outside them."""
    from gemma4_platform.proxy_setup import proxy_environment

    _, _, objects = build(gateway={**KEYS, **gateway})
    settings = args_settings(objects)
    if "tlsSecretName" in gateway:  # model_copy: the certificate files exist only in the pods
        settings = settings.model_copy(update={"server": settings.server.model_copy(update={
            "grpc_tls_port": 9443, "tls_cert_file": "/etc/gemma4/tls/tls.crt", "tls_key_file": "/etc/gemma4/tls/tls.key"})})
    expected = proxy_environment(settings)
    assert expected["GEMMA4_GRPC_HOST"] == ("127.0.0.1" if gateway == TLS else "0.0.0.0")
    for template in pod_templates(objects):
        env = template["spec"]["containers"][0]["env"]
        assert {e["name"]: e["value"] for e in env if "value" in e} == expected


@pytest.mark.parametrize("plaintext", [False, True])
def test_secrets_reach_every_ray_pod_and_tls_opens_the_grpc_tls_port(plaintext: bool) -> None:
    parsed, _, objects = build(gateway={**TLS, "plaintextGrpc": plaintext})
    cluster = by_kind(objects, "RayService")[0]["spec"]["rayClusterConfig"]
    for template in pod_templates(objects):
        pod = template["spec"]
        env = {e["name"]: e for e in pod["containers"][0]["env"]}
        assert env["GEMMA4_API_KEYS"]["valueFrom"] == {"secretKeyRef": {"name": "gemma-keys", "key": "api-keys"}}
        assert env["GEMMA4_GRPC_TLS_PORT"]["value"] == "9443"
        assert env["GEMMA4_TLS_CERT_FILE"]["value"] == "/etc/gemma4/tls/tls.crt"
        assert {"name": "tls", "secret": {"secretName": "gemma-tls"}} in pod["volumes"]
    # Plaintext gRPC on loopback only (the default with TLS): neither the Service nor the policy offers it.
    plain = [9000] if plaintext else []
    head_ports = {p["containerPort"] for p in cluster["headGroupSpec"]["template"]["spec"]["containers"][0]["ports"]}
    assert head_ports & {9000, 9443} == {*plain, 9443}
    grpc = next(s for s in by_kind(objects, "Service") if s["metadata"]["name"] == "chat-grpc")
    assert [p["port"] for p in grpc["spec"]["ports"]] == [*plain, 9443]
    assert grpc["spec"]["selector"] == {"app.kubernetes.io/name": "gemma4", "app.kubernetes.io/instance": "chat",
                                        "app.kubernetes.io/component": "head", "ray.io/serve": "true"}
    assert grpc["spec"]["selector"].items() - {"ray.io/serve": "true"}.items() <= \
        cluster["headGroupSpec"]["template"]["metadata"]["labels"].items()
    pdb = by_kind(objects, "PodDisruptionBudget")[0]["spec"]["selector"]["matchLabels"]
    assert pdb.items() <= cluster["workerGroupSpecs"][0]["template"]["metadata"]["labels"].items()
    assert not pdb.items() <= cluster["headGroupSpec"]["template"]["metadata"]["labels"].items()
    ingress = by_kind(objects, "NetworkPolicy")[0]["spec"]["ingress"]
    assert {p["port"] for p in ingress[1]["ports"]} == {8000, *plain, 9443}
    assert manifests.endpoints(OWNER, parsed) == {**({"grpc": "chat-grpc.serving.svc:9000"} if plaintext else {}),
                                                  "grpcTls": "chat-grpc.serving.svc:9443",
                                                  "http": "http://chat-http.serving.svc:8000"}


def test_without_tls_plaintext_grpc_is_open_to_the_cluster() -> None:
    parsed, _, objects = build()
    grpc = next(s for s in by_kind(objects, "Service") if s["metadata"]["name"] == "chat-grpc")
    assert [(p["name"], p["port"]) for p in grpc["spec"]["ports"]] == [("grpc", 9000)]
    assert {p["port"] for p in by_kind(objects, "NetworkPolicy")[0]["spec"]["ingress"][1]["ports"]} == {8000, 9000}
    assert manifests.endpoints(OWNER, parsed) == {"grpc": "chat-grpc.serving.svc:9000", "http": "http://chat-http.serving.svc:8000"}
    assert args_settings(objects).server.plaintext_grpc_host == "0.0.0.0"


@pytest.mark.parametrize("gateway,keys", [(KEYS, ["key-1"]), ({"allowUnauthenticated": True}, [])])
def test_the_platforms_gateway_accepts_what_the_operator_deploys(gateway: dict[str, Any], keys: list[str]) -> None:
    """The gateway refuses to serve anyone on the pods' addresses unless the args allow it (the operator
    refuses such a spec before that: `Unauthenticated`, see the kmock tests)."""
    from gemma4_platform.auth import ApiKeys
    from gemma4_platform.graph import check_exposure

    settings = args_settings(build(gateway=gateway)[2])
    assert settings.server.exposed and settings.gateway.allow_unauthenticated == (gateway != KEYS)
    check_exposure(settings, ApiKeys(keys))
    if not keys:
        with pytest.raises(ValueError, match="allow_unauthenticated: true"):
            check_exposure(settings.model_copy(update={"gateway": settings.gateway.model_copy(
                update={"allow_unauthenticated": False})}), ApiKeys([]))


def test_checkpoint_from_a_uri_is_downloaded_by_an_init_container() -> None:
    for uri, image in [("gs://bucket/gemma", "google-cloud-cli"), ("s3://bucket/gemma", "aws-cli"),
                       ("hf://google/gemma-4-E4B-it", "python")]:
        _, _, objects = build(model={"variant": "e4b", "checkpoint": {"uri": uri}})
        pod = by_kind(objects, "RayService")[0]["spec"]["rayClusterConfig"]["workerGroupSpecs"][0]["template"]["spec"]
        (init,) = pod["initContainers"]
        assert image in init["image"]
        assert {"name": "GEMMA4_CHECKPOINT_URI", "value": uri} in init["env"]
        assert {"name": "checkpoint", "emptyDir": {}} in pod["volumes"]
    custom = {"uri": "s3://b/m", "downloader": {"image": "mirror/s5cmd", "command": ["s5cmd", "sync"]},
              "credentialsSecretName": "s3-creds"}
    _, _, objects = build(model={"variant": "e4b", "checkpoint": custom})
    init = by_kind(objects, "RayService")[0]["spec"]["rayClusterConfig"]["headGroupSpec"]["template"]["spec"][
        "initContainers"][0]
    assert (init["image"], init["command"]) == ("mirror/s5cmd", ["s5cmd", "sync"])
    assert init["envFrom"] == [{"secretRef": {"name": "s3-creds"}}]
    pvc_pod = by_kind(build()[2], "RayService")[0]["spec"]["rayClusterConfig"]["headGroupSpec"]["template"]["spec"]
    assert "initContainers" not in pvc_pod
    assert {"name": "checkpoint", "persistentVolumeClaim": {"claimName": "models", "readOnly": True}} in pvc_pod["volumes"]


DRAFTER_URI = "hf://google/gemma-4-E4B-it-assistant"


def test_speculative_decoding_reaches_the_plan_the_engine_settings_and_the_pods() -> None:
    base = build()[1]
    parsed, result, objects = build(speculative={"method": "assistant", "assistant": {"uri": DRAFTER_URI},
                                                 "numTokens": 3})
    assert planner.serving_spec(parsed).speculative == "assistant" and result.spec.num_speculative_tokens == 3
    assert "drafter" in result.weights_per_gpu and result.kv_cache_bytes_per_gpu < base.kv_cache_bytes_per_gpu
    settings = args_settings(objects)
    assert (settings.engine.speculative.model, settings.engine.speculative.num_tokens) == (manifests.ASSISTANT_DIR, 3)
    assert settings.engine.kv_cache_memory_bytes == result.kv_cache_bytes_per_gpu
    for template in pod_templates(objects):
        pod = template["spec"]
        (drafter,) = [c for c in pod["initContainers"] if c["name"] == "download-assistant"]
        assert {"name": "GEMMA4_CHECKPOINT_URI", "value": DRAFTER_URI} in drafter["env"]
        assert {"name": "GEMMA4_CHECKPOINT_DIR", "value": manifests.ASSISTANT_DIR} in drafter["env"]
        assert {"name": "assistant", "emptyDir": {}} in pod["volumes"]
        assert {"name": "assistant", "mountPath": manifests.ASSISTANT_DIR, "readOnly": True} in pod[
            "containers"][0]["volumeMounts"]
        kubernetes_validate.validate({"apiVersion": "v1", "kind": "PodTemplate", "metadata": {"name": "t"},
                                      "template": template}, KUBE_VERSIONS[-1], strict=True)
    # A drafter on a PVC is mounted (no download); n-gram drafting needs no drafter and prices only its buffers.
    _, _, on_pvc = build(speculative={"method": "assistant", "assistant": {"pvc": {"claimName": "drafts",
                                                                                   "path": "e4b"}}})
    assert args_settings(on_pvc).engine.speculative.model == f"{manifests.ASSISTANT_DIR}/e4b"
    _, ngram, objects = build(speculative={"method": "ngram"})
    assert args_settings(objects).engine.speculative.model == "ngram" and "drafter" not in ngram.weights_per_gpu
    assert ngram.per_gpu.speculative > 0 and all("initContainers" not in t["spec"] for t in pod_templates(objects))
    assert args_settings(build()[2]).engine.speculative.model is None


def test_service_monitor_only_when_asked() -> None:
    parsed = Gemma4ServiceSpec.model_validate(sample())
    result = planner.plan_for(parsed)
    kinds = [o["kind"] for o in manifests.desired_objects(OWNER, parsed, result, with_service_monitor=False)]
    assert "ServiceMonitor" not in kinds
    monitor = manifests.service_monitor(OWNER, parsed)
    assert [e["port"] for e in monitor["spec"]["endpoints"]] == ["http", "metrics"]
    assert not any("authorization" in e for e in monitor["spec"]["endpoints"])
    jsonschema.Draft202012Validator(PROMETHEUS_OPERATOR_SCHEMAS["ServiceMonitor"]).validate(monitor)
    http = manifests.http_service(OWNER)
    assert monitor["spec"]["selector"]["matchLabels"].items() <= http["metadata"]["labels"].items()
    assert {e["port"] for e in monitor["spec"]["endpoints"]} <= {p["name"] for p in http["spec"]["ports"]}


def test_metrics_token_reaches_the_gateway_and_the_service_monitor() -> None:
    _, _, objects = build(monitoring={"metricsTokenSecretName": "scrape-token"})
    for template in pod_templates(objects):
        env = {e["name"]: e for e in template["spec"]["containers"][0]["env"]}
        assert env["GEMMA4_METRICS_TOKEN"]["valueFrom"] == {"secretKeyRef": {"name": "scrape-token", "key": "token"}}
    (monitor,) = by_kind(objects, "ServiceMonitor")
    jsonschema.Draft202012Validator(PROMETHEUS_OPERATOR_SCHEMAS["ServiceMonitor"]).validate(monitor)
    gateway, ray = monitor["spec"]["endpoints"]
    assert gateway["authorization"] == {"type": "Bearer", "credentials": {"name": "scrape-token", "key": "token"}}
    assert "authorization" not in ray  # Ray's own metrics port knows no token
    assert "GEMMA4_METRICS_TOKEN" not in {e["name"] for t in pod_templates(build()[2]) for e in t["spec"]["containers"][0]["env"]}


# ---------------------------------------------------------------------------- planning and status


def test_planner_passes_the_spec_to_the_memory_model() -> None:
    parsed = Gemma4ServiceSpec.model_validate(sample(
        model={"variant": "26b-a4b", "checkpoint": PVC, "dtype": "fp8", "kvDtype": "fp8"},
        accelerator={"type": "h100-80gb", "count": 2},
        parallelism={"mode": "explicit", "tensorParallel": 2, "expertParallel": 2},
        serving={"maxModelLen": 16384, "maxConcurrentSequences": 8}))
    assert planner.serving_spec(parsed) == ServingSpec(
        variant="26b-a4b", weight_dtype="fp8", kv_dtype="fp8", accelerator="h100-80gb", max_model_len=16384,
        max_num_seqs=8, gpus=2, tensor_parallel=2, expert_parallel=2, modalities="all")
    auto = planner.serving_spec(Gemma4ServiceSpec.model_validate(sample(parallelism={"tensorParallel": 4})))
    assert auto.tensor_parallel is None  # auto mode ignores the degrees


def test_modalities_default_to_all_the_variant_takes_and_reach_the_plan_and_the_settings() -> None:
    default, default_plan, objects = build()
    assert default.modalities == ["all"] and planner.serving_spec(default).modalities == "all"
    assert serve_args(objects)["model"]["modalities"] == ["text", "image", "video", "audio"]
    assert args_settings(objects).model.modalities == ("text", "image", "video", "audio")
    assert status.plan_summary(default_plan)["modalities"] == ["text", "image", "video", "audio"]
    assert default_plan.weights_per_gpu.keys() >= {"vision", "audio"} and default_plan.per_gpu.encoder_cache > 0

    parsed, text_plan, objects = build(modalities=["text"])
    assert planner.serving_spec(parsed).modalities == ("text",)
    assert serve_args(objects)["model"]["modalities"] == ["text"]
    assert not {"vision", "audio"} & text_plan.weights_per_gpu.keys() and text_plan.per_gpu.encoder_cache == 0
    # No towers and no encoder cache: more room for the KV cache, and the engine is told so.
    assert text_plan.kv_cache_bytes_per_gpu > default_plan.kv_cache_bytes_per_gpu
    assert serve_args(objects)["engine"]["kv_cache_memory_bytes"] == text_plan.kv_cache_bytes_per_gpu

    _, image_plan, objects = build(model={"variant": "31b", "checkpoint": PVC}, modalities=["image"],
                                   accelerator={"type": "h200-141gb"})
    assert serve_args(objects)["model"]["modalities"] == ["text", "image"]
    assert "vision" in image_plan.weights_per_gpu and "audio" not in image_plan.weights_per_gpu


def test_a_modality_the_variant_lacks_is_refused_before_planning() -> None:
    assert planner.unsupported_modalities(Gemma4ServiceSpec.model_validate(sample(modalities=["audio"]))) is None
    for variant in ("26b-a4b", "31b"):
        parsed = Gemma4ServiceSpec.model_validate(sample(model={"variant": variant, "checkpoint": PVC},
                                                         modalities=["text", "audio"]))
        assert planner.unsupported_modalities(parsed) == (
            f"spec.modalities: {variant} has no audio input (it takes text, image, video); leave audio out, or use "
            "a variant that takes it: e2b, e4b")
        assert planner.unsupported_modalities(parsed.model_copy(update={"modalities": ["all"]})) is None


def test_infeasible_plan_message_and_plan_summary_fit_the_status_schema() -> None:
    big = planner.plan_for(Gemma4ServiceSpec.model_validate(sample(
        model={"variant": "31b", "checkpoint": PVC}, accelerator={"type": "l4", "count": 1})))
    assert not big.feasible
    message = status.infeasible_message(big)
    assert message.startswith("31b with bf16 weights does not fit on 1 x l4") and "Suggestions: use " in message

    ok = plan(ServingSpec("e4b"))
    summary = status.plan_summary(ok)
    assert summary["gpusPerReplica"] == 1 and summary["kvBlocks"] == ok.kv_blocks
    assert summary["perGpuGiB"]["total"] == round(ok.per_gpu.total / 2**30, 2)
    stamped = status.merge_conditions([], [status.condition("Planned", "True", "Planned", "ok")], "2026-01-01T00:00:00Z")
    status_value = {"plan": summary, "replicas": "1-2", "observedGeneration": 3, "conditions": stamped,
                    "endpoints": manifests.endpoints(OWNER, Gemma4ServiceSpec.model_validate(sample()))}
    jsonschema.Draft4Validator(crd_schema()["properties"]["status"]).validate(status_value)


def test_conditions_keep_their_transition_time_until_the_status_changes() -> None:
    first = status.merge_conditions([], [status.condition("Ready", "False", "Deploying", "waiting")], "t1")
    same = status.merge_conditions(first, [status.condition("Ready", "False", "Deploying", "still waiting")], "t2")
    assert same[0]["lastTransitionTime"] == "t1" and same[0]["message"] == "still waiting"
    flipped = status.merge_conditions(same, [status.condition("Ready", "True", "Running", "up"),
                                             status.condition("Planned", "True", "Planned", "ok")], "t3")
    assert [(c["type"], c["lastTransitionTime"]) for c in flipped] == [("Planned", "t3"), ("Ready", "t3")]


@pytest.mark.parametrize("ray_service,expected", [
    (None, ("False", "Deploying")),
    ({"status": {}}, ("False", "Deploying")),
    ({"status": {"serviceStatus": "Running"}}, ("True", "Running")),
    ({"status": {"conditions": [{"type": "Ready", "status": "True", "reason": "NonZeroServeEndpoints"}]}},
     ("True", "NonZeroServeEndpoints")),
    ({"status": {"conditions": [{"type": "Ready", "status": "False", "reason": "ZeroServeEndpoints",
                                 "message": "no endpoints"}], "serviceStatus": "Running"}},
     ("False", "ZeroServeEndpoints")),
])
def test_ready_follows_kuberay(ray_service: dict[str, Any] | None, expected: tuple[str, str]) -> None:
    ready = status.ready_condition(ray_service)
    assert (ready["status"], ready["reason"]) == expected


def test_formats_the_engine_cannot_run_yet_are_refused_with_a_reason() -> None:
    from gemma4_operator.planner import unsupported_by_engine
    from gemma4_operator.spec import Gemma4ServiceSpec

    def spec(**model: str) -> Gemma4ServiceSpec:
        return Gemma4ServiceSpec.model_validate({"model": {"variant": "31b", "checkpoint": {"uri": "hf://x/y"}, **model}})

    assert unsupported_by_engine(spec(), planner.plan_for(spec())) is None
    lighter = spec(dtype="fp8", kvDtype="fp8")
    message = unsupported_by_engine(lighter, planner.plan_for(lighter))
    assert message is not None and "spec.model.dtype fp8 and spec.model.kvDtype fp8" in message
