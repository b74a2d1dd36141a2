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
import platform
from dataclasses import dataclass
from typing import Any, Callable, ContextManager, Literal

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
    `pinned_memory`: host staging buffers are page-locked, so copies between host and device are
    asynchronous and ordered by the device's stream (events and stream synchronisation, below).
    `dtypes`: the weight and activation dtypes the engine serves on it. `grouped_mm`:
    `torch._grouped_mm` runs here in bf16 (NVIDIA only; ROCm builds lack it). `host_memory`: the
    device's memory is the host's, so host buffers serve as device buffers without a copy.
    `lazy`: ops are traced into graphs that run when a result is needed (XLA): such a device has no
    generators of its own and no inference tensors (in-place copies into them fail).

    The methods are the device operations the engine and benchmarks need, so that no caller
    branches on a device type itself.
    """

    name: Literal["cuda", "rocm", "xla", "cpu", "meta"]
    triton: bool  # Triton kernels compile and run here natively
    cuda_graphs: bool  # decode steps can be captured and replayed
    collectives: Literal["nccl", "gloo"] | None
    pinned_memory: bool
    dtypes: tuple[torch.dtype, ...]
    grouped_mm: bool = False
    host_memory: bool = False
    lazy: bool = False

    @property
    def default_kernels(self) -> Literal["triton", "torch"]:
        return "triton" if self.triton else "torch"

    @property
    def multi_device(self) -> bool:
        """Whether a replica may span several devices of this backend."""
        return self.collectives is not None

    @property
    def _torch_cuda(self) -> bool:
        """Whether torch drives this backend through `torch.cuda` (NVIDIA, and ROCm through HIP)."""
        return self.name in ("cuda", "rocm")

    def inference(self) -> ContextManager[None]:
        """The no-autograd context a step runs in: inference mode where the device has inference tensors."""
        return torch.no_grad() if self.lazy else torch.inference_mode()

    def generator_device(self, device: torch.device | str) -> torch.device:
        """Where a seeded generator for `device`'s random tensors lives (lazy devices draw on the host)."""
        return torch.device("cpu") if self.lazy else torch.device(device)

    def device_memory_bytes(self, device: torch.device | str) -> int | None:
        """The device's total memory, or None where torch does not report it (the CPU, XLA)."""
        if self._torch_cuda:
            return torch.cuda.get_device_properties(torch.device(device)).total_memory
        return None

    def device_name(self, device: torch.device | str) -> str:
        """The device's product name for reports: the GPU's, the host processor's, else the backend's name."""
        if self._torch_cuda:
            return torch.cuda.get_device_name(torch.device(device))
        if self.host_memory:
            return platform.processor() or self.name
        return self.name

    def indexed(self, device: torch.device | str) -> torch.device:
        """`device` with its index made explicit on GPUs ("cuda" -> the current device), so that
        tensors created later compare equal to it; other devices are returned as given."""
        device = torch.device(device)
        if self._torch_cuda and device.index is None:
            return torch.device(device.type, torch.cuda.current_device())
        return device

    def event(self, timing: bool = False) -> torch.cuda.Event | None:
        """A stream event (with `timing`, one that measures elapsed time), or None where work is not
        queued on streams the host can wait on (the CPU runs eagerly; XLA syncs explicitly)."""
        return torch.cuda.Event(enable_timing=timing) if self._torch_cuda else None

    def synchronize(self, device: torch.device | str) -> None:
        """Wait until the work queued on `device` has finished (XLA: run the pending graph first)."""
        if self._torch_cuda:
            torch.cuda.synchronize(torch.device(device))
        elif self.name == "xla":
            import torch_xla

            torch_xla.sync(wait=True)

    def to_host(self, tensor: torch.Tensor) -> torch.Tensor:
        """`tensor` copied to the host: asynchronously into pinned memory where the backend pins,
        then one wait on the current stream, else a plain blocking copy."""
        if not self.pinned_memory:
            return tensor.cpu()
        host = tensor.to("cpu", non_blocking=True)
        torch.cuda.current_stream(tensor.device).synchronize()
        return host

    def reset_peak_memory(self, device: torch.device | str) -> None:
        """Start a new peak for `peak_memory_bytes` (a no-op where the allocator keeps no statistics)."""
        if self._torch_cuda:
            torch.cuda.reset_peak_memory_stats(torch.device(device))

    def peak_memory_bytes(self, device: torch.device | str) -> int | None:
        """The allocator's peak since the last reset, or None where it keeps no statistics."""
        return torch.cuda.max_memory_allocated(torch.device(device)) if self._torch_cuda else None

    def release_cached_memory(self) -> None:
        """Return the caching allocator's free blocks to the device (GPUs; a no-op elsewhere)."""
        if self._torch_cuda:
            torch.cuda.empty_cache()

    def check_dtype(self, dtype: torch.dtype) -> None:
        if dtype not in self.dtypes:
            names = ", ".join(str(d).removeprefix("torch.") for d in self.dtypes)
            raise ValueError(f"{self.name} serves {names}; got {str(dtype).removeprefix('torch.')}")


_FLOATS = (torch.float32, torch.bfloat16, torch.float16)
CUDA = Backend(
    "cuda", triton=True, cuda_graphs=True, collectives="nccl", pinned_memory=True, dtypes=_FLOATS, grouped_mm=True
)
ROCM = Backend("rocm", triton=True, cuda_graphs=True, collectives="nccl", pinned_memory=True, dtypes=_FLOATS)
XLA = Backend(
    "xla", triton=False, cuda_graphs=False, collectives=None, pinned_memory=False, dtypes=_FLOATS, lazy=True
)
CPU = Backend(
    "cpu", triton=False, cuda_graphs=False, collectives="gloo", pinned_memory=False, dtypes=_FLOATS, host_memory=True
)
# Meta tensors carry shapes and no values: what shape-only checks and traces run the torch ops on.
META = Backend("meta", triton=False, cuda_graphs=False, collectives=None, pinned_memory=False, dtypes=_FLOATS)


def rocm_build() -> bool:
    """Whether this torch is a ROCm build (its GPUs report device type "cuda"; torch.version.hip tells them apart)."""
    return torch.version.hip is not None


def backend_of(device: torch.device | str) -> Backend:
    """The backend of `device` (a "cuda" device is ROCm's on a ROCm build of torch)."""
    kind = torch.device(device).type
    if kind == "cuda":
        return ROCM if rocm_build() else CUDA
    if kind == "xla":
        return XLA
    if kind == "cpu":
        return CPU
    if kind == "meta":
        return META
    raise ValueError(f"unsupported device type {kind!r}: expected cuda (NVIDIA or ROCm), xla, cpu or meta")


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
