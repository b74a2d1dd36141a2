"""The XLA suite: our torch ops and model on torch_xla's CPU device, in .venv-xla (see scripts/setup-xla-env).

Run as `scripts/run-tests` does: `PJRT_DEVICE=CPU .venv-xla/bin/python -m pytest tests_xla`. PJRT_DEVICE is
set here too, before torch_xla is imported, so a bare `pytest tests_xla` runs on the CPU device as well.
"""

from __future__ import annotations

import os
from collections.abc import Callable

os.environ.setdefault("PJRT_DEVICE", "CPU")

import pytest  # noqa: E402
import torch  # noqa: E402
import torch_xla  # noqa: E402
import torch_xla.debug.metrics as metrics  # noqa: E402


@pytest.fixture(scope="session")
def xla() -> torch.device:
    return torch_xla.device()


@pytest.fixture
def fallbacks() -> Callable[[], list[str]]:
    """The ops that ran on the host through an aten fallback (ones XLA could not lower) since the test began."""
    metrics.clear_all()
    return metrics.executed_fallback_ops
