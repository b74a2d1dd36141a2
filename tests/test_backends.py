"""One place knows devices: each backend's capabilities and device operations, the ops it picks (Triton
kernels on CUDA and ROCm, torch reference ops on the CPU and XLA), and no device-string tests elsewhere."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import torch

from gemma4.backends import CPU, CUDA, META, ROCM, XLA, backend_of, reference_ops, select_ops, triton_ops
from gemma4.engine import EngineArgs
from gemma4.kernels.paged_attention import vendor
from gemma4.ops.moe import formulation

ROOT = Path(__file__).resolve().parent.parent


def test_backends_and_their_default_ops(monkeypatch: pytest.MonkeyPatch) -> None:
    assert backend_of("cpu").name == "cpu" and backend_of("xla").name == "xla"
    assert select_ops("cpu") is reference_ops() and select_ops("xla") is reference_ops()
    cuda = backend_of("cuda")
    assert (cuda.name, cuda.triton, cuda.cuda_graphs) == ("cuda", True, True)
    assert select_ops("cuda") is triton_ops()
    monkeypatch.setattr(torch.version, "hip", "6.4")  # a ROCm build reports device type "cuda"
    assert backend_of("cuda").name == "rocm" and select_ops("cuda") is triton_ops()
    assert select_ops("cuda", "torch") is reference_ops()
    with pytest.raises(ValueError, match="unsupported device type"):
        backend_of("mps")


def test_triton_on_a_cpu_needs_the_interpreter(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    assert select_ops("cpu", "triton").kernels == "triton"
    monkeypatch.delenv("TRITON_INTERPRET")
    with pytest.raises(ValueError, match="TRITON_INTERPRET=1"):
        select_ops("cpu", "triton")
    with pytest.raises(ValueError, match="xla"):
        select_ops("xla", "triton")
    with pytest.raises(ValueError, match="kernels must be one of"):
        select_ops("cpu", "cuda")  # type: ignore[arg-type]


def test_every_op_has_both_implementations() -> None:
    ref, kern = reference_ops(), triton_ops()
    for name in ref.__dataclass_fields__:
        if name != "kernels":
            assert getattr(ref, name).__module__.startswith("gemma4.ops."), name
            assert getattr(kern, name).__module__.startswith("gemma4.kernels."), name
            assert getattr(ref, name).__name__ == getattr(kern, name).__name__ or name == "attention_plan", name


def test_engine_args_validate_kernels() -> None:
    assert EngineArgs().kernels == "auto"
    with pytest.raises(ValueError, match="kernels must be one of"):
        EngineArgs(kernels="fast")  # type: ignore[arg-type]


def test_each_backends_capabilities() -> None:
    fields = ("triton", "cuda_graphs", "collectives", "pinned_memory", "grouped_mm", "host_memory", "multi_device")
    expected = {
        CUDA: (True, True, "nccl", True, True, False, True),
        ROCM: (True, True, "nccl", True, False, False, True),
        XLA: (False, False, None, False, False, False, False),
        CPU: (False, False, "gloo", False, False, True, True),
        META: (False, False, None, False, False, False, False),
    }
    for backend, capabilities in expected.items():
        assert tuple(getattr(backend, f) for f in fields) == capabilities, backend.name
        assert backend.dtypes == (torch.float32, torch.bfloat16, torch.float16)
    CPU.check_dtype(torch.bfloat16)
    with pytest.raises(ValueError, match="xla serves float32, bfloat16, float16; got int8"):
        XLA.check_dtype(torch.int8)


def test_rocm_is_told_apart_by_torch_version_hip(monkeypatch: pytest.MonkeyPatch) -> None:
    """A ROCm build's GPUs are "cuda" devices: the backend, the MoE formulation and the tile table follow hip."""
    cuda = torch.device("cuda")
    monkeypatch.setattr(torch.version, "hip", None)
    assert backend_of(cuda) is CUDA and backend_of("cuda:1") is CUDA and vendor() == "cuda"
    assert formulation(9, 8, 16, 8, torch.bfloat16, cuda) == "grouped"
    monkeypatch.setattr(torch.version, "hip", "6.4")
    assert backend_of(cuda) is ROCM and backend_of("cuda:1") is ROCM and vendor() == "hip"
    assert formulation(9, 8, 16, 8, torch.bfloat16, cuda) == "dense"  # ROCm builds lack _grouped_mm
    assert backend_of("cpu") is CPU and backend_of(torch.device("xla", 0)) is XLA and backend_of("meta") is META


def test_device_operations_on_the_cpu() -> None:
    """The CPU runs eagerly in host memory: no events, no statistics, plain copies, devices as given."""
    assert CPU.event() is None and CPU.event(timing=True) is None and XLA.event() is None
    CPU.synchronize("cpu")
    assert CPU.peak_memory_bytes("cpu") is None and CPU.device_memory_bytes("cpu") is None
    CPU.reset_peak_memory("cpu")
    CPU.release_cached_memory()
    assert CPU.indexed("cpu") == torch.device("cpu") and XLA.indexed("xla") == torch.device("xla")
    assert CPU.device_name("cpu") and XLA.device_name("xla") == "xla"
    x = torch.arange(4)
    assert torch.equal(CPU.to_host(x), x)


def test_gpu_device_operations_go_through_torch_cuda(monkeypatch: pytest.MonkeyPatch) -> None:
    """NVIDIA and ROCm share torch.cuda: the calls each operation makes, recorded without a GPU."""
    calls: list[tuple] = []

    class Stream:
        def synchronize(self) -> None:
            calls.append(("stream.synchronize",))

    monkeypatch.setattr(torch.cuda, "current_device", lambda: 3)
    monkeypatch.setattr(torch.cuda, "synchronize", lambda device=None: calls.append(("synchronize", device)))
    monkeypatch.setattr(torch.cuda, "current_stream", lambda device=None: Stream())
    monkeypatch.setattr(torch.cuda, "max_memory_allocated", lambda device=None: 123)
    monkeypatch.setattr(torch.cuda, "reset_peak_memory_stats", lambda device=None: calls.append(("reset", device)))
    monkeypatch.setattr(torch.cuda, "empty_cache", lambda: calls.append(("empty_cache",)))
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: "NVIDIA H100 80GB HBM3")
    for backend in (CUDA, ROCM):
        calls.clear()
        assert backend.indexed("cuda") == torch.device("cuda", 3) and backend.indexed("cuda:1") == torch.device("cuda", 1)
        backend.synchronize("cuda:1")
        backend.reset_peak_memory("cuda:1")
        backend.release_cached_memory()
        assert backend.peak_memory_bytes("cuda:1") == 123
        assert backend.device_name("cuda:1") == "NVIDIA H100 80GB HBM3"
        host = backend.to_host(torch.arange(3))  # a CPU tensor stands in for the device's
        assert host.tolist() == [0, 1, 2]
        one = torch.device("cuda", 1)
        assert calls == [("synchronize", one), ("reset", one), ("empty_cache",), ("stream.synchronize",)]


# Device-string tests: a device type compared or probed, torch.version.hip, is_cuda, device-name prefixes.
DEVICE_TEST = re.compile(
    r"""\bdevice\.type\b|torch\.version\.hip|torch\.cuda\.is_available|\.is_(cuda|xla|cpu)\b"""
    r"""|startswith\(\s*["'](cuda|xla|cpu|hip)|(==|!=|\bis\b)\s*["'](cuda|xla|cpu|hip|rocm)["']"""
    r"""|["'](cuda|xla|cpu|hip|rocm)["']\s*(==|!=|\bin\b)"""
)
# Files that still test device strings, until their rewrites land.
# A Triton compile target names a GPU architecture to build for, not the device this process runs on.
COMPILE_TARGETS = {"model/gemma4/kernels/aot.py": 'if target.backend == "cuda":'}


def device_tests() -> dict[str, list[str]]:
    """File -> its lines that test device strings, over the shipped code (backends.py excepted)."""
    found: dict[str, list[str]] = {}
    for root in ("model", "platform", "operators", "benchmarks"):
        for path in sorted((ROOT / root).rglob("*.py")):
            name = path.relative_to(ROOT).as_posix()
            lines = [line.strip() for line in path.read_text().splitlines() if DEVICE_TEST.search(line)]
            if lines and name != "model/gemma4/backends.py":
                found[name] = lines
    return found


def test_the_device_string_pattern() -> None:
    for line in ('if device.type == "cuda":', "torch.version.hip is None", 'args.device.startswith("cuda")',
                 'if device == "cpu" and n:', 'x.is_cuda', '"cuda" if torch.cuda.is_available() else "cpu"'):
        assert DEVICE_TEST.search(line), line
    for line in ("get_accelerator(spec.accelerator.type)", """'.status.conditions[?(@.type=="Ready")].status'""",
                 'parser.add_argument("--device", default="cuda")', "backend_of(device).pinned_memory"):
        assert not DEVICE_TEST.search(line), line


def test_no_device_string_tests_outside_backends() -> None:
    found = device_tests()
    assert found.pop("model/gemma4/kernels/aot.py", None) == [COMPILE_TARGETS["model/gemma4/kernels/aot.py"]]
    assert "model/gemma4/backends.py" not in found
    assert not found, f"ask gemma4.backends (backend_of(device)) instead: {found}"
