"""A deliberately register-hungry kernel for the AOT check's own test (compiled, never launched)."""

import triton
import triton.language as tl

from gemma4.kernels.configs import KernelConfig


@triton.jit
def tile_product(a_ptr, b_ptr, c_ptr, K, BLOCK: tl.constexpr):
    offs = tl.arange(0, BLOCK)
    acc = tl.zeros((BLOCK, BLOCK), dtype=tl.float32)
    for k in range(0, K, BLOCK):
        a = tl.load(a_ptr + offs[:, None] * K + k + offs[None, :])
        b = tl.load(b_ptr + (k + offs[:, None]) * BLOCK + offs[None, :])
        acc += tl.dot(a, b)
    tl.store(c_ptr + offs[:, None] * BLOCK + offs[None, :], acc)


def config(block: int, num_warps: int) -> KernelConfig:
    signature = {"a_ptr": "*fp16", "b_ptr": "*fp16", "c_ptr": "*fp32", "K": "i32", "BLOCK": "constexpr"}
    return KernelConfig(f"tile_product[{block},w{num_warps}]", tile_product, signature, {"BLOCK": block}, num_warps)
