"""One place picks the ops: Triton kernels on CUDA and ROCm, torch reference ops on the CPU and XLA."""

from __future__ import annotations

import pytest
import torch

from gemma4.backends import backend_of, reference_ops, select_ops, triton_ops
from gemma4.engine import EngineArgs


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
