"""The Gemma 4 operator: a `Gemma4Service` custom resource becomes a sized KubeRay RayService.

Modules, one job each: `spec` (the resource's spec as pydantic models), `crd` (the CRD generated
from them), `planner` (glue to `gemma4.memory`), `manifests` (pure builders of the owned objects),
`status` (conditions, plan and endpoints as status fields), `kube` (a small REST client that applies
objects), `handlers` (kopf handlers) and `__main__` (the runner). Importing the package never
imports torch, Ray or the platform: the operator image carries only kopf, the Kubernetes client and
the pure-Python parts of `gemma4`.
"""
