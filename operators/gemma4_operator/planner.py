"""From a Gemma4Service spec to a `gemma4.memory` plan: the one place the two vocabularies meet.

The memory model is the same one the engine sizes its KV pools with, so what the operator asks
Kubernetes for is what a replica allocates. `auto` parallelism leaves the layout to the planner
(the fewest devices that fit, or `accelerator.count` when given); `explicit` passes the degrees on.
The memory model plans layouts and formats this release's engine does not run (fp8 / int weights,
multi-chip TPU replicas); `unsupported_by_engine` refuses those, with changes that fit what it runs.
`spec.modalities` ([all] by default: whatever the variant takes) decides which towers and encoder cache
the plan prices; `spec.speculative` adds the variant's published drafter (`gemma4.memory.PUBLISHED_DRAFTERS`:
the operator has only the drafter's reference, not its config) or n-gram drafting's buffers; `unsupported_modalities` refuses one the variant has no tower for before planning.
"""

from __future__ import annotations

import dataclasses

from gemma4.accelerators import ACCELERATORS, get_accelerator
from gemma4.config import VARIANTS, variant_config
from gemma4.memory import Plan, ServingSpec, longest_context, plan, served_modalities

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
        redundant_experts=spec.parallelism.redundant_experts,
        modalities="all" if spec.modalities == ["all"] else tuple(spec.modalities),
        speculative=None if spec.speculative.method == "off" else spec.speculative.method,
        num_speculative_tokens=spec.speculative.num_tokens,
    )


def unsupported_modalities(spec: Gemma4ServiceSpec) -> str | None:
    """Why `spec.model.variant` cannot serve `spec.modalities` (no tower for one of them), else None."""
    takes = variant_config(spec.model.variant).modalities
    missing = [m for m in spec.modalities if m != "all" and m not in takes]
    if not missing:
        return None
    others = [v for v in VARIANTS if set(missing) <= set(variant_config(v).modalities)]
    return (f"spec.modalities: {spec.model.variant} has no {' or '.join(missing)} input (it takes "
            f"{', '.join(takes)}); leave {' and '.join(missing)} out, or use a variant that takes "
            f"{'them' if len(missing) > 1 else 'it'}: {', '.join(others)}")


def modalities_of(plan: Plan) -> list[str]:
    """What a replica of `plan` serves, 'all' resolved against its variant (text always among them)."""
    return list(served_modalities(variant_config(plan.spec.variant), plan.spec.modalities))


def plan_for(spec: Gemma4ServiceSpec) -> Plan:
    return plan(serving_spec(spec))


# What this release's engine runs; the memory model also plans the rest (fp8/int8/int4 weights, fp8 KV).
ENGINE_WEIGHT_DTYPES = ("bf16",)
ENGINE_KV_DTYPES = ("bf16",)


def unsupported_by_engine(spec: Gemma4ServiceSpec, plan: Plan) -> str | None:
    """Why the serving engine cannot run `spec` as `plan` lays it out (its pods would fail), else None."""
    problems = []
    if spec.model.dtype not in ENGINE_WEIGHT_DTYPES:
        problems.append(f"spec.model.dtype {spec.model.dtype}")
    if spec.model.kv_dtype not in ENGINE_KV_DTYPES:
        problems.append(f"spec.model.kvDtype {spec.model.kv_dtype}")
    if problems:
        return (f"{' and '.join(problems)} can be planned but this release's engine serves bf16 weights with a "
                "bf16 KV cache only; use bf16 (see `gemma4-platform plan` for the lighter formats' sizing)")
    acc = get_accelerator(plan.accelerator)
    limit = acc.max_devices_per_replica
    if plan.gpus_per_replica <= limit:
        return None
    why = (f"{acc.runtime.backend} has no collectives in this release, so a replica runs on one device"
           if not acc.runtime.multi_device else "a replica runs on one node's devices")
    suggestions = engine_suggestions(plan.spec)
    tail = f" Suggestions: {'; '.join(suggestions)}." if suggestions else " Nothing the engine runs fits this spec."
    return (f"{plan.spec.variant} needs {plan.gpus_per_replica} x {acc.name} per replica, but this release's engine "
            f"runs at most {limit} x {acc.name} per replica ({why}).{tail}")


def runnable_plan(serving: ServingSpec) -> Plan | None:
    """`serving`'s plan if it fits and the engine runs its layout, else None."""
    try:
        result = plan(serving)
    except ValueError:  # a layout the model cannot take
        return None
    fits = result.feasible and result.gpus_per_replica <= get_accelerator(result.accelerator).max_devices_per_replica
    return result if fits else None


def engine_suggestions(serving: ServingSpec) -> list[str]:
    """Changes that make `serving` fit within what the engine runs, each checked with the memory model:
    a lower concurrency or context on the accelerator's largest runnable replica, a larger accelerator of
    the same vendor, and the accelerator of another vendor that needs the fewest devices."""
    acc = get_accelerator(serving.accelerator)
    out: list[str] = []
    largest = dataclasses.replace(serving, gpus=acc.max_devices_per_replica, tensor_parallel=None,
                                  expert_parallel=None)
    try:
        seqs = plan(largest).max_num_seqs_at_max_model_len
        length = longest_context(largest)
    except ValueError:  # the model does not split over that many devices
        seqs = length = 0
    where = f"fits on {largest.gpus} x {acc.name}"
    if 0 < seqs < serving.max_num_seqs:
        out.append(f"lower spec.serving.maxConcurrentSequences to {seqs} ({where})")
    if length:
        out.append(f"lower spec.serving.maxModelLen to {length} ({where})")
    auto = {"gpus": None, "tensor_parallel": None, "expert_parallel": None}
    others = [(o, runnable_plan(dataclasses.replace(serving, accelerator=o.name, **auto)))
              for o in sorted(ACCELERATORS.values(), key=lambda a: a.memory_bytes) if o.name != acc.name]
    same = [(o, p) for o, p in others if p is not None and o.vendor == acc.vendor]
    other = sorted(((o, p) for o, p in others if p is not None and o.vendor != acc.vendor),
                   key=lambda item: item[1].gpus_per_replica)
    for o, p in same[:1] + other[:1]:
        out.append(f"use spec.accelerator.type {o.name} (fits on {p.gpus_per_replica} x {o.name})")
    return out
