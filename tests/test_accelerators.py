"""The accelerator catalogue: memory, usable share, and the Kubernetes names a replica is scheduled with."""

from __future__ import annotations

import pytest
import torch

from gemma4 import backends
from gemma4.accelerators import ACCELERATORS, ENGINE_RUNTIMES, Accelerator, GiB, MiB, get_accelerator

EXPECTED = {
    "h100-80gb": ("nvidia", 81_559 * MiB, "nvidia.com/gpu"),
    "h200-141gb": ("nvidia", 143_771 * MiB, "nvidia.com/gpu"),
    "a100-40gb": ("nvidia", 40_960 * MiB, "nvidia.com/gpu"),
    "a100-80gb": ("nvidia", 81_920 * MiB, "nvidia.com/gpu"),
    "l4": ("nvidia", 23_034 * MiB, "nvidia.com/gpu"),
    "l40s": ("nvidia", 46_068 * MiB, "nvidia.com/gpu"),
    "mi300x": ("amd", 192 * GiB, "amd.com/gpu"),
    "mi325x": ("amd", 256 * GiB, "amd.com/gpu"),
    "tpu-v5e": ("google", 16 * GiB, "google.com/tpu"),
    "tpu-v6e": ("google", 32 * GiB, "google.com/tpu"),
}


def test_catalogue_has_every_accelerator_with_its_memory_and_resource() -> None:
    assert set(ACCELERATORS) == set(EXPECTED)
    for name, (vendor, memory, resource) in EXPECTED.items():
        acc = get_accelerator(name)
        assert (acc.name, acc.vendor, acc.memory_bytes, acc.resource_name) == (name, vendor, memory, resource)
        assert 0.85 <= acc.usable_fraction <= 0.95
        assert acc.usable_bytes == int(acc.memory_bytes * acc.usable_fraction)
        # A replica tolerates the taint GPU/TPU pools carry: the resource name, NoSchedule.
        assert {"key": resource, "operator": "Exists", "effect": "NoSchedule"} in acc.tolerations
        assert acc.captures_graphs == (vendor != "google")


@pytest.mark.parametrize(
    "name,label",
    [
        ("h100-80gb", "nvidia-h100-80gb"),
        ("h200-141gb", "nvidia-h200-141gb"),
        ("a100-40gb", "nvidia-tesla-a100"),
        ("a100-80gb", "nvidia-a100-80gb"),
        ("l4", "nvidia-l4"),
    ],
)
def test_gke_gpu_labels(name: str, label: str) -> None:
    acc = get_accelerator(name)
    assert acc.gke_node_selector == {"cloud.google.com/gke-accelerator": label}
    assert acc.gke_selector(8) == acc.gke_node_selector
    assert acc.chips_per_node_options == (1, 2, 4, 8)


def test_clouds_without_an_accelerator_have_no_labels_for_it() -> None:
    assert get_accelerator("l40s").gke_node_selector == {}
    for name in ("mi300x", "mi325x", "tpu-v5e", "tpu-v6e"):
        acc = get_accelerator(name)
        assert acc.eks_node_selector == {} and acc.eks_instance_types == ()
    for name in ("mi300x", "mi325x"):
        assert get_accelerator(name).gke_node_selector == {}
    assert get_accelerator("mi300x").node_selector == {"amd.com/gpu.product-name": "AMD_Instinct_MI300X_OAM"}


def test_eks_labels_tell_the_two_a100s_apart() -> None:
    small, large = get_accelerator("a100-40gb"), get_accelerator("a100-80gb")
    assert small.eks_node_selector["karpenter.k8s.aws/instance-gpu-name"] == "a100"
    assert small.eks_node_selector != large.eks_node_selector
    assert get_accelerator("h100-80gb").eks_node_selector == {"karpenter.k8s.aws/instance-gpu-name": "h100"}
    assert "p5.48xlarge" in get_accelerator("h100-80gb").eks_instance_types
    assert "p4de.24xlarge" in large.eks_instance_types


@pytest.mark.parametrize(
    "name,accelerator_label", [("tpu-v5e", "tpu-v5-lite-podslice"), ("tpu-v6e", "tpu-v6e-slice")]
)
def test_tpu_selector_carries_the_slice_topology(name: str, accelerator_label: str) -> None:
    acc = get_accelerator(name)
    assert acc.chips_per_node_options == (1, 4, 8)
    assert acc.gke_selector(4) == {
        "cloud.google.com/gke-tpu-accelerator": accelerator_label,
        "cloud.google.com/gke-tpu-topology": "2x2",
    }
    assert acc.gke_selector(1)["cloud.google.com/gke-tpu-topology"] == "1x1"
    assert acc.gke_selector(8)["cloud.google.com/gke-tpu-topology"] == "2x4"
    with pytest.raises(ValueError, match="1, 4, 8 chips, not 2"):
        acc.gke_selector(2)


def test_fp8_support() -> None:
    with_fp8 = {name for name, acc in ACCELERATORS.items() if acc.supports_fp8}
    assert with_fp8 == {"h100-80gb", "h200-141gb", "l4", "l40s", "mi300x", "mi325x"}


def test_lookup_is_case_insensitive_and_unknown_names_are_listed() -> None:
    assert get_accelerator(" H100-80GB ") is ACCELERATORS["h100-80gb"]
    with pytest.raises(ValueError, match="unknown accelerator 'b200'; known: h100-80gb, h200-141gb"):
        get_accelerator("b200")


@pytest.mark.parametrize("vendor", ["nvidia", "amd", "google"])
def test_engine_runtime_per_vendor_is_what_the_backends_run(vendor: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """NVIDIA and AMD replicas span a node's GPUs (NCCL / RCCL); TPUs run one chip (no XLA collectives yet)."""
    assert set(ENGINE_RUNTIMES) == {a.vendor for a in ACCELERATORS.values()}
    accelerator: Accelerator = next(a for a in ACCELERATORS.values() if a.vendor == vendor)
    runtime = accelerator.runtime
    monkeypatch.setattr(torch.version, "hip", "6.4" if vendor == "amd" else None)
    backend = backends.backend_of(runtime.device)
    assert backend.name == runtime.backend and backend.multi_device == runtime.multi_device
    assert accelerator.max_devices_per_replica == (max(accelerator.chips_per_node_options) if backend.multi_device else 1)
