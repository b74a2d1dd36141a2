"""The Triton MoE kernels equal the reference ops (fp32, Triton's CPU interpreter).

Routing: top-k weights and indices of random logits. Experts: both tile sets (decode, N <= 16, and
prefill), routes that leave experts empty, a hot expert spanning several M-blocks, experts repeated
within a token (more assignments than one decode M-block), k = 1 and 8, sizes that no tile divides.
Alignment is checked against a plain construction, and both public functions under torch.compile.
"""

from __future__ import annotations

import os

os.environ.setdefault("TRITON_INTERPRET", "1")  # before triton kernels are defined

import pytest  # noqa: E402
import torch  # noqa: E402

from gemma4.kernels import moe as kernel  # noqa: E402
from gemma4.modeling import Router  # noqa: E402
from gemma4.ops import moe as ref  # noqa: E402
from gemma4.tiny import tiny_config  # noqa: E402

E = 16


def random_route(n: int, k: int, num_experts: int, seed: int, *, avoid: int = 0, hot: bool = False) -> torch.Tensor:
    """`[n, k]` distinct experts per token, as a router picks them, never the last `avoid` experts.

    `hot` puts expert 0 among every token's choices.
    """
    gen = torch.Generator().manual_seed(seed)
    scores = torch.rand(n, num_experts, generator=gen)
    scores[:, num_experts - avoid:] = -1.0
    if hot:
        scores[:, 0] = 2.0
    return torch.topk(scores, k, dim=-1).indices


def expert_inputs(
    experts: torch.Tensor, hidden: int, intermediate: int, seed: int, dtype: torch.dtype = torch.float32
) -> tuple[torch.Tensor, ...]:
    """Tokens, fp32 weights and expert matrices for the routes `experts`."""
    gen = torch.Generator().manual_seed(seed)
    n, k = experts.shape
    x = torch.randn(n, hidden, generator=gen).to(dtype)
    weights = torch.rand(n, k, generator=gen)
    gate_up_proj = (torch.randn(E, 2 * intermediate, hidden, generator=gen) * hidden**-0.5).to(dtype)
    down_proj = (torch.randn(E, hidden, intermediate, generator=gen) * intermediate**-0.5).to(dtype)
    return x, weights, experts, gate_up_proj, down_proj


@pytest.mark.parametrize(
    ("n", "num_experts", "k", "dtype"),
    [(1, E, 8, torch.float32), (37, E, 4, torch.float32), (5, 128, 8, torch.float32), (20, 128, 1, torch.float32),
     (19, 128, 8, torch.bfloat16)],
)
def test_route_equals_the_reference(n: int, num_experts: int, k: int, dtype: torch.dtype) -> None:
    gen = torch.Generator().manual_seed(n)
    # Distinct logits in every row (torch.topk orders ties arbitrarily): multiples of 1/16, exact in bf16.
    ranks = torch.stack([torch.randperm(num_experts, generator=gen) for _ in range(n)])
    scores = ((ranks - num_experts / 2) / 16).to(dtype)
    scale = (torch.rand(num_experts, generator=gen) + 0.5).to(dtype)
    weights, experts = kernel.route(scores, scale, k)
    ref_weights, ref_experts = ref.route(scores, scale, k)
    assert weights.dtype == torch.float32 and experts.dtype == torch.int64
    torch.testing.assert_close(experts, ref_experts, atol=0, rtol=0)
    torch.testing.assert_close(weights, ref_weights, atol=1e-6, rtol=0)


def test_reference_route_is_the_router_tail() -> None:
    config = tiny_config("26b-a4b").text
    torch.manual_seed(0)
    router = Router(config)
    with torch.no_grad():
        router.per_expert_scale.uniform_(0.5, 1.5)
        x = torch.randn(7, config.hidden_size)
        scores = router.proj(router.norm(x) * router.scale * router.input_scale)
        expected = router(x)
        got = ref.route(scores, router.per_expert_scale, config.top_k_experts)
    torch.testing.assert_close(got, expected, atol=0, rtol=0)


@pytest.mark.parametrize("n", [1, 3, 16, 40])
def test_expert_counts_equal_a_bincount(n: int) -> None:
    experts = random_route(n, 8, E, seed=n, avoid=3)
    counts = kernel.expert_counts(experts, E)
    assert counts.dtype == torch.int32
    torch.testing.assert_close(counts.long(), torch.bincount(experts.flatten(), minlength=E), atol=0, rtol=0)


@pytest.mark.parametrize(("n", "k", "block_m"), [(1, 8, 16), (16, 8, 16), (40, 8, 64), (5, 8, 4)])
def test_alignment_sorts_stably_into_expert_blocks(n: int, k: int, block_m: int) -> None:
    experts = random_route(n, k, E, seed=n, avoid=3) if n != 5 else torch.randint(0, 3, (n, k))  # repeats
    sorted_ids, block_expert, counts = kernel.align(experts, E, block_m)
    flat = experts.flatten()
    num_assignments = flat.numel()
    expected_ids: list[int] = []
    expected_blocks: list[int] = []
    for e in range(E):
        ids = (flat == e).nonzero().flatten().tolist()  # ascending: stable within the expert
        padded = -(-len(ids) // block_m) * block_m
        expected_ids += ids + [num_assignments] * (padded - len(ids))
        expected_blocks += [e] * (padded // block_m)
    blocks = kernel.num_blocks(num_assignments, E, block_m)
    assert len(expected_blocks) <= blocks
    expected_ids += [num_assignments] * (blocks * block_m - len(expected_ids))
    expected_blocks += [E] * (blocks - len(expected_blocks))
    assert sorted_ids.tolist() == expected_ids
    assert block_expert.tolist() == expected_blocks
    assert counts.tolist() == torch.bincount(flat, minlength=E).tolist()


CASES = {
    # name: (n, k, hidden, intermediate, route options)
    "decode-1": (1, 8, 128, 64, {"avoid": 3}),
    "decode-3-k1": (3, 1, 32, 16, {}),
    "decode-16-hot": (16, 8, 128, 64, {"avoid": 4, "hot": True}),  # one full M-block of 16 for expert 0
    "decode-odd-sizes": (5, 8, 48, 40, {"avoid": 2}),  # no tile divides H or I
    "prefill-17": (17, 8, 64, 32, {"avoid": 3}),
    "prefill-40": (40, 8, 128, 64, {"avoid": 5}),
    "prefill-hot-k1": (150, 1, 32, 16, {"hot": True}),  # 150 assignments to expert 0: three M-blocks of 64
    "prefill-odd-sizes": (40, 2, 48, 40, {"hot": True}),
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_moe_experts_equals_the_reference(case: str) -> None:
    n, k, hidden, intermediate, options = CASES[case]
    inputs = expert_inputs(random_route(n, k, E, seed=n, **options), hidden, intermediate, seed=k)
    torch.testing.assert_close(kernel.moe_experts(*inputs), ref.moe_experts(*inputs), atol=1e-5, rtol=0)


def test_moe_experts_with_repeated_experts_overflowing_a_decode_block() -> None:
    """Rows that repeat an expert (no router does) give expert 0..2 up to 32 assignments: still exact."""
    experts = torch.randint(0, 3, (4, 8), generator=torch.Generator().manual_seed(0))
    inputs = expert_inputs(experts, 32, 16, seed=0)
    torch.testing.assert_close(kernel.moe_experts(*inputs), ref.moe_experts(*inputs), atol=1e-5, rtol=0)


def test_moe_experts_in_fp16_rounds_like_the_reference() -> None:
    """fp16 is exact in the interpreter: the kernel rounds where the reference materialises tensors."""
    inputs = expert_inputs(random_route(6, 8, E, seed=6, avoid=3), 64, 32, seed=1, dtype=torch.float16)
    out = kernel.moe_experts(*inputs)
    assert out.dtype == torch.float16
    # Within 1e-3 (half an fp16 ulp at 2..4); fp32 math rounded only at the end misses by about 2e-3 here.
    torch.testing.assert_close(out, ref.moe_experts(*inputs), atol=1e-3, rtol=0)


def test_compiled_route_equals_eager() -> None:
    gen = torch.Generator().manual_seed(3)
    scores, scale = torch.randn(9, E, generator=gen), torch.rand(E, generator=gen) + 0.5
    compiled = torch.compile(lambda s, p: kernel.route(s, p, 4), fullgraph=True, backend="aot_eager")
    for got, expected in zip(compiled(scores, scale), kernel.route(scores, scale, 4)):
        torch.testing.assert_close(got, expected, atol=0, rtol=0)


@pytest.mark.parametrize("n", [3, 20])  # decode and prefill tiles
def test_compiled_moe_experts_equals_eager(n: int) -> None:
    inputs = expert_inputs(random_route(n, 4, E, seed=n, avoid=2), 32, 16, seed=2)
    compiled = torch.compile(kernel.moe_experts, fullgraph=True, backend="aot_eager")
    torch.testing.assert_close(compiled(*inputs), kernel.moe_experts(*inputs), atol=0, rtol=0)


def test_custom_ops_pass_opcheck() -> None:
    """Schema, fake (meta) kernels and tracing of both ops, by torch's own checker."""
    gen = torch.Generator().manual_seed(4)
    torch.library.opcheck(torch.ops.gemma4.moe_route.default, (torch.randn(5, E, generator=gen), torch.rand(E), 4))
    x, weights, experts, gate_up_proj, down_proj = expert_inputs(random_route(20, 4, E, seed=4), 32, 16, seed=4)
    sorted_ids, block_expert, _ = kernel.align(experts, E, kernel.path_tiles(20).block_m)
    args = (x, weights, sorted_ids, block_expert, gate_up_proj, down_proj)
    torch.library.opcheck(torch.ops.gemma4.moe_expert_gemms.default, args)
