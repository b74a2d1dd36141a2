"""Whatever the operator plans, the engine runs; whatever the engine cannot run, the operator refuses (issue 12).

The walk covers the accelerator catalogue x the four variants x a few contexts and concurrencies. A plan is
either refused (Infeasible with a reason, or Unsupported because this release's engine does not span that many
devices there), or its args carry a layout the engine accepts (`check_layout`, `ParallelLayout` on every rank,
within the vendor's capability) and its manifests validate, with the worker pod holding exactly the replica's
devices: the Ray resources the engine asks for from the args (one actor, or a placement group packed on one
node) fit one pod's, and no second replica does.
"""

from __future__ import annotations

import dataclasses
import json
from typing import Any

import jsonschema
import kubernetes_validate
import pytest

from gemma4.accelerators import ACCELERATORS, get_accelerator
from gemma4.config import VARIANTS, variant_config
from gemma4.memory import Plan, check_layout
from gemma4.parallel.layout import ParallelLayout
from gemma4_operator import manifests, planner
from gemma4_operator.spec import Gemma4ServiceSpec
from test_operator_manifests import KUBERAY_SCHEMA, OWNER, PVC, args_settings, by_kind, sample, serve_args

CONTEXTS = ((8192, 16), (32768, 4), (131072, 1))  # (maxModelLen, maxConcurrentSequences)


def spec_for(variant: str, accelerator: str, context: int = 8192, seqs: int = 16, **more: Any) -> Gemma4ServiceSpec:
    return Gemma4ServiceSpec.model_validate(sample(
        model={"variant": variant, "checkpoint": PVC}, accelerator={"type": accelerator},
        serving={"maxModelLen": context, "maxConcurrentSequences": seqs}, cloud="gke", **more))


def engine_request(args: dict[str, Any]) -> list[dict[str, float]]:
    """The Ray bundles the engine asks for from these args: the replica actor alone on one device, else a
    STRICT_PACK placement group of the actor's CPU bundle and one `{"CPU": 1, "GPU": 1}` bundle per rank."""
    replica, tp = args["replica"], args["engine"]["tensor_parallel_size"]
    if tp == 1:
        return [{"CPU": replica["num_cpus"], "GPU": replica["num_gpus"]}]
    assert replica["num_gpus"] == 0, "the replica actor of a tensor-parallel replica holds no device itself"
    return [{"CPU": replica["num_cpus"]}] + [{"CPU": 1, "GPU": 1}] * tp


def pod_offer(start_params: dict[str, str]) -> dict[str, float]:
    """The Ray resources a worker pod's `ray start` flags declare."""
    offer = {"CPU": float(start_params["num-cpus"]), "GPU": float(start_params.get("num-gpus", 0))}
    if "resources" in start_params:
        quoted = start_params["resources"]
        assert quoted[0] == quoted[-1] == '"'
        offer |= json.loads(quoted[1:-1].replace('\\"', '"'))
    return offer


def check_engine_runs(parsed: Gemma4ServiceSpec, plan: Plan) -> None:
    """The plan's args, Ray resources and pods are what the engine runs, and they validate."""
    acc = get_accelerator(parsed.accelerator.type)
    objects = manifests.desired_objects(OWNER, parsed, plan, with_service_monitor=False)
    args = serve_args(objects)
    args_settings(objects)  # the platform's settings accept the args
    engine = args["engine"]
    tp, ep, redundant = engine["tensor_parallel_size"], engine["expert_parallel_size"], engine["redundant_experts"]
    assert (tp, ep) == (plan.tensor_parallel, plan.expert_parallel) and tp == plan.gpus_per_replica
    check_layout(variant_config(parsed.model.variant).text, tp, ep, redundant)
    for rank in range(tp):
        ParallelLayout(tp, ep, rank, redundant)
    assert tp <= acc.max_devices_per_replica and tp in acc.chips_per_node_options
    assert args["model"]["device"] == acc.runtime.device

    group = by_kind(objects, "RayService")[0]["spec"]["rayClusterConfig"]["workerGroupSpecs"][0]
    offer = pod_offer(group["rayStartParams"])
    request = engine_request(args)
    total = {key: sum(bundle.get(key, 0) for bundle in request) for key in ("CPU", "GPU")}
    assert all(total[key] <= offer[key] for key in total), (total, offer)
    assert any(2 * total[key] > offer[key] for key in total), "a second replica would fit on the pod"
    # Every device of the pod is the replica's: GPUs through Ray, a TPU chip by being the pod's only replica.
    limits = group["template"]["spec"]["containers"][0]["resources"]["limits"]
    assert limits[acc.resource_name] == str(tp)
    assert offer[acc.runtime.ray_resource] == tp
    assert total["GPU"] == (tp if acc.runtime.ray_resource == "GPU" else 0)
    if acc.gke_tpu_topologies:
        assert group["template"]["spec"]["nodeSelector"]["cloud.google.com/gke-tpu-topology"] == \
            acc.gke_tpu_topologies[tp]

    jsonschema.Draft4Validator(KUBERAY_SCHEMA).validate(by_kind(objects, "RayService")[0])
    kubernetes_validate.validate({"apiVersion": "v1", "kind": "PodTemplate", "metadata": {"name": "t"},
                                  "template": group["template"]}, "1.33", strict=True)


@pytest.mark.parametrize("variant", list(VARIANTS))
@pytest.mark.parametrize("accelerator", list(ACCELERATORS))
def test_every_plan_the_operator_emits_is_run_by_the_engine_or_refused(variant: str, accelerator: str) -> None:
    acc = get_accelerator(accelerator)
    for context, seqs in CONTEXTS:
        parsed = spec_for(variant, accelerator, context, seqs)
        plan = planner.plan_for(parsed)
        if not plan.feasible:
            assert plan.reason
            continue
        unsupported = planner.unsupported_by_engine(parsed, plan)
        if unsupported is not None:
            assert plan.gpus_per_replica > acc.max_devices_per_replica
            assert "this release's engine runs at most 1 x" in unsupported and "Suggestions: " in unsupported
            continue
        check_engine_runs(parsed, plan)


def test_the_walk_covers_multi_device_replicas_and_refusals() -> None:
    """The catalogue walk above meets each outcome: GPU replicas over several devices on NVIDIA and AMD,
    one-chip TPU replicas, and TPU layouts refused as Unsupported."""
    outcomes: set[tuple[str, str]] = set()
    for name, acc in ACCELERATORS.items():
        for variant in VARIANTS:
            parsed = spec_for(variant, name)
            plan = planner.plan_for(parsed)
            if not plan.feasible:
                continue
            if planner.unsupported_by_engine(parsed, plan) is not None:
                outcomes.add((acc.vendor, "unsupported"))
            else:
                outcomes.add((acc.vendor, "multi" if plan.tensor_parallel > 1 else "single"))
    assert {("nvidia", "multi"), ("nvidia", "single"), ("amd", "single"), ("google", "single"),
            ("google", "unsupported")} <= outcomes
    assert ("google", "multi") not in outcomes


def test_31b_on_h100_at_8k_is_tensor_parallel_over_two_gpus_of_one_pod() -> None:
    parsed = spec_for("31b", "h100-80gb", 8192, 16)
    plan = planner.plan_for(parsed)
    assert (plan.feasible, plan.tensor_parallel, plan.expert_parallel) == (True, 2, 1)
    assert planner.unsupported_by_engine(parsed, plan) is None
    check_engine_runs(parsed, plan)
    objects = manifests.desired_objects(OWNER, parsed, plan, with_service_monitor=False)
    args = serve_args(objects)
    assert args["replica"]["num_gpus"] == 0 and args["replica"]["num_cpus"] == 1
    group = by_kind(objects, "RayService")[0]["spec"]["rayClusterConfig"]["workerGroupSpecs"][0]
    assert (group["rayStartParams"]["num-gpus"], group["rayStartParams"]["num-cpus"]) == ("2", "3")
    assert group["template"]["spec"]["containers"][0]["resources"]["limits"]["nvidia.com/gpu"] == "2"


def test_26b_a4b_on_l4_is_tensor_and_expert_parallel_over_four_gpus() -> None:
    parsed = spec_for("26b-a4b", "l4")
    plan = planner.plan_for(parsed)
    assert (plan.feasible, plan.tensor_parallel, plan.expert_parallel) == (True, 4, 4)
    check_engine_runs(parsed, plan)
    engine = serve_args(manifests.desired_objects(OWNER, parsed, plan, with_service_monitor=False))["engine"]
    assert (engine["tensor_parallel_size"], engine["expert_parallel_size"]) == (4, 4)


def test_redundant_experts_and_rebalancing_reach_the_engine_and_its_memory() -> None:
    parallelism = {"redundantExperts": 8, "expertRebalanceInterval": 500}
    parsed = spec_for("26b-a4b", "l4", parallelism=parallelism)
    plan = planner.plan_for(parsed)
    assert plan.feasible and plan.spec.redundant_experts == 8
    check_engine_runs(parsed, plan)
    engine = serve_args(manifests.desired_objects(OWNER, parsed, plan, with_service_monitor=False))["engine"]
    assert (engine["redundant_experts"], engine["expert_rebalance_interval"]) == (8, 500)
    plain = planner.plan_for(spec_for("26b-a4b", "l4"))
    assert plan.weights_per_gpu["experts"] > plain.weights_per_gpu["experts"]
    assert plan.kv_cache_bytes_per_gpu < plain.kv_cache_bytes_per_gpu
    # Redundant slots split evenly over the EP groups; a dense variant has no experts to copy.
    with pytest.raises(ValueError, match="redundant_experts=6 must be a multiple of expert_parallel=4"):
        planner.plan_for(spec_for("26b-a4b", "l4", parallelism={"mode": "explicit", "tensorParallel": 4,
                                                                "redundantExperts": 6}))
    with pytest.raises(ValueError, match="MoE variant"):
        planner.plan_for(spec_for("31b", "h100-80gb", parallelism={"redundantExperts": 2}))


def test_e4b_on_tpu_v5e_needs_four_chips_and_is_unsupported_with_suggestions_that_fit() -> None:
    parsed = spec_for("e4b", "tpu-v5e")
    plan = planner.plan_for(parsed)
    assert plan.feasible and plan.gpus_per_replica == 4  # the memory model alone would take 4 chips
    message = planner.unsupported_by_engine(parsed, plan)
    assert message is not None and "runs at most 1 x tpu-v5e per replica" in message
    assert "use spec.accelerator.type tpu-v6e (fits on 1 x tpu-v6e)" in message
    assert "use spec.accelerator.type l4 (fits on 1 x l4)" in message
    for other in ("tpu-v6e", "l4"):
        suggested = planner.runnable_plan(dataclasses.replace(plan.spec, accelerator=other, gpus=None))
        assert suggested is not None and suggested.gpus_per_replica == 1
        check_engine_runs(spec_for("e4b", other), suggested)


def test_a_smaller_context_or_concurrency_on_one_chip_is_suggested_when_it_fits() -> None:
    parsed = spec_for("e2b", "tpu-v5e", 65536, 16)
    plan = planner.plan_for(parsed)
    assert plan.feasible and plan.gpus_per_replica > 1
    message = planner.unsupported_by_engine(parsed, plan)
    assert message is not None
    suggestions = planner.engine_suggestions(plan.spec)
    seqs = next(s for s in suggestions if s.startswith("lower spec.serving.maxConcurrentSequences to "))
    length = next(s for s in suggestions if s.startswith("lower spec.serving.maxModelLen to "))
    assert seqs in message and length in message
    fewer = int(seqs.split(" to ")[1].split()[0])
    shorter = int(length.split(" to ")[1].split()[0])
    assert fewer < 16 and shorter < 65536
    for context, concurrency in ((65536, fewer), (shorter, 16)):
        fits = planner.runnable_plan(dataclasses.replace(plan.spec, max_model_len=context, max_num_seqs=concurrency))
        assert fits is not None and fits.gpus_per_replica == 1


def test_an_explicit_multi_chip_tpu_layout_is_unsupported() -> None:
    parsed = spec_for("e2b", "tpu-v6e", parallelism={"mode": "explicit", "tensorParallel": 4})
    plan = planner.plan_for(parsed)
    assert plan.feasible and plan.tensor_parallel == 4
    message = planner.unsupported_by_engine(parsed, plan)
    assert message is not None and "xla has no collectives" in message


def test_e2b_on_tpu_v5e_runs_on_one_chip_of_a_tpu_pod() -> None:
    for cloud in ("gke", "generic"):
        parsed = Gemma4ServiceSpec.model_validate(sample(model={"variant": "e2b", "checkpoint": PVC},
                                                         accelerator={"type": "tpu-v5e"}, cloud=cloud))
        plan = planner.plan_for(parsed)
        assert plan.feasible and plan.gpus_per_replica == 1
        assert planner.unsupported_by_engine(parsed, plan) is None
        check_engine_runs(parsed, plan)
        objects = manifests.desired_objects(OWNER, parsed, plan, with_service_monitor=False)
        group = by_kind(objects, "RayService")[0]["spec"]["rayClusterConfig"]["workerGroupSpecs"][0]
        pod = group["template"]["spec"]
        assert pod["nodeSelector"] == {"cloud.google.com/gke-tpu-accelerator": "tpu-v5-lite-podslice",
                                       "cloud.google.com/gke-tpu-topology": "1x1"}
        assert pod["containers"][0]["resources"]["limits"]["google.com/tpu"] == "1"
        assert pod["containers"][0]["image"] == f"{manifests.IMAGE_REPOSITORY}:{manifests.IMAGE_TAG}-tpu"
        assert group["rayStartParams"]["resources"] == '"{\\"TPU\\": 1}"' and "num-gpus" not in group["rayStartParams"]
        args = serve_args(objects)
        assert args["model"]["device"] == "xla" and args["replica"]["num_gpus"] == 0
