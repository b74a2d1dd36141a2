"""kopf handlers: reconcile a Gemma4Service into its owned objects, and mirror its readiness.

Reconciliation (on create, on spec update, and on resume after an operator restart) is idempotent:
parse the spec, plan it with the memory model, and if it fits apply the owned objects; objects whose
applied hash already matches are not written, so a restart sends no updates.

An infeasible or invalid spec creates nothing and sets `Planned=False` with the planner's reason
and suggestions; so does one asking for a modality its variant has no tower for (`UnsupportedModality`:
audio on 26B-A4B or 31B), one this release's engine cannot run as planned (`Unsupported`: lighter
formats, or more devices per replica than the engine spans there, e.g. multi-chip TPU replicas,
with changes that fit what it runs), and one without API keys that does not opt into serving anyone
(`Unauthenticated`: the platform's gateway would refuse to start on the pods' addresses anyway).
If an earlier spec was deployed, its objects are left as they are: the service keeps serving the
last feasible spec (`Deployed` and `Ready` stay as they were) until the spec fits again. Deleting
the resource deletes the objects through their owner references; there is no finalizer to wait for.

Readiness comes from KubeRay's status of the owned RayService: reconciliation reads it, and an
event handler on RayServices updates the owner's `Ready` condition whenever KubeRay changes it.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Any

import kopf
from kubernetes.client.exceptions import ApiException
from pydantic import ValidationError

from gemma4.memory import Plan

from gemma4_operator import manifests, planner, status
from gemma4_operator.crd import API_VERSION, GROUP, KIND, PLURAL, VERSION
from gemma4_operator.kube import Kube, object_path
from gemma4_operator.manifests import Owner
from gemma4_operator.spec import Gemma4ServiceSpec

SERVICE_MONITOR_CRD = "servicemonitors.monitoring.coreos.com"
RETRY_DELAY_S = 10
_MANAGED = {"app.kubernetes.io/managed-by": manifests.MANAGER}


@kopf.on.startup()
def startup(settings: kopf.OperatorSettings, memo: kopf.Memo, **_: Any) -> None:
    settings.posting.level = logging.WARNING  # Kubernetes events for problems only
    memo.kube = Kube.from_environment()


def _write_status(patch: kopf.Patch, current: dict[str, Any], updates: dict[str, Any]) -> None:
    """Put into the patch only the status fields that change."""
    for key, value in updates.items():
        if current.get(key) != value:
            patch.status[key] = value


def _problem(exc: ValueError) -> str:
    if isinstance(exc, ValidationError):  # one line per field, named as in the resource
        return "; ".join(f"spec.{'.'.join(str(p) for p in e['loc'])}: {e['msg']}" for e in exc.errors())
    return str(exc)


@dataclass(frozen=True)
class _Planning:
    """The Planned condition and, when it is True, the spec, plan and objects to apply."""

    planned: dict[str, str]
    spec: Gemma4ServiceSpec | None = None
    plan: Plan | None = None
    objects: list[dict[str, Any]] = field(default_factory=list)


def _plan(spec: kopf.Spec, owner: Owner, kube: Kube) -> _Planning:
    try:
        parsed = Gemma4ServiceSpec.model_validate(dict(spec))
        if not (parsed.gateway.api_key_secret_name or parsed.gateway.allow_unauthenticated):
            return _Planning(status.condition(status.PLANNED, "False", "Unauthenticated", status.UNAUTHENTICATED_MESSAGE))
        modality_problem = planner.unsupported_modalities(parsed)
        if modality_problem is not None:
            return _Planning(status.condition(status.PLANNED, "False", "UnsupportedModality", modality_problem))
        plan = planner.plan_for(parsed)
        if not plan.feasible:
            return _Planning(status.condition(status.PLANNED, "False", "Infeasible", status.infeasible_message(plan)))
        unsupported = planner.unsupported_by_engine(parsed, plan)
        if unsupported is not None:
            return _Planning(status.condition(status.PLANNED, "False", "Unsupported", unsupported))
        monitor = kube.crd_exists(SERVICE_MONITOR_CRD)
        objects = manifests.desired_objects(owner, parsed, plan, with_service_monitor=monitor)
    except ValueError as exc:  # pydantic's ValidationError, and layouts the memory model rejects
        return _Planning(status.condition(status.PLANNED, "False", "InvalidSpec", _problem(exc)))
    return _Planning(status.condition(status.PLANNED, "True", "Planned", status.planned_message(plan)),
                     parsed, plan, objects)


@kopf.on.resume(GROUP, VERSION, PLURAL)
@kopf.on.create(GROUP, VERSION, PLURAL)
@kopf.on.update(GROUP, VERSION, PLURAL, field="spec")
def reconcile(body: kopf.Body, spec: kopf.Spec, meta: kopf.Meta, patch: kopf.Patch, memo: kopf.Memo,
              logger: kopf.Logger, **_: Any) -> None:
    kube: Kube = memo.kube
    owner = Owner(name=meta["name"], namespace=meta["namespace"], uid=meta["uid"])
    current = dict(body.status)
    conditions = current.get("conditions", [])
    timestamp = status.now()
    updates: dict[str, Any] = {"observedGeneration": meta["generation"]} if meta.get("generation") else {}

    planning = _plan(spec, owner, kube)
    planned = planning.planned
    if planning.spec is None or planning.plan is None:
        deployed = status.find(conditions, status.DEPLOYED)
        if deployed is not None and deployed["status"] == "True":
            planned["message"] += " The last feasible spec keeps serving."
        logger.warning("not deploying %s: %s", owner.name, planned["message"])
        _write_status(patch, current, {**updates, "conditions": status.merge_conditions(conditions, [planned], timestamp)})
        return

    try:
        for obj in planning.objects:
            outcome = kube.apply(obj)
            if outcome != "unchanged":
                logger.info("%s %s/%s", outcome, obj["kind"], obj["metadata"]["name"])
        ray_service = kube.get(object_path("ray.io/v1", "RayService", owner.namespace, owner.name))
    except ApiException as exc:
        failed = status.condition(status.DEPLOYED, "False", "ApplyFailed", f"{exc.status} {exc.reason}: {exc.body}"[:500])
        _write_status(patch, current, {"conditions": status.merge_conditions(conditions, [planned, failed], timestamp)})
        raise kopf.TemporaryError(f"applying the owned objects failed: {exc.status} {exc.reason}",
                                  delay=RETRY_DELAY_S) from exc

    applied = ", ".join(obj["kind"] for obj in planning.objects)
    deployed = status.condition(status.DEPLOYED, "True", "Applied", f"applied {applied}")
    scaling = planning.spec.autoscaling
    _write_status(patch, current, {
        **updates,
        "plan": status.plan_summary(planning.plan),
        "endpoints": manifests.endpoints(owner, planning.spec),
        "replicas": f"{scaling.min_replicas}-{scaling.max_replicas}",
        "conditions": status.merge_conditions(conditions, [planned, deployed, status.ready_condition(ray_service)],
                                              timestamp),
    })


@kopf.on.event("ray.io", "v1", "rayservices", labels=_MANAGED)
def mirror_ready(body: kopf.Body, event: kopf.RawEvent, memo: kopf.Memo, logger: kopf.Logger, **_: Any) -> None:
    """Copy KubeRay's readiness of an owned RayService to its Gemma4Service's `Ready` condition."""
    if event.get("type") == "DELETED":
        return
    owner = next((ref for ref in body.metadata.get("ownerReferences", [])
                  if ref.get("apiVersion") == API_VERSION and ref.get("kind") == KIND), None)
    if owner is None:
        return
    kube: Kube = memo.kube
    path = object_path(API_VERSION, KIND, body.metadata["namespace"], owner["name"])
    ready = status.ready_condition(dict(body))
    for _attempt in range(3):
        service = kube.get(path)
        if service is None:
            return
        conditions = service.get("status", {}).get("conditions", [])
        merged = status.merge_conditions(conditions, [ready], status.now())
        if merged == conditions:
            return
        try:
            kube.patch_status(path, {"conditions": merged}, resource_version=service["metadata"].get("resourceVersion"))
            logger.info("%s is Ready=%s (%s)", owner["name"], ready["status"], ready["reason"])
            return
        except ApiException as exc:
            if exc.status != 409:  # 409: the resource changed since it was read; read it again
                raise
