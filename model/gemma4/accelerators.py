"""The accelerators a Gemma 4 replica can be planned on, per device (pure Python, no torch).

The memory model sizes a replica against `Accelerator.usable_bytes`; the operator takes the
Kubernetes side from here (the extended resource to request, node labels and tolerations), so a
plan and the pod it becomes name the same hardware.

Where the values come from:
* `memory_bytes`: what the driver reports as the device's total memory (`nvidia-smi` / torch
  `total_memory`: H100 80GB 81,559 MiB, H200 143,771 MiB, L4 23,034 MiB, L40S 46,068 MiB; A100
  SXM4 40,960 / 81,920 MiB), the HBM size for AMD Instinct (192 / 256 GiB) and TPUs (16 / 32 GiB
  per chip, Google Cloud "TPU v5e" / "TPU v6e" pages).
* `usable_fraction`: the share an engine may take; 0.90 is vLLM's long-standing
  `gpu_memory_utilization` default (0.92 in its current docs) and TRT-LLM's
  `free_gpu_memory_fraction`; the rest is left to the driver, other processes and noise.
* GKE labels: `cloud.google.com/gke-accelerator` values from the GKE GPU docs (nvidia-h100-80gb,
  nvidia-h200-141gb, nvidia-tesla-a100, nvidia-a100-80gb, nvidia-l4); TPUs use
  `cloud.google.com/gke-tpu-accelerator` (tpu-v5-lite-podslice, tpu-v6e-slice) plus
  `cloud.google.com/gke-tpu-topology` for the chip count (GKE "TPUs in GKE"; single-host v5e/v6e
  slices are 1x1, 2x2 and 2x4). GKE offers neither L40S nor AMD GPUs, so those stay empty.
* EKS labels: Karpenter's well-known `karpenter.k8s.aws/instance-gpu-name` (and
  `instance-gpu-memory` in MiB to tell the two A100s apart), which match every instance size with
  that GPU; `eks_instance_types` lists the EC2 types for a `node.kubernetes.io/instance-type`
  affinity on managed node groups. AWS has no AMD Instinct or TPU instances.
* `node_selector`: labels the vendor's own node labeller sets on any cluster: NVIDIA GPU Feature
  Discovery `nvidia.com/gpu.product`, AMD's node labeller `amd.com/gpu.product-name` (AMD GPU
  operator docs show `AMD_Instinct_MI300X_OAM`; MI325X nodes report `AMD_Instinct_MI325_OAM`).
* `EngineRuntime`: what this release's engine runs per vendor, the torch-free twin of
  `gemma4.backends` (a test holds the two together). NVIDIA and AMD run CUDA / ROCm with NCCL (RCCL
  behind the same API), so a replica may span a node's GPUs; Ray counts AMD GPUs as "GPU" too. TPUs
  run through torch_xla with no collectives yet (`backends.XLA.collectives is None`): one chip per
  replica, and Ray counts them as "TPU".
* Tolerations: GPU node pools are commonly tainted with the resource name (GKE adds
  `nvidia.com/gpu` and `google.com/tpu` taints itself; EKS node groups and Karpenter pools are
  usually given `nvidia.com/gpu:NoSchedule`), so a replica tolerates that key with `Exists`.
"""

from __future__ import annotations

from dataclasses import dataclass, field
MiB = 1 << 20
GiB = 1 << 30

_GPU_COUNTS = (1, 2, 4, 8)
_TPU_TOPOLOGIES = {1: "1x1", 4: "2x2", 8: "2x4"}  # single-host v5e / v6e slices


@dataclass(frozen=True)
class EngineRuntime:
    """What this release's engine runs on one vendor's devices."""

    backend: str  # the `gemma4.backends` Backend it runs as
    device: str  # the engine's `model.device` (torch's device type: ROCm builds call their GPUs "cuda")
    multi_device: bool  # a replica may span several devices (tensor / expert parallel over collectives)
    ray_resource: str  # the Ray resource each device is counted as
    image_suffix: str  # the serving image's tag suffix (deploy/docker/serving*.Dockerfile)


ENGINE_RUNTIMES: dict[str, EngineRuntime] = {
    "nvidia": EngineRuntime("cuda", "cuda", multi_device=True, ray_resource="GPU", image_suffix=""),
    "amd": EngineRuntime("rocm", "cuda", multi_device=True, ray_resource="GPU", image_suffix="-rocm"),
    "google": EngineRuntime("xla", "xla", multi_device=False, ray_resource="TPU", image_suffix="-tpu"),
}


def _toleration(resource_name: str) -> list[dict[str, str]]:
    return [{"key": resource_name, "operator": "Exists", "effect": "NoSchedule"}]


@dataclass(frozen=True)
class Accelerator:
    """One accelerator model, per device (per chip for TPUs)."""

    name: str
    vendor: str
    memory_bytes: int
    usable_fraction: float
    resource_name: str
    gke_node_selector: dict[str, str]
    eks_node_selector: dict[str, str]
    tolerations: list[dict[str, str]]
    supports_fp8: bool
    chips_per_node_options: tuple[int, ...] = _GPU_COUNTS
    node_selector: dict[str, str] = field(default_factory=dict)
    eks_instance_types: tuple[str, ...] = ()
    gke_tpu_topologies: dict[int, str] = field(default_factory=dict)

    @property
    def usable_bytes(self) -> int:
        """What one engine may allocate on one device."""
        return int(self.memory_bytes * self.usable_fraction)

    @property
    def captures_graphs(self) -> bool:
        """CUDA / HIP graphs hold their own memory pool; TPUs run XLA programs instead."""
        return self.vendor in ("nvidia", "amd")

    @property
    def runtime(self) -> EngineRuntime:
        return ENGINE_RUNTIMES[self.vendor]

    @property
    def max_devices_per_replica(self) -> int:
        """The most devices one replica of this release's engine spans here: a node's, or one without collectives."""
        return max(self.chips_per_node_options) if self.runtime.multi_device else 1

    def gke_selector(self, count: int) -> dict[str, str]:
        """GKE node labels for a replica of `count` devices (TPUs add the slice topology)."""
        if not self.gke_tpu_topologies:
            return dict(self.gke_node_selector)
        if count not in self.gke_tpu_topologies:
            known = ", ".join(str(c) for c in self.gke_tpu_topologies)
            raise ValueError(f"{self.name} single-host slices have {known} chips, not {count}")
        return {**self.gke_node_selector, "cloud.google.com/gke-tpu-topology": self.gke_tpu_topologies[count]}


def _nvidia(
    name: str, memory_mib: int, *, gke: str | None, eks: dict[str, str], instance_types: tuple[str, ...],
    product: str, fp8: bool,
) -> Accelerator:
    return Accelerator(
        name=name,
        vendor="nvidia",
        memory_bytes=memory_mib * MiB,
        usable_fraction=0.90,
        resource_name="nvidia.com/gpu",
        gke_node_selector={"cloud.google.com/gke-accelerator": gke} if gke else {},
        eks_node_selector=eks,
        tolerations=_toleration("nvidia.com/gpu"),
        supports_fp8=fp8,
        node_selector={"nvidia.com/gpu.product": product},
        eks_instance_types=instance_types,
    )


def _amd(name: str, memory_gib: int, product: str) -> Accelerator:
    return Accelerator(
        name=name,
        vendor="amd",
        memory_bytes=memory_gib * GiB,
        usable_fraction=0.90,
        resource_name="amd.com/gpu",
        gke_node_selector={},
        eks_node_selector={},
        tolerations=_toleration("amd.com/gpu"),
        supports_fp8=True,
        node_selector={"amd.com/gpu.product-name": product},
    )


def _tpu(name: str, memory_gib: int, gke: str) -> Accelerator:
    return Accelerator(
        name=name,
        vendor="google",
        memory_bytes=memory_gib * GiB,
        usable_fraction=0.90,
        resource_name="google.com/tpu",
        gke_node_selector={"cloud.google.com/gke-tpu-accelerator": gke},
        eks_node_selector={},
        tolerations=_toleration("google.com/tpu"),
        supports_fp8=False,
        chips_per_node_options=tuple(_TPU_TOPOLOGIES),
        gke_tpu_topologies=dict(_TPU_TOPOLOGIES),
    )


_GPU_NAME = "karpenter.k8s.aws/instance-gpu-name"
_GPU_MEMORY = "karpenter.k8s.aws/instance-gpu-memory"

ACCELERATORS: dict[str, Accelerator] = {
    a.name: a
    for a in (
        _nvidia("h100-80gb", 81_559, gke="nvidia-h100-80gb", eks={_GPU_NAME: "h100"},
                instance_types=("p5.4xlarge", "p5.48xlarge"), product="NVIDIA-H100-80GB-HBM3", fp8=True),
        _nvidia("h200-141gb", 143_771, gke="nvidia-h200-141gb", eks={_GPU_NAME: "h200"},
                instance_types=("p5e.48xlarge", "p5en.48xlarge"), product="NVIDIA-H200", fp8=True),
        _nvidia("a100-40gb", 40_960, gke="nvidia-tesla-a100", eks={_GPU_NAME: "a100", _GPU_MEMORY: "40960"},
                instance_types=("p4d.24xlarge",), product="NVIDIA-A100-SXM4-40GB", fp8=False),
        _nvidia("a100-80gb", 81_920, gke="nvidia-a100-80gb", eks={_GPU_NAME: "a100", _GPU_MEMORY: "81920"},
                instance_types=("p4de.24xlarge",), product="NVIDIA-A100-SXM4-80GB", fp8=False),
        _nvidia("l4", 23_034, gke="nvidia-l4", eks={_GPU_NAME: "l4"},
                instance_types=("g6.xlarge", "g6.2xlarge", "g6.4xlarge", "g6.8xlarge", "g6.16xlarge",
                                "g6.12xlarge", "g6.24xlarge", "g6.48xlarge"),
                product="NVIDIA-L4", fp8=True),
        _nvidia("l40s", 46_068, gke=None, eks={_GPU_NAME: "l40s"},
                instance_types=("g6e.xlarge", "g6e.2xlarge", "g6e.4xlarge", "g6e.8xlarge", "g6e.16xlarge",
                                "g6e.12xlarge", "g6e.24xlarge", "g6e.48xlarge"),
                product="NVIDIA-L40S", fp8=True),
        _amd("mi300x", 192, "AMD_Instinct_MI300X_OAM"),
        _amd("mi325x", 256, "AMD_Instinct_MI325_OAM"),
        _tpu("tpu-v5e", 16, "tpu-v5-lite-podslice"),
        _tpu("tpu-v6e", 32, "tpu-v6e-slice"),
    )
}


def get_accelerator(name: str) -> Accelerator:
    """The catalogue entry for `name` (case-insensitive)."""
    try:
        return ACCELERATORS[name.strip().lower()]
    except KeyError:
        raise ValueError(f"unknown accelerator {name!r}; known: {', '.join(ACCELERATORS)}") from None
