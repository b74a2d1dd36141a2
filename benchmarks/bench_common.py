"""Helpers the benchmark scripts share: percentiles, comma lists and a description of the machine.

Standard library only: `cpu_engines.py` also runs in the vLLM venv, which has no gemma4.
"""

from __future__ import annotations

import math
import os
import platform
from typing import Sequence


def percentile(values: Sequence[float], q: float) -> float:
    """The nearest-rank `q`-th percentile (0 < q <= 100) of a non-empty sample."""
    if not values:
        raise ValueError("percentile of an empty sample")
    ordered = sorted(values)
    return ordered[max(0, math.ceil(q / 100 * len(ordered)) - 1)]


def int_list(text: str) -> list[int]:
    """`"1,16,32"` -> [1, 16, 32] (argparse type)."""
    return [int(part) for part in text.split(",") if part]


def str_list(text: str) -> list[str]:
    """`"ours,transformers"` -> ["ours", "transformers"] (argparse type)."""
    return [part.strip() for part in text.split(",") if part.strip()]


def machine() -> dict[str, object]:
    """What the figures were measured on: CPU model, core count, Python."""
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next((line.split(":", 1)[1].strip() for line in f if line.startswith("model name")), cpu)
    except OSError:
        pass
    return {"cpu": cpu, "cores": os.cpu_count(), "python": platform.python_version()}
