"""The benchmark scripts run (tiny settings) and report what RESULTS.md records."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


@pytest.mark.parametrize("variant", ["e2b", "26b-a4b"])
def test_offline_throughput_script(variant: str) -> None:
    cmd = [
        sys.executable, "benchmarks/offline_throughput.py", "--variant", variant, "--tiny", "--dtype", "fp32",
        "--num-prompts", "3", "--input-len", "20", "--output-len", "4",
    ]
    env = {**os.environ, "PYTHONPATH": str(REPO / "model")}
    out = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=300, check=True)
    result = json.loads(out.stdout)
    assert result["num_prompts"] == 3 and result["output_tokens_per_s"] > 0
    assert result["variant"] == f"{variant} (tiny)"
