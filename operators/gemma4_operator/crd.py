"""The Gemma4Service CustomResourceDefinition, generated from the spec models.

The spec's openAPIV3Schema is derived from `spec.Gemma4ServiceSpec` so the CRD can never drift from
what the operator parses. Pydantic writes JSON Schema (draft 2020-12 with `$ref`s and `anyOf`
for optional fields); a CRD needs a *structural* OpenAPI v3.0 schema, so `structural()` inlines the
references, unwraps optionals, drops what Kubernetes rejects (`title`, `additionalProperties: false`)
and rewrites numeric exclusive bounds to the OpenAPI 3.0 form. `crd.yaml` next to this module is
the committed output of `python -m gemma4_operator crd`; a test keeps it current.
"""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import yaml

from gemma4_operator.spec import Gemma4ServiceSpec

GROUP = "serving.gemma4.dev"
VERSION = "v1alpha1"
API_VERSION = f"{GROUP}/{VERSION}"
KIND = "Gemma4Service"
PLURAL = "gemma4services"
SINGULAR = "gemma4service"
SHORT_NAMES = ["g4s"]
CRD_NAME = f"{PLURAL}.{GROUP}"
CRD_PATH = Path(__file__).with_name("crd.yaml")
# Owned objects append up to 9 characters ("-head-svc" by KubeRay) and must stay DNS labels (63).
MAX_NAME_LENGTH = 50


def structural(schema: dict[str, Any]) -> dict[str, Any]:
    """A pydantic JSON schema as a structural OpenAPI v3.0 schema (see the module docstring)."""
    return _convert(schema, schema.get("$defs", {}))


def _convert(node: dict[str, Any], defs: dict[str, Any]) -> dict[str, Any]:
    while "$ref" in node or "anyOf" in node:  # an optional field may wrap a reference
        if "$ref" in node:
            target = defs[node["$ref"].rsplit("/", 1)[-1]]
            node = {**target, **{k: v for k, v in node.items() if k != "$ref"}}
        else:
            options = [o for o in node["anyOf"] if o.get("type") != "null"]
            if len(options) != 1:
                raise ValueError(f"cannot express {node['anyOf']} in a structural schema")
            node = {**options[0], **{k: v for k, v in node.items() if k != "anyOf"}}
    out: dict[str, Any] = {}
    for key, value in node.items():
        if key in ("title", "$defs") or (key == "default" and value is None):
            continue
        if key == "additionalProperties":
            if isinstance(value, dict):
                out[key] = _convert(value, defs)
        elif key == "properties":
            out[key] = {name: _convert(prop, defs) for name, prop in value.items()}
        elif key == "items":
            out[key] = _convert(value, defs)
        elif key == "exclusiveMinimum":
            out.update(minimum=value, exclusiveMinimum=True)
        else:
            out[key] = copy.deepcopy(value)  # a model inlined twice must not share lists (YAML would alias them)
    if out.get("type") == "object" and "default" in out:
        # Let the API server default nested fields itself; a required field cannot be defaulted.
        if "required" in out:
            del out["default"]
        else:
            out["default"] = {}
    return out


def _status_schema() -> dict[str, Any]:
    condition = {
        "type": "object",
        "required": ["type", "status"],
        "properties": {
            "type": {"type": "string"},
            "status": {"type": "string", "enum": ["True", "False", "Unknown"]},
            "reason": {"type": "string"},
            "message": {"type": "string"},
            "lastTransitionTime": {"type": "string", "format": "date-time"},
            "observedGeneration": {"type": "integer"},
        },
    }
    plan = {
        "type": "object",
        "properties": {
            "gpusPerReplica": {"type": "integer"},
            "tensorParallel": {"type": "integer"},
            "expertParallel": {"type": "integer"},
            "maxConcurrentSequences": {"type": "integer"},
            "maxSequencesAtMaxModelLen": {"type": "integer"},
            "kvCacheBytesPerGpu": {"type": "integer"},
            "kvBlocks": {"type": "object", "additionalProperties": {"type": "integer"}},
            "hostMemoryBytes": {"type": "integer"},
            "modalities": {"type": "array", "items": {"type": "string"}},
            "perGpuGiB": {"type": "object", "additionalProperties": {"type": "number"}},
        },
    }
    return {
        "type": "object",
        # kopf keeps its own progress under status.kopf.
        "x-kubernetes-preserve-unknown-fields": True,
        "properties": {
            "observedGeneration": {"type": "integer"},
            "replicas": {"type": "string", "description": "the deployed replica range, MIN-MAX"},
            "plan": plan,
            "endpoints": {
                "type": "object",
                "properties": {name: {"type": "string"} for name in ("grpc", "grpcTls", "http")},
            },
            "conditions": {"type": "array", "items": condition},
        },
    }


def crd_manifest() -> dict[str, Any]:
    """The CustomResourceDefinition object."""
    spec_schema = structural(Gemma4ServiceSpec.model_json_schema(by_alias=True))
    schema = {
        "type": "object",
        "required": ["spec"],
        "properties": {
            "apiVersion": {"type": "string"},
            "kind": {"type": "string"},
            "metadata": {"type": "object"},
            "spec": spec_schema,
            "status": _status_schema(),
        },
        "x-kubernetes-validations": [{
            "rule": f"size(self.metadata.name) <= {MAX_NAME_LENGTH}",
            "message": f"the name must have at most {MAX_NAME_LENGTH} characters (owned objects add suffixes)",
        }],
    }
    columns = [
        ("Variant", "string", ".spec.model.variant"),
        ("Accelerator", "string", ".spec.accelerator.type"),
        ("GPUs/replica", "integer", ".status.plan.gpusPerReplica"),
        ("Replicas", "string", ".status.replicas"),
        ("Ready", "string", '.status.conditions[?(@.type=="Ready")].status'),
        ("Age", "date", ".metadata.creationTimestamp"),
    ]
    return {
        "apiVersion": "apiextensions.k8s.io/v1",
        "kind": "CustomResourceDefinition",
        "metadata": {"name": CRD_NAME},
        "spec": {
            "group": GROUP,
            "scope": "Namespaced",
            "names": {
                "kind": KIND,
                "listKind": f"{KIND}List",
                "plural": PLURAL,
                "singular": SINGULAR,
                "shortNames": SHORT_NAMES,
            },
            "versions": [{
                "name": VERSION,
                "served": True,
                "storage": True,
                "schema": {"openAPIV3Schema": schema},
                "subresources": {"status": {}},
                "additionalPrinterColumns": [
                    {"name": name, "type": kind, "jsonPath": path} for name, kind, path in columns
                ],
            }],
        },
    }


def crd_yaml() -> str:
    header = "# Generated by `python -m gemma4_operator crd` from gemma4_operator.spec; do not edit.\n"
    return header + yaml.safe_dump(crd_manifest(), sort_keys=False, width=120)

