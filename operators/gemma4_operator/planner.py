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


# What this release's engine runs; the memory model also plans the rest (fp8/int8/int4 weights, fp8 KV).
ENGINE_WEIGHT_DTYPES = ("bf16",)
ENGINE_KV_DTYPES = ("bf16",)


def unsupported_by_engine(spec: Gemma4ServiceSpec) -> str | None:
    """Why the serving engine cannot run `spec` yet (a plan alone would deploy pods that fail), else None."""
    problems = []
    if spec.model.dtype not in ENGINE_WEIGHT_DTYPES:
        problems.append(f"spec.model.dtype {spec.model.dtype}")
    if spec.model.kv_dtype not in ENGINE_KV_DTYPES:
        problems.append(f"spec.model.kvDtype {spec.model.kv_dtype}")
    if not problems:
        return None
    return (f"{' and '.join(problems)} can be planned but this release's engine serves bf16 weights with a "
            "bf16 KV cache only; use bf16 (see `gemma4-platform plan` for the lighter formats' sizing)")
