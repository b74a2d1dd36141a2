"""What a kernel ships: the exact compilations the launchers use and the AOT check compiles."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

# Pointer element types a launcher may be called with; the AOT check compiles each shipped dtype.
POINTER_TYPES = {"float32": "*fp32", "bfloat16": "*bf16", "float16": "*fp16"}


@dataclass(frozen=True)
class KernelConfig:
    """One compilation of a Triton kernel: its constexprs, launch options and argument types.

    `signature` names every parameter of the kernel, in order, with its Triton type (`"*bf16"`,
    `"*fp32"`, `"*i32"`, `"*i64"`, `"i32"`, `"i64"`, `"fp32"`, or `"constexpr"` for the ones in
    `constexprs`). Launchers pick their constexprs and options from the same tables the
    configurations are built from, so what runs on a GPU is what CI compiled.
    """

    name: str  # kernel and the choices that distinguish this config, e.g. "paged_attention[d=512,bn=32,bf16]"
    kernel: Any  # the @triton.jit function
    signature: Mapping[str, str]
    constexprs: Mapping[str, Any] = field(default_factory=dict)
    num_warps: int = 4
    num_stages: int = 2

    def __post_init__(self) -> None:
        declared = {k for k, v in self.signature.items() if v == "constexpr"}
        if declared != set(self.constexprs):
            raise ValueError(f"{self.name}: constexpr parameters {sorted(declared)} != values given {sorted(self.constexprs)}")
