"""From a Gemma4Service spec to a `gemma4.memory` plan: the one place the two vocabularies meet.

The memory model is the same one the engine sizes its KV pools with, so what the operator asks
Kubernetes for is what a replica allocates. `auto` parallelism leaves the layout to the planner
(the fewest devices that fit, or `accelerator.count` when given); `explicit` passes the degrees on.
"""

from __future__ import annotations

from gemma4.memory import Plan, ServingSpec, plan

from gemma4_operator.spec import Gemma4ServiceSpec


def serving_spec(spec: Gemma4ServiceSpec) -> ServingSpec:
    """The memory model's request for `spec`; raises ValueError for combinations it rejects."""
    explicit = spec.parallelism.mode == "explicit"
    return ServingSpec(
        variant=spec.model.variant,
        weight_dtype=spec.model.dtype,
        kv_dtype=spec.model.kv_dtype,
        accelerator=spec.accelerator.type,
        max_model_len=spec.serving.max_model_len,
        max_num_seqs=spec.serving.max_concurrent_sequences,
        gpus=spec.accelerator.count,
        tensor_parallel=spec.parallelism.tensor_parallel if explicit else None,
        expert_parallel=spec.parallelism.expert_parallel if explicit else None,
    )


def plan_for(spec: Gemma4ServiceSpec) -> Plan:
    return plan(serving_spec(spec))
