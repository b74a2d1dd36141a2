"""The one place that knows devices: what a backend can do, and which implementation of each hot-path op runs.

CUDA and ROCm run the Triton kernels (`gemma4.kernels`); the CPU and XLA run the torch reference ops
(`gemma4.ops`), which are also the kernels' oracle. The CPU can run the kernels too, through Triton's
interpreter (`TRITON_INTERPRET=1`, set before the kernels are imported): that is how the tests check
the engine with kernels on. Code elsewhere asks a `Backend` or calls an `Ops` member; it does not
test device strings.
"""

from __future__ import annotations

import functools
import os
from dataclasses import dataclass
from typing import Any, Callable, Literal

import torch

KernelChoice = Literal["auto", "triton", "torch"]
KERNEL_CHOICES: tuple[KernelChoice, ...] = ("auto", "triton", "torch")


def triton_interpreter() -> bool:
    """Whether Triton kernels run through the interpreter (on CPU tensors) in this process."""
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


@dataclass(frozen=True)
class Backend:
    """A device family and its capabilities.

    `collectives` is the torch.distributed backend a multi-rank replica's process group uses on it
    (None: this release runs only single-device replicas there; XLA's SPMD path is not built).
    `pinned_memory`: host staging buffers are page-locked, so host-to-device copies can be
    asynchronous. `dtypes`: the weight and activation dtypes the engine serves on it.
    """

    name: Literal["cuda", "rocm", "xla", "cpu"]
    triton: bool  # Triton kernels compile and run here natively
    cuda_graphs: bool  # decode steps can be captured and replayed
    collectives: Literal["nccl", "gloo"] | None
    pinned_memory: bool
    dtypes: tuple[torch.dtype, ...]

    @property
    def default_kernels(self) -> Literal["triton", "torch"]:
        return "triton" if self.triton else "torch"

    @property
    def multi_device(self) -> bool:
        """Whether a replica may span several devices of this backend."""
        return self.collectives is not None

    def device_memory_bytes(self, device: torch.device | str) -> int | None:
        """The device's total memory, or None where the device's memory is the host's (CPU)."""
        if self.name in ("cuda", "rocm"):
            return torch.cuda.get_device_properties(torch.device(device)).total_memory
        return None

    def check_dtype(self, dtype: torch.dtype) -> None:
        if dtype not in self.dtypes:
            names = ", ".join(str(d).removeprefix("torch.") for d in self.dtypes)
            raise ValueError(f"{self.name} serves {names}; got {str(dtype).removeprefix('torch.')}")


_FLOATS = (torch.float32, torch.bfloat16, torch.float16)
CUDA = Backend("cuda", triton=True, cuda_graphs=True, collectives="nccl", pinned_memory=True, dtypes=_FLOATS)
ROCM = Backend("rocm", triton=True, cuda_graphs=True, collectives="nccl", pinned_memory=True, dtypes=_FLOATS)
XLA = Backend("xla", triton=False, cuda_graphs=False, collectives=None, pinned_memory=False, dtypes=_FLOATS)
CPU = Backend("cpu", triton=False, cuda_graphs=False, collectives="gloo", pinned_memory=False, dtypes=_FLOATS)


def backend_of(device: torch.device | str) -> Backend:
    """The backend of `device` (ROCm builds of torch report device type "cuda"; torch.version.hip tells them apart)."""
    kind = torch.device(device).type
    if kind == "cuda":
        return ROCM if torch.version.hip is not None else CUDA
    if kind == "xla":
        return XLA
    if kind == "cpu":
        return CPU
    raise ValueError(f"unsupported device type {kind!r}: expected cuda (NVIDIA or ROCm), xla or cpu")


@dataclass(frozen=True)
class Ops:
    """One implementation of every op the model and engine call on the hot path (same signatures either way)."""

    kernels: Literal["triton", "torch"]
    rms_norm: Callable[..., torch.Tensor]
    residual_rms_norm: Callable[..., torch.Tensor]
    norm_rope: Callable[..., torch.Tensor]
    gelu_mul: Callable[..., torch.Tensor]
    per_layer_inputs: Callable[..., torch.Tensor]
    softcap_logits: Callable[..., torch.Tensor]
    write_kv_normed: Callable[..., None]
    attention_plan: Callable[..., Any]
    paged_attention: Callable[..., torch.Tensor]
    moe_route: Callable[..., tuple[torch.Tensor, torch.Tensor]]
    moe_experts: Callable[..., torch.Tensor]
    sample_draw: Callable[..., torch.Tensor]


def _op_set(kernels: Literal["triton", "torch"], norms: Any, kv_write: Any, attention: Any, plan: Callable, moe: Any,
            sampling: Any) -> Ops:
    """An op set from modules that share the op names (norms and the KV write, attention, MoE, sampling)."""
    return Ops(
        kernels=kernels,
        rms_norm=norms.rms_norm,
        residual_rms_norm=norms.residual_rms_norm,
        norm_rope=norms.norm_rope,
        gelu_mul=norms.gelu_mul,
        per_layer_inputs=norms.per_layer_inputs,
        softcap_logits=norms.softcap_logits,
        write_kv_normed=kv_write.write_kv_normed,
        attention_plan=plan,
        paged_attention=attention.paged_attention,
        moe_route=moe.route,
        moe_experts=moe.moe_experts,
        sample_draw=sampling.draw,
    )


@functools.cache
def reference_ops() -> Ops:
    """The torch reference ops (CPU, XLA, and the oracle everywhere)."""
    from gemma4.ops import moe, norms, paged_attention, sampling

    return _op_set("torch", norms, norms, paged_attention, paged_attention.group_metadata, moe, sampling)


@functools.cache
def triton_ops() -> Ops:
    """The Triton kernels (imported only here: the reference path never needs triton)."""
    from gemma4.kernels import kv_write, moe, norms, paged_attention, sampling

    return _op_set("triton", norms, kv_write, paged_attention, paged_attention.attention_plan, moe, sampling)


def select_ops(device: torch.device | str, kernels: KernelChoice = "auto") -> Ops:
    """The ops for `device`: `auto` = the backend's default; `triton` on a CPU needs the interpreter."""
    if kernels not in KERNEL_CHOICES:
        raise ValueError(f"kernels must be one of {KERNEL_CHOICES}, got {kernels!r}")
    backend = backend_of(device)
    choice = backend.default_kernels if kernels == "auto" else kernels
    if choice == "torch":
        return reference_ops()
    if not backend.triton and not (backend.name == "cpu" and triton_interpreter()):
        raise ValueError(
            f"kernels='triton' needs a CUDA or ROCm device (or, on the CPU, TRITON_INTERPRET=1 set before start); "
            f"this replica runs on {backend.name}"
        )
    return triton_ops()


def default_device() -> str:
    """The device a replica uses when its settings say `auto`: the first GPU (NVIDIA or AMD), else the CPU."""
    return "cuda" if torch.cuda.is_available() else "cpu"
