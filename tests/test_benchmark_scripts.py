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


def test_platform_load_script() -> None:
    cmd = [
        sys.executable, "benchmarks/platform_load.py", "--concurrency", "2", "--requests-per-level", "3",
        "--input-len", "8", "--output-len", "3",
    ]
    env = {**os.environ, "PYTHONPATH": f"{REPO / 'model'}:{REPO / 'platform'}", "RAY_AUTH_MODE": "disabled"}
    env.pop("RAY_ADDRESS", None)
    out = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=300, check=True)
    report = json.loads(out.stdout[out.stdout.index("{\n"):])
    for side in ("engine", "stack"):
        assert report[side][0]["requests"] == 3 and report[side][0]["output_tokens_per_s"] > 0
