"""What a Gemma4Service reports: conditions, the plan it was sized with, and readiness.

Three conditions: `Planned` (the memory model found a layout), `Deployed` (the owned objects are
applied) and `Ready` (KubeRay reports the RayService serving). A condition's lastTransitionTime
changes only when its status does, so re-reconciling an unchanged resource writes nothing.
"""

from __future__ import annotations

import datetime
from collections.abc import Iterable
from typing import Any

from gemma4.accelerators import GiB
from gemma4.memory import Plan

from gemma4_operator.planner import modalities_of

PLANNED, DEPLOYED, READY = "Planned", "Deployed", "Ready"
_ORDER = (PLANNED, DEPLOYED, READY)


def now() -> str:
    return datetime.datetime.now(tz=datetime.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def condition(type_: str, status: str, reason: str, message: str) -> dict[str, str]:
    return {"type": type_, "status": status, "reason": reason, "message": message}


def merge_conditions(current: Iterable[dict[str, Any]], updates: Iterable[dict[str, str]],
                     timestamp: str) -> list[dict[str, Any]]:
    """`current` with `updates` replacing conditions of the same type, in a stable order."""
    by_type = {c["type"]: dict(c) for c in current}
    for update in updates:
        old = by_type.get(update["type"])
        unchanged = old is not None and old.get("status") == update["status"] and "lastTransitionTime" in old
        by_type[update["type"]] = {**update, "lastTransitionTime": old["lastTransitionTime"] if unchanged else timestamp}
    rank = {name: i for i, name in enumerate(_ORDER)}
    return sorted(by_type.values(), key=lambda c: (rank.get(c["type"], len(rank)), c["type"]))


def find(conditions: Iterable[dict[str, Any]], type_: str) -> dict[str, Any] | None:
    return next((c for c in conditions if c.get("type") == type_), None)


def plan_summary(plan: Plan) -> dict[str, Any]:
    """The plan as the resource's `status.plan`: layout, capacity and the per-GPU budget in GiB."""
    return {
        "gpusPerReplica": plan.gpus_per_replica,
        "tensorParallel": plan.tensor_parallel,
        "expertParallel": plan.expert_parallel,
        "maxConcurrentSequences": plan.spec.max_num_seqs,
        "maxSequencesAtMaxModelLen": plan.max_num_seqs_at_max_model_len,
        "kvCacheBytesPerGpu": plan.kv_cache_bytes_per_gpu,
        "kvBlocks": dict(plan.kv_blocks),
        "hostMemoryBytes": plan.host_memory_bytes,
        "modalities": modalities_of(plan),
        "perGpuGiB": {key: round(value / GiB, 2) for key, value in plan.per_gpu.to_dict().items()},
    }


def planned_message(plan: Plan) -> str:
    return (f"{plan.gpus_per_replica} x {plan.accelerator} per replica (tensor parallel {plan.tensor_parallel}, "
            f"expert parallel {plan.expert_parallel}); {plan.max_num_seqs_at_max_model_len} sequences of "
            f"{plan.spec.max_model_len} tokens fit")


UNAUTHENTICATED_MESSAGE = (
    "the gateway would serve anyone who reaches its Services: set spec.gateway.apiKeySecretName to a Secret "
    "whose key 'api-keys' holds the clients' keys (comma-separated), or spec.gateway.allowUnauthenticated: true "
    "to serve without keys")


def infeasible_message(plan: Plan) -> str:
    suggestions = f" Suggestions: {'; '.join(plan.suggestions)}." if plan.suggestions else ""
    return f"{plan.reason}.{suggestions}"


def ready_condition(ray_service: dict[str, Any] | None) -> dict[str, str]:
    """Ready from KubeRay: its `Ready` condition (KubeRay >= 1.3), else the older `serviceStatus`."""
    if ray_service is None:
        return condition(READY, "False", "Deploying", "the RayService does not exist yet")
    status = ray_service.get("status") or {}
    reported = find(status.get("conditions", []), "Ready")
    if reported is not None:
        return condition(READY, reported["status"], reported.get("reason") or "RayService",
                         reported.get("message") or "as reported by KubeRay")
    if status.get("serviceStatus") == "Running":
        return condition(READY, "True", "Running", "KubeRay reports the RayService running")
    return condition(READY, "False", "Deploying", "waiting for KubeRay to report the RayService ready")
