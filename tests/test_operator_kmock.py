"""The operator end to end: kopf runs for real against kmock's in-memory Kubernetes API.

kmock (an emulator by kopf's author) stores objects, serves list/watch/get/create/patch/delete and
discovery; it has no admission, no defaulting, no garbage collector and no server-side apply (a
PATCH merges like a JSON merge patch and 404s for a missing object, which the operator's create
fallback covers), and it keeps no object metadata. `ApiServer` below adds the metadata an API
server maintains (uid, resourceVersion, generation), which kopf and the operator rely on. Where a
real cluster would garbage-collect, the tests check owner references. Every wait is a bounded poll
for something that must happen; a check that something did not happen is made only once an event
that comes after it (in kopf's processing order) has been seen, never after a pause. The emulator
listens on 127.0.0.1.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import json
import time
import uuid
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import kubernetes.config.kube_config
import pytest
import pytest_asyncio
import yaml
from kmock import KubernetesEmulator, Request, ResourceInfo, action
from kopf.testing import KopfRunner

from gemma4.memory import ServingSpec, plan
from gemma4_operator.crd import API_VERSION, KIND, PLURAL
from gemma4_operator.handlers import SERVICE_MONITOR_CRD

NS = "serving"
GEMMA = f"{API_VERSION}/{PLURAL}"
RAY = "ray.io/v1/rayservices"
SERVICES = "v1/services"
PDBS = "policy/v1/poddisruptionbudgets"
NETPOLS = "networking.k8s.io/v1/networkpolicies"
MONITORS = "monitoring.coreos.com/v1/servicemonitors"
VERBS = {"get", "list", "watch", "create", "patch", "update", "delete"}
DEADLINE_S = 20
SENTINEL = "test.gemma4.dev/sentinel"
LAST_HANDLED = "kopf.zalando.org/last-handled-configuration"  # kopf's record of the essence it handled


_resource_versions = itertools.count(1)


class ApiServer(KubernetesEmulator):
    """kmock plus the metadata an API server keeps: a uid on create, a new resourceVersion on every
    write, and a generation that starts at 1 and grows when a write touches the spec."""

    async def _handle(self, request: Request) -> Any:
        writes = request.action in (action.CREATE, action.UPDATE)
        if request.resource is not None and writes and isinstance(request.data, dict):
            meta = request.data.setdefault("metadata", {})
            meta["resourceVersion"] = str(next(_resource_versions))
            if request.action == action.CREATE:
                meta.update(uid=str(uuid.uuid4()), generation=1)
            elif "spec" in request.data and request.subresource is None:
                with contextlib.suppress(KeyError, ValueError):  # absent: kmock answers 404 itself
                    stored = self.objects[request.resource, request.namespace, request.name].raw
                    meta["generation"] = stored["metadata"].get("generation", 0) + 1
        return await super()._handle(request)


pytestmark = [pytest.mark.asyncio, pytest.mark.kmock(cls=ApiServer)]


def gemma4_service(name: str, **spec: Any) -> dict[str, Any]:
    body = {"model": {"variant": "e4b", "checkpoint": {"pvc": {"claimName": "models", "path": "gemma-4-e4b-it"}}},
            "accelerator": {"type": "h100-80gb"}, "autoscaling": {"minReplicas": 1, "maxReplicas": 2},
            "gateway": {"apiKeySecretName": f"{name}-keys"}}
    body.update(spec)
    return {"apiVersion": API_VERSION, "kind": KIND, "metadata": {"name": name, "namespace": NS}, "spec": body}


@pytest_asyncio.fixture
async def cluster(kmock: KubernetesEmulator, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> KubernetesEmulator:
    """The emulator with our CRD's resource, KubeRay's and the built-ins declared, and a kubeconfig."""
    for resource, kind, subresources in [
        (GEMMA, KIND, {"status"}), (RAY, "RayService", {"status"}), (SERVICES, "Service", set()),
        (PDBS, "PodDisruptionBudget", set()), (NETPOLS, "NetworkPolicy", set()),
        (MONITORS, "ServiceMonitor", set()), ("v1/namespaces", "Namespace", set()), ("v1/events", "Event", set()),
        ("apiextensions.k8s.io/v1/customresourcedefinitions", "CustomResourceDefinition", set()),
    ]:
        kmock.resources[resource] = ResourceInfo(kind=kind, namespaced=resource != "v1/namespaces",
                                                 verbs=VERBS, subresources=subresources)
    kmock.objects["v1/namespaces", None, NS] = {"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": NS}}
    kubeconfig = tmp_path / "kubeconfig"
    kubeconfig.write_text(yaml.safe_dump({
        "apiVersion": "v1", "kind": "Config", "current-context": "kmock",
        "clusters": [{"name": "kmock", "cluster": {"server": str(kmock.url).rstrip("/")}}],
        "users": [{"name": "kmock", "user": {"token": "kmock"}}],
        "contexts": [{"name": "kmock", "context": {"cluster": "kmock", "user": "kmock", "namespace": NS}}],
    }))
    # The client reads $KUBECONFIG into this default once, at import; kopf's login and ours use it.
    monkeypatch.setattr(kubernetes.config.kube_config, "KUBE_CONFIG_DEFAULT_LOCATION", str(kubeconfig))
    monkeypatch.delenv("KUBERNETES_SERVICE_HOST", raising=False)
    return kmock


@contextlib.asynccontextmanager
async def operator() -> AsyncIterator[KopfRunner]:
    """kopf in its own thread and loop; stopping joins that thread without blocking the emulator's loop."""
    runner = KopfRunner(["run", "--all-namespaces", "--standalone", "-m", "gemma4_operator.handlers"], timeout=DEADLINE_S)
    runner.__enter__()
    try:
        yield runner
    finally:
        await asyncio.to_thread(runner.__exit__, None, None, None)


async def eventually(check: Callable[[], Any], timeout: float = DEADLINE_S) -> Any:
    """Poll `check` until it returns without an AssertionError (its value), or fail at the deadline."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            return check()
        except (AssertionError, KeyError, ValueError):
            if time.monotonic() > deadline:
                raise
        await asyncio.sleep(0.1)


async def create(cluster: KubernetesEmulator, body: dict[str, Any]) -> None:
    async with cluster.post(f"/apis/{API_VERSION}/namespaces/{NS}/{PLURAL}", json=body) as response:
        assert response.status in (200, 201), await response.text()


async def patch(cluster: KubernetesEmulator, path: str, body: dict[str, Any]) -> None:
    async with cluster.patch(path, json=body, headers={"Content-Type": "application/merge-patch+json"}) as response:
        assert response.status == 200, await response.text()


def live(cluster: KubernetesEmulator, resource: str, name: str) -> dict[str, Any]:
    """An object's current state (KeyError while absent or deleted)."""
    obj = cluster.objects[resource, NS, name]
    if obj.deleted:
        raise KeyError(name)
    return obj.raw


def condition(cluster: KubernetesEmulator, name: str, type_: str) -> dict[str, Any]:
    conditions = live(cluster, GEMMA, name).get("status", {}).get("conditions", [])
    found = [c for c in conditions if c["type"] == type_]
    assert found, f"no {type_} condition yet: {conditions}"
    return found[0]


def owned(cluster: KubernetesEmulator, name: str) -> dict[tuple[str, str], dict[str, Any]]:
    """Every live object whose controller is the Gemma4Service `name`, by (resource, name)."""
    out = {}
    for (resource, namespace, obj_name), obj in cluster.objects.items():
        if obj.deleted or namespace != NS:
            continue
        refs = obj.raw.get("metadata", {}).get("ownerReferences", [])
        if any(ref["kind"] == KIND and ref["name"] == name for ref in refs):
            out[f"{resource.group}/{resource.version}/{resource.plural}".lstrip("/"), obj_name] = obj.raw
    return out


def versions(cluster: KubernetesEmulator, keys: list[tuple[str, str]]) -> dict[tuple[str, str], int]:
    return {key: len(cluster.objects[key[0], NS, key[1]].history) for key in keys}


def serve_args(ray_service: dict[str, Any]) -> dict[str, Any]:
    return yaml.safe_load(ray_service["spec"]["serveConfigV2"])["applications"][0]["args"]


def handled_annotations(cluster: KubernetesEmulator, name: str) -> dict[str, str]:
    """The annotations of the Gemma4Service as kopf last recorded them, once it finished handling a change."""
    return json.loads(live(cluster, GEMMA, name)["metadata"]["annotations"][LAST_HANDLED])["metadata"]["annotations"]


async def test_lifecycle_create_update_restart_ready_delete(cluster: KubernetesEmulator) -> None:
    cluster.objects["apiextensions.k8s.io/v1/customresourcedefinitions", None, SERVICE_MONITOR_CRD] = {
        "apiVersion": "apiextensions.k8s.io/v1", "kind": "CustomResourceDefinition",
        "metadata": {"name": SERVICE_MONITOR_CRD},
        "spec": {"group": "monitoring.coreos.com", "scope": "Namespaced",
                 "names": {"kind": "ServiceMonitor", "plural": "servicemonitors"},
                 "versions": [{"name": "v1", "served": True, "storage": True}]}}
    expected = plan(ServingSpec("e4b", accelerator="h100-80gb", modalities="all"))  # the CRD's default: [all]
    name = "chat"
    async with operator():
        await create(cluster, gemma4_service(name))

        # Planned, applied, and the objects sized by the plan.
        planned = await eventually(lambda: condition(cluster, name, "Deployed") and condition(cluster, name, "Planned"))
        assert planned["status"] == "True" and planned["reason"] == "Planned"
        keys = sorted(owned(cluster, name))
        assert keys == sorted([(RAY, name), (SERVICES, f"{name}-grpc"), (SERVICES, f"{name}-http"),
                               (PDBS, f"{name}-workers"), (NETPOLS, name), (MONITORS, name)])
        ray_service = live(cluster, RAY, name)
        worker = ray_service["spec"]["rayClusterConfig"]["workerGroupSpecs"][0]
        assert worker["template"]["spec"]["containers"][0]["resources"]["limits"]["nvidia.com/gpu"] == \
            str(expected.gpus_per_replica)
        assert (worker["minReplicas"], worker["maxReplicas"]) == (1, 2)
        args = serve_args(ray_service)
        assert args["replica"]["num_gpus"] == expected.gpus_per_replica == 1  # one GPU: the replica's actor holds it
        assert args["engine"]["tensor_parallel_size"] == expected.tensor_parallel
        assert args["engine"]["kv_cache_memory_bytes"] == expected.kv_cache_bytes_per_gpu
        assert args["model"]["path"] == "/models/gemma-4-e4b-it"
        assert args["model"]["modalities"] == ["text", "image", "video", "audio"]
        status = live(cluster, GEMMA, name)["status"]
        assert status["plan"]["gpusPerReplica"] == expected.gpus_per_replica
        assert status["plan"]["kvBlocks"] == expected.kv_blocks
        assert status["endpoints"]["grpc"] == f"{name}-grpc.{NS}.svc:9000"
        assert status["replicas"] == "1-2" and status["observedGeneration"] == 1
        assert condition(cluster, name, "Ready")["status"] == "False"

        # KubeRay reports the RayService ready: the Ready condition follows.
        await patch(cluster, f"/apis/ray.io/v1/namespaces/{NS}/rayservices/{name}/status", {"status": {
            "conditions": [{"type": "Ready", "status": "True", "reason": "NonZeroServeEndpoints", "message": "1 endpoint"}]}})

        def ready() -> dict[str, Any]:
            found = condition(cluster, name, "Ready")
            assert found["status"] == "True", found
            return found

        assert (await eventually(ready))["reason"] == "NonZeroServeEndpoints"

        # A spec update reaches the RayService and the Serve config, and only them.
        before_update = versions(cluster, keys)
        await patch(cluster, f"/apis/{API_VERSION}/namespaces/{NS}/{PLURAL}/{name}",
                    {"spec": {"autoscaling": {"maxReplicas": 4}}})

        def scaled() -> dict[str, Any]:
            rs = live(cluster, RAY, name)
            assert rs["spec"]["rayClusterConfig"]["workerGroupSpecs"][0]["maxReplicas"] == 4
            assert live(cluster, GEMMA, name)["status"]["observedGeneration"] == 2
            return rs

        assert serve_args(await eventually(scaled))["replica"]["autoscaling"]["max_replicas"] == 4
        assert live(cluster, GEMMA, name)["status"]["replicas"] == "1-4"
        changed = {key for key, count in versions(cluster, keys).items() if count != before_update[key]}
        assert changed == {(RAY, name)}

    # A restart on the same state: the resume handler runs, finds everything in place and writes
    # nothing, neither to the owned objects nor to the resource; nor does the readiness mirror.
    before = versions(cluster, [*keys, (GEMMA, name)])
    ray_reads = cluster[f"get /apis/ray.io/v1/namespaces/{NS}/rayservices/{name}"]
    reads_before = len(ray_reads)

    def resumed() -> None:  # reconcile reads the RayService twice: to apply it and for readiness
        assert len(ray_reads) >= reads_before + 2

    def recorded() -> None:
        assert handled_annotations(cluster, name).get(SENTINEL) == "1"

    def mirrored() -> None:
        assert condition(cluster, name, "Ready")["reason"] == "Sentinel"

    async with operator():
        await eventually(resumed)
        # Any stray write must have landed before these two sentinels are seen. kopf handles the
        # events of one object one at a time, each to the end (its own patch included), and:
        # - the resource: reconcile wrote its objects before its second RayService read; what kopf
        #   patches after the handler returns comes before it handles the next event. Our annotation
        #   is that next event: kopf has handlers for spec changes only, so it just records the new
        #   annotations in its last-handled configuration, a write we wait for.
        # - the RayService: the readiness mirror handles every event of it. A Ready reason we set is
        #   copied to the resource only after the mirror's earlier events, the listing's included.
        await patch(cluster, f"/apis/{API_VERSION}/namespaces/{NS}/{PLURAL}/{name}",
                    {"metadata": {"annotations": {SENTINEL: "1"}}})
        await patch(cluster, f"/apis/ray.io/v1/namespaces/{NS}/rayservices/{name}/status", {"status": {
            "conditions": [{"type": "Ready", "status": "True", "reason": "Sentinel", "message": "1 endpoint"}]}})
        await eventually(recorded)
        await eventually(mirrored)
    assert sorted(owned(cluster, name)) == keys
    # The sentinels' own writes and nothing else: the RayService's status (ours); the resource's
    # annotation (ours), kopf's record of it, and the mirrored Ready condition.
    written = {(RAY, name): 1, (GEMMA, name): 3}
    assert versions(cluster, [*keys, (GEMMA, name)]) == {key: count + written.get(key, 0) for key, count in before.items()}

    # Delete: no finalizer holds it. kmock has no garbage collector, so check that every owned
    # object names the resource as its controller (a real cluster deletes them through that).
    uid = live(cluster, GEMMA, name)["metadata"]["uid"]
    assert "finalizers" not in live(cluster, GEMMA, name)["metadata"]
    async with cluster.delete(f"/apis/{API_VERSION}/namespaces/{NS}/{PLURAL}/{name}") as response:
        assert response.status == 200
    assert cluster.objects[GEMMA, NS, name].deleted
    for obj in owned(cluster, name).values():
        (ref,) = obj["metadata"]["ownerReferences"]
        assert ref == {"apiVersion": API_VERSION, "kind": KIND, "name": name, "uid": uid,
                       "controller": True, "blockOwnerDeletion": True}


async def test_infeasible_spec_creates_nothing(cluster: KubernetesEmulator) -> None:
    name = "too-big"
    spec = {"model": {"variant": "31b", "dtype": "bf16", "checkpoint": {"uri": "gs://bucket/gemma-4-31b-it"}},
            "accelerator": {"type": "l4", "count": 1}}
    async with operator():
        await create(cluster, gemma4_service(name, **spec))
        planned = await eventually(lambda: condition(cluster, name, "Planned"))
        # An invalid spec (an API server's CEL rule would refuse it; kmock admits anything).
        await create(cluster, gemma4_service("upside-down", autoscaling={"minReplicas": 3, "maxReplicas": 1}))
        invalid = await eventually(lambda: condition(cluster, "upside-down", "Planned"))
        # A layout the memory model fits but the engine cannot run: E4B over 4 TPU chips (no XLA collectives).
        await create(cluster, gemma4_service("tpu-slice", accelerator={"type": "tpu-v5e"}))
        unsupported = await eventually(lambda: condition(cluster, "tpu-slice", "Planned"))
        # A modality the variant has no tower for: 31B takes no audio.
        model_31b = {**gemma4_service("x")["spec"]["model"], "variant": "31b"}
        await create(cluster, gemma4_service("no-ears", model=model_31b, modalities=["text", "audio"]))
        deaf = await eventually(lambda: condition(cluster, "no-ears", "Planned"))
        # A feasible neighbour in the same run: it gets its objects, and no ServiceMonitor without the CRD.
        await create(cluster, gemma4_service("fits"))
        await eventually(lambda: condition(cluster, "fits", "Deployed"))
    assert (unsupported["status"], unsupported["reason"]) == ("False", "Unsupported")
    assert "runs at most 1 x tpu-v5e per replica" in unsupported["message"]
    assert "use spec.accelerator.type tpu-v6e (fits on 1 x tpu-v6e)" in unsupported["message"]
    assert owned(cluster, "tpu-slice") == {}
    assert (deaf["status"], deaf["reason"]) == ("False", "UnsupportedModality")
    assert deaf["message"].startswith("spec.modalities: 31b has no audio input (it takes text, image, video)")
    assert owned(cluster, "no-ears") == {}
    assert (invalid["status"], invalid["reason"]) == ("False", "InvalidSpec")
    assert invalid["message"] == "spec.autoscaling: Value error, minReplicas must not exceed maxReplicas"
    assert owned(cluster, "upside-down") == {}
    assert planned["status"] == "False" and planned["reason"] == "Infeasible"
    assert "31b with bf16 weights does not fit on 1 x l4" in planned["message"]
    assert "Suggestions:" in planned["message"]
    assert owned(cluster, name) == {}
    assert [c["type"] for c in live(cluster, GEMMA, name)["status"]["conditions"]] == ["Planned"]
    assert (MONITORS, "fits") not in owned(cluster, "fits") and (RAY, "fits") in owned(cluster, "fits")


async def test_infeasible_update_keeps_the_last_good_deployment(cluster: KubernetesEmulator) -> None:
    name = "shrink"
    async with operator():
        await create(cluster, gemma4_service(name))
        await eventually(lambda: condition(cluster, name, "Deployed"))
        keys = sorted(owned(cluster, name))
        before = versions(cluster, keys)
        await patch(cluster, f"/apis/{API_VERSION}/namespaces/{NS}/{PLURAL}/{name}", {
            "spec": {"model": {"variant": "31b"}, "accelerator": {"type": "l4", "count": 1}}})

        def refused() -> dict[str, Any]:
            planned = condition(cluster, name, "Planned")
            assert planned["status"] == "False", planned
            return planned

        planned = await eventually(refused)
    assert planned["message"].endswith("The last feasible spec keeps serving.")
    assert versions(cluster, keys) == before
    assert condition(cluster, name, "Deployed")["status"] == "True"


async def test_a_service_without_api_keys_is_refused_unless_it_allows_anyone(cluster: KubernetesEmulator) -> None:
    async with operator():
        await create(cluster, gemma4_service("open", gateway={}))
        await create(cluster, gemma4_service("anyone", gateway={"allowUnauthenticated": True}))
        refused = await eventually(lambda: condition(cluster, "open", "Planned"))
        await eventually(lambda: condition(cluster, "anyone", "Deployed"))
    # kopf writes the condition after the handler returned, and the handler applies objects before
    # returning: once the condition is there, nothing more can come from that handling.
    assert (refused["status"], refused["reason"]) == ("False", "Unauthenticated")
    assert "spec.gateway.apiKeySecretName" in refused["message"]
    assert "spec.gateway.allowUnauthenticated: true" in refused["message"]
    assert owned(cluster, "open") == {}
    assert [c["type"] for c in live(cluster, GEMMA, "open")["status"]["conditions"]] == ["Planned"]
    assert serve_args(live(cluster, RAY, "anyone"))["gateway"]["allow_unauthenticated"] is True
