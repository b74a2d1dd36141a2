"""On an XLA device the backend layer picks the torch reference ops and its device operations run."""

from __future__ import annotations

import torch

from gemma4.backends import XLA, backend_of, reference_ops, select_ops


def test_an_xla_device_runs_the_torch_ops(xla: torch.device) -> None:
    assert xla.type == "xla" and backend_of(xla) is XLA and backend_of(torch.device("xla")) is XLA
    assert select_ops(xla) is reference_ops() and select_ops(xla, "torch") is reference_ops()
    assert not XLA.multi_device and XLA.event() is None and XLA.indexed(xla) == xla


def test_device_operations_on_xla(xla: torch.device) -> None:
    x = torch.arange(6, device=xla) * 2
    XLA.synchronize(xla)  # runs the pending graph and waits for it
    assert XLA.to_host(x).device == torch.device("cpu") and XLA.to_host(x).tolist() == [0, 2, 4, 6, 8, 10]
    assert XLA.peak_memory_bytes(xla) is None and XLA.device_memory_bytes(xla) is None
