"""A small Kubernetes REST client: read, apply and status-patch objects given as plain dicts.

It rides on the official client's `ApiClient` (kubeconfig or in-cluster config, auth, TLS) but
addresses objects by apiVersion, kind and name, because the operator manages built-in kinds and
custom resources (KubeRay's RayService, Prometheus' ServiceMonitor) alike, from the dicts the pure
builders return. Calls are synchronous; kopf runs sync handlers in its thread pool.

Writes are server-side apply with one field manager, so a field dropped from the desired object is
removed from the live one. Each applied object carries a hash of what was applied; an object whose
hash already matches is left alone, so a restart or a resync sends no writes at all.
"""

from __future__ import annotations

import copy
import hashlib
import json
from typing import Any

from kubernetes import client, config
from kubernetes.client.exceptions import ApiException

from gemma4_operator.crd import GROUP, KIND, PLURAL
from gemma4_operator.manifests import MANAGER

HASH_ANNOTATION = f"{GROUP}/applied-hash"
PLURALS = {
    "Service": "services",
    "PodDisruptionBudget": "poddisruptionbudgets",
    "NetworkPolicy": "networkpolicies",
    "RayService": "rayservices",
    "ServiceMonitor": "servicemonitors",
    KIND: PLURAL,
}


def object_path(api_version: str, kind: str, namespace: str, name: str | None = None) -> str:
    """The REST path of a namespaced object (or of its collection when `name` is None)."""
    prefix = "/api/v1" if api_version == "v1" else f"/apis/{api_version}"
    path = f"{prefix}/namespaces/{namespace}/{PLURALS[kind]}"
    return f"{path}/{name}" if name else path


def applied_hash(manifest: dict[str, Any]) -> str:
    return hashlib.sha256(json.dumps(manifest, sort_keys=True).encode()).hexdigest()[:20]


class Kube:
    def __init__(self, api: client.ApiClient) -> None:
        self.api = api

    @classmethod
    def from_environment(cls) -> Kube:
        """In-cluster credentials when running in a pod, else the kubeconfig ($KUBECONFIG)."""
        configuration = client.Configuration()
        try:
            config.load_incluster_config(client_configuration=configuration)
        except config.ConfigException:
            config.load_kube_config(client_configuration=configuration)
        return cls(client.ApiClient(configuration))

    def request(self, method: str, path: str, body: Any = None, *, query: dict[str, str] | None = None,
                content_type: str = "application/json") -> dict[str, Any]:
        """One API call; raises `ApiException` on an error status."""
        headers = {"Accept": "application/json", "Content-Type": content_type}
        method, url, headers, body, _ = self.api.param_serialize(
            method, path, query_params=query, header_params=headers, body=body,
            auth_settings=["BearerToken"],
        )
        response = self.api.call_api(method, url, header_params=headers, body=body)
        response.read()
        if not 200 <= response.status <= 299:
            raise ApiException(http_resp=response)
        return json.loads(response.data) if response.data else {}

    def get(self, path: str) -> dict[str, Any] | None:
        try:
            return self.request("GET", path)
        except ApiException as exc:
            if exc.status == 404:
                return None
            raise

    def apply(self, manifest: dict[str, Any]) -> str:
        """Create or update `manifest`; returns 'created', 'updated' or 'unchanged'."""
        meta = manifest["metadata"]
        path = object_path(manifest["apiVersion"], manifest["kind"], meta["namespace"], meta["name"])
        digest = applied_hash(manifest)
        current = self.get(path)
        if current is not None and current["metadata"].get("annotations", {}).get(HASH_ANNOTATION) == digest:
            return "unchanged"
        body = copy.deepcopy(manifest)
        body["metadata"].setdefault("annotations", {})[HASH_ANNOTATION] = digest
        try:
            self.request("PATCH", path, body, query={"fieldManager": MANAGER, "force": "true"},
                         content_type="application/apply-patch+yaml")
        except ApiException as exc:
            # A real API server creates on apply; an emulator without upsert answers 404 instead.
            if exc.status != 404 or current is not None:
                raise
            collection = object_path(manifest["apiVersion"], manifest["kind"], meta["namespace"])
            self.request("POST", collection, body, query={"fieldManager": MANAGER})
        return "created" if current is None else "updated"

    def patch_status(self, path: str, status: dict[str, Any], *, resource_version: str | None = None) -> None:
        """Merge-patch an object's status; with `resource_version`, only if the object is still at it (else 409)."""
        body: dict[str, Any] = {"status": status}
        if resource_version:
            body["metadata"] = {"resourceVersion": resource_version}
        self.request("PATCH", f"{path}/status", body, content_type="application/merge-patch+json")

    def crd_exists(self, name: str) -> bool:
        return self.get(f"/apis/apiextensions.k8s.io/v1/customresourcedefinitions/{name}") is not None
