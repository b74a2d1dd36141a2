"""The AOT check: every shipped kernel config compiles for sm_90 and gfx942 within limits, and the check fails when it should."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from gemma4.kernels.aot import TARGETS, amd_resources, check_limits, cuda_resources

ROOT = Path(__file__).resolve().parent.parent


def _compiler_env() -> dict[str, str]:
    """This environment without the interpreter (AOT compiles real kernels) and with the project importable."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT / "model"), str(ROOT / "tests")])
    return env


def test_every_shipped_config_compiles_for_both_targets() -> None:
    """The acceptance command itself, with TRITON_INTERPRET set as in CI: it must re-run without it."""
    env = {**_compiler_env(), "TRITON_INTERPRET": "1"}
    proc = subprocess.run(
        [sys.executable, "-m", "gemma4.kernels.aot", "--target", "sm_90", "--target", "gfx942"],
        capture_output=True, text=True, env=env, timeout=1800,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    lines = proc.stdout.splitlines()
    listing = subprocess.run(
        [sys.executable, "-c", "from gemma4.kernels.aot import shipped_configs; print('\\n'.join(c.name for c in shipped_configs()))"],
        capture_output=True, text=True, env=_compiler_env(), check=True,
    ).stdout.split()
    assert len(listing) == len(set(listing)), "config names must be unique"
    for target in ("sm_90", "gfx942"):
        compiled = {tuple(line.split()[1:3]) for line in lines if line.startswith(target) and line.endswith(" ok")}
        assert compiled == {(name, variant) for name in listing for variant in ("aligned", "plain")}
    kernels = {name.split("[")[0] for name in listing}
    assert len(kernels) >= 8, kernels


def test_spills_fail_the_check() -> None:
    """A tile too large for one warp's registers: spills on both targets, so the check reports failure."""
    code = (
        "from aot_probe_kernel import config\n"
        "from gemma4.kernels.aot import compile_config\n"
        "for target in ('sm_90', 'gfx942'):\n"
        "    print(compile_config(config(32, 4), target, 'plain').line())\n"
        "    print(compile_config(config(64, 1), target, 'plain').line())\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=_compiler_env(), check=True).stdout
    lines = out.splitlines()
    assert [line.endswith(" ok") for line in lines] == [True, False, True, False], out
    assert all("spilled" in line for line in lines[1::2])


def test_shared_memory_limits() -> None:
    for name, target in TARGETS.items():
        assert check_limits(target, "k", "aligned", target.shared_limit, 64, 0).error is None
        over = check_limits(target, "k", "aligned", target.shared_limit + 1, 64, 0)
        assert over.error is not None and "shared memory" in over.error, name


def test_resource_parsers() -> None:
    res = " Function add:\n  REG:8 STACK:0 SHARED:0 LOCAL:0 CONSTANT[0]:568 TEXTURE:0 SURFACE:0 SAMPLER:0\n"
    assert cuda_resources(res) == (8, 0)
    assert cuda_resources(res.replace("STACK:0", "STACK:16").replace("LOCAL:0", "LOCAL:8")) == (8, 24)
    asm = "    .sgpr_spill_count: 2\n    .vgpr_count:     40\n    .vgpr_spill_count: 3\n"
    assert amd_resources(asm) == (40, 5)
    with pytest.raises(ValueError):
        cuda_resources("nothing here")
