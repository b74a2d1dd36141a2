"""Ahead-of-time compilation of every shipped kernel configuration for GPUs this machine does not have.

`python -m gemma4.kernels.aot [--target sm_90] [--target gfx942]` compiles each kernel module's
`shipped_configs()` with `triton.compile` for H100/H200 (`sm_90`) and MI300X (`gfx942`) and checks
what only a launch would otherwise reveal: shared memory against the device's limit (232,448 bytes
per block on Hopper, 65,536 bytes of LDS on CDNA3) and register spills (CUDA: local memory or stack
in `cuobjdump -res-usage`; AMD: `.vgpr_spill_count` / `.sgpr_spill_count` in the assembly). It prints
one line per kernel, config, target and alignment and exits non-zero if any compile fails or breaks a
limit.

Each config is compiled twice, as a launch may specialise it: `aligned`, every pointer argument
16-byte aligned (what Triton's JIT assumes for freshly allocated tensors: vectorised, pipelined
loads, more shared memory), and `plain`, no alignment assumed (views at odd offsets: scalar loads,
more registers). Both must fit.

Kernels compiled here must be real `@triton.jit` functions, so the interpreter must be off: when
`TRITON_INTERPRET` is set (as in the test environment) the entry point re-runs itself without it.
"""

from __future__ import annotations

import argparse
import importlib
import os
import re
import subprocess
import sys
import tempfile
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from pathlib import Path

from gemma4.kernels.configs import KernelConfig

# The modules whose kernels ship; each has `shipped_configs() -> list[KernelConfig]`.
KERNEL_MODULES = (
    "gemma4.kernels.paged_attention",
    "gemma4.kernels.kv_write",
    "gemma4.kernels.norms",
    "gemma4.kernels.moe",
    "gemma4.kernels.sampling",
)


@dataclass(frozen=True)
class Target:
    """A compilation target and its per-block shared memory (LDS) limit in bytes."""

    name: str
    backend: str
    arch: int | str
    warp_size: int
    shared_limit: int


TARGETS = {
    "sm_90": Target("sm_90", "cuda", 90, 32, 232_448),
    "gfx942": Target("gfx942", "hip", "gfx942", 64, 65_536),
}


@dataclass(frozen=True)
class CompileResult:
    """What one compilation used, and why it fails if it does."""

    target: str
    kernel: str
    variant: str  # "aligned" or "plain"
    shared: int = 0
    registers: int = 0
    spills: int = 0
    error: str | None = None

    def line(self) -> str:
        status = "ok" if self.error is None else f"FAIL: {self.error}"
        return (
            f"{self.target:7s} {self.kernel:60s} {self.variant:7s} shared={self.shared:>7d} registers={self.registers:>4d} "
            f"spills={self.spills:>4d} {status}"
        )


def shipped_configs() -> list[KernelConfig]:
    """Every configuration of every shipped kernel module."""
    return [cfg for module in KERNEL_MODULES for cfg in importlib.import_module(module).shipped_configs()]


def cuda_resources(res_usage: str) -> tuple[int, int]:
    """(registers, spilled bytes) from `cuobjdump -res-usage` of a one-kernel cubin: spills are the
    thread's local memory plus its stack frame, which ptxas uses only when registers run out."""
    match = re.search(r"REG:(\d+)\s+STACK:(\d+)\s+SHARED:\d+\s+LOCAL:(\d+)", res_usage)
    if match is None:
        raise ValueError(f"no resource usage in cuobjdump output: {res_usage!r}")
    registers, stack, local = (int(g) for g in match.groups())
    return registers, stack + local


def amd_resources(amdgcn: str) -> tuple[int, int]:
    """(VGPRs, spilled registers) from the kernel metadata in AMDGCN assembly."""

    def field(name: str) -> int:
        match = re.search(rf"\.{name}:\s+(\d+)", amdgcn)
        if match is None:
            raise ValueError(f"no .{name} in the AMDGCN metadata")
        return int(match.group(1))

    return field("vgpr_count"), field("vgpr_spill_count") + field("sgpr_spill_count")


def check_limits(target: Target, kernel: str, variant: str, shared: int, registers: int, spills: int) -> CompileResult:
    """The result of a compile that succeeded, failed if it breaks the target's limits."""
    problems = []
    if shared > target.shared_limit:
        problems.append(f"shared memory {shared} > {target.shared_limit}")
    if spills:
        problems.append(f"{spills} spilled")
    return CompileResult(target.name, kernel, variant, shared, registers, spills, "; ".join(problems) or None)


VARIANTS = ("aligned", "plain")


def alignment_attrs(cfg: KernelConfig, variant: str) -> dict[tuple[int], list[list]]:
    """Triton's specialisation attributes for `variant`: 16-byte divisibility of every pointer when aligned."""
    if variant == "plain":
        return {}
    return {(i,): [["tt.divisibility", 16]] for i, kind in enumerate(cfg.signature.values()) if kind.startswith("*")}


def compile_config(cfg: KernelConfig, target_name: str, variant: str = "aligned") -> CompileResult:
    """Compile one configuration for one target and alignment, and check it."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    target = TARGETS[target_name]
    try:
        kernel = triton.compile(
            ASTSource(cfg.kernel, dict(cfg.signature), dict(cfg.constexprs), alignment_attrs(cfg, variant)),
            target=GPUTarget(target.backend, target.arch, target.warp_size),
            options={"num_warps": cfg.num_warps, "num_stages": cfg.num_stages},
        )
        if target.backend == "cuda":
            registers, spills = cuda_resources(_res_usage(kernel.asm["cubin"]))
        else:
            registers, spills = amd_resources(kernel.asm["amdgcn"])
    except Exception as exc:  # a compile error is a result to report, not a crash of the check
        return CompileResult(target_name, cfg.name, variant, error=f"{type(exc).__name__}: {str(exc).splitlines()[0][:200]}")
    return check_limits(target, cfg.name, variant, kernel.metadata.shared, registers, spills)


def _res_usage(cubin: bytes) -> str:
    import triton.backends.nvidia

    tool = Path(triton.backends.nvidia.__file__).parent / "bin" / "cuobjdump"
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(cubin)
        f.flush()
        return subprocess.run([str(tool), "-res-usage", f.name], capture_output=True, text=True, check=True).stdout


def _compile_indexed(job: tuple[int, str, str]) -> CompileResult:
    """Worker entry: configs are rebuilt in the worker (jit functions travel badly), picked by index."""
    index, target, variant = job
    return compile_config(shipped_configs()[index], target, variant)


def run(targets: list[str], jobs: int) -> list[CompileResult]:
    """Compile every shipped config for every target and alignment, `jobs` compiles at a time."""
    work = [(i, t, v) for t in targets for i in range(len(shipped_configs())) for v in VARIANTS]
    if jobs <= 1:
        return [_compile_indexed(job) for job in work]
    with ProcessPoolExecutor(max_workers=jobs) as pool:
        return list(pool.map(_compile_indexed, work))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m gemma4.kernels.aot", description=__doc__.splitlines()[0])
    parser.add_argument("--target", action="append", choices=sorted(TARGETS), help="repeatable; default: all")
    parser.add_argument("--jobs", type=int, default=os.cpu_count() or 1, help="parallel compiles")
    args = parser.parse_args(argv)
    results = run(args.target or sorted(TARGETS), max(1, args.jobs))
    for result in results:
        print(result.line())
    failed = [r for r in results if r.error is not None]
    print(f"{len(results) - len(failed)} of {len(results)} compilations within limits")
    return 1 if failed else 0


if __name__ == "__main__":
    if os.environ.get("TRITON_INTERPRET"):
        env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
        os.execve(sys.executable, [sys.executable, "-m", "gemma4.kernels.aot", *sys.argv[1:]], env)
    sys.exit(main())
