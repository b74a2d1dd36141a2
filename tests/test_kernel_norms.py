"""The fused norm / RoPE / KV-write / PLE / GELU / softcap kernels equal their torch reference ops (fp32,
Triton's interpreter), and the kernels' custom ops compile with `fullgraph=True`. (The reference ops
are what the model runs: parity with transformers tests them.)"""

from __future__ import annotations

import os

os.environ.setdefault("TRITON_INTERPRET", "1")  # before any kernel module defines its kernels

import pytest  # noqa: E402
import torch  # noqa: E402

from gemma4 import modeling  # noqa: E402
from gemma4.config import RopeConfig  # noqa: E402
from gemma4.kernels import kv_write as kv_kernels  # noqa: E402
from gemma4.kernels import norms as kernels  # noqa: E402
from gemma4.ops import norms as ref  # noqa: E402

EPS = 1e-6
ATOL = 1e-5
PROPORTIONAL = RopeConfig(theta=1_000_000.0, rope_type="proportional", partial_rotary_factor=0.25)
BLOCK_SIZE = 4


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _randn(*shape: int, seed: int, dtype: torch.dtype = torch.float32, scale: float = 1.0) -> torch.Tensor:
    return (torch.randn(*shape, generator=_gen(seed)) * scale).to(dtype)


def _close(actual: torch.Tensor, expected: torch.Tensor) -> None:
    assert actual.shape == expected.shape and actual.dtype == expected.dtype
    torch.testing.assert_close(actual, expected, atol=ATOL, rtol=1e-5)


# Row counts as (full row blocks, tail rows): 1 and 3 rows in a block of their own, and tails after full blocks.
BLOCKS_AND_TAILS = [(0, 1), (0, 3), (1, 1), (2, 3)]


def _num_rows(launch: kernels.Launch, blocks_and_tail: tuple[int, int]) -> int:
    """`blocks` full blocks of the launch's `ROWS` rows, then `tail` rows (fewer than `ROWS`)."""
    blocks, tail = blocks_and_tail
    rows = launch.constexprs["ROWS"]
    assert 0 < tail < rows
    return blocks * rows + tail


def _rope(head_dim: int, num_tokens: int, dtype: torch.dtype = torch.float32) -> tuple[torch.Tensor, torch.Tensor]:
    """Proportional RoPE's cos/sin `[1, T, D]` at scattered positions: the tail pairs have cos 1, sin 0."""
    positions = torch.randint(0, 5000, (1, num_tokens), generator=_gen(head_dim))
    return modeling.RotaryEmbedding(PROPORTIONAL, head_dim)(positions, dtype)


# ----------------------------------------------------------------------------------------------------
# Kernels vs reference ops (fp32)


@pytest.mark.parametrize("width", [96, 40, 1030])  # 1030: two 1024-wide chunks
@pytest.mark.parametrize("leading", [(3,), (2, 3), (2, 1, 2)])
@pytest.mark.parametrize("weighted", [True, False])
def test_rms_norm(width: int, leading: tuple[int, ...], weighted: bool) -> None:
    x = _randn(*leading, width, seed=width, scale=3.0)
    weight = _randn(width, seed=1) if weighted else None
    _close(kernels.rms_norm(x, weight, EPS), ref.rms_norm(x, weight, EPS))


@pytest.mark.parametrize("blocks_and_tail", BLOCKS_AND_TAILS)
@pytest.mark.parametrize("width", [96, 1030])  # 32 and 4 rows a program
def test_norms_of_row_counts_off_the_row_block(width: int, blocks_and_tail: tuple[int, int]) -> None:
    """Row counts that are not multiples of the launch's `ROWS`: the last block's tail is masked."""
    num_rows = _num_rows(kernels.rms_norm_launch(width, True, True, True), blocks_and_tail)
    residual, x = _randn(num_rows, width, seed=41), _randn(num_rows, width, seed=42, scale=3.0)
    weight, scale = _randn(width, seed=43), torch.tensor([0.375])
    _close(kernels.rms_norm(x, weight, EPS), ref.rms_norm(x, weight, EPS))
    expected = ref.residual_rms_norm(residual, x, weight, EPS, scale)
    _close(kernels.residual_rms_norm(residual, x, weight, EPS, scale), expected)


def test_rms_norm_of_a_strided_view() -> None:
    packed = _randn(5, 2 * 96, seed=2)
    x, weight = packed[:, 96:], _randn(96, seed=3)
    _close(kernels.rms_norm(x, weight, EPS), ref.rms_norm(x, weight, EPS))


@pytest.mark.parametrize("width", [96, 40])
@pytest.mark.parametrize("leading", [(4,), (2, 3)])
@pytest.mark.parametrize("with_scale", [True, False])
def test_residual_rms_norm(width: int, leading: tuple[int, ...], with_scale: bool) -> None:
    residual, x = _randn(*leading, width, seed=4), _randn(*leading, width, seed=5, scale=4.0)
    weight = _randn(width, seed=6)
    scale = torch.tensor([0.375]) if with_scale else None
    expected = ref.residual_rms_norm(residual, x, weight, EPS, scale)
    _close(kernels.residual_rms_norm(residual, x, weight, EPS, scale), expected)


@pytest.mark.parametrize("head_dim", [64, 40])
@pytest.mark.parametrize("weighted", [True, False])
def test_norm_rope(head_dim: int, weighted: bool) -> None:
    num_tokens, heads = 5, 3
    cos, sin = _rope(head_dim, num_tokens)
    x = _randn(num_tokens, heads, head_dim, seed=7, scale=2.0)
    weight = _randn(head_dim, seed=8) if weighted else None
    _close(kernels.norm_rope(x, weight, cos[0], sin[0], EPS), ref.norm_rope(x, weight, cos[0], sin[0], EPS))
    # The model's layout: [1, T, heads, D] with [1, T, D].
    _close(kernels.norm_rope(x[None], weight, cos, sin, EPS), ref.norm_rope(x[None], weight, cos, sin, EPS))


@pytest.mark.parametrize("blocks_and_tail", BLOCKS_AND_TAILS)
@pytest.mark.parametrize("heads", [1, 3])
def test_norm_rope_of_row_counts_off_the_row_block(blocks_and_tail: tuple[int, int], heads: int) -> None:
    """(token, head) row counts off the launch's `ROWS` (64 at D = 64); with 3 heads, blocks split tokens."""
    head_dim = 64
    num_tokens = -(-_num_rows(kernels.norm_rope_launch(head_dim, True), blocks_and_tail) // heads)
    cos, sin = (t[0] for t in _rope(head_dim, num_tokens))
    x, weight = _randn(num_tokens, heads, head_dim, seed=44, scale=2.0), _randn(head_dim, seed=45)
    _close(kernels.norm_rope(x, weight, cos, sin, EPS), ref.norm_rope(x, weight, cos, sin, EPS))


def _caches(kv_heads: int, head_dim: int, seed: int, rows: int = 5) -> torch.Tensor:
    """A block_size-4 cache of `rows` rows full of garbage (its untouched slots must survive)."""
    return _randn(rows, BLOCK_SIZE, kv_heads, head_dim, seed=seed, scale=9.0)


@pytest.mark.parametrize("kind", ["k_and_v", "k_as_v", "k_as_v_with_keys"])
@pytest.mark.parametrize("head_dim", [40, 64])
def test_write_kv_normed(kind: str, head_dim: int) -> None:
    num_tokens, kv_heads = 7, 2
    k_raw = _randn(num_tokens, kv_heads, head_dim, seed=9, scale=3.0)
    v_raw = None if kind != "k_and_v" else _randn(num_tokens, kv_heads, head_dim, seed=10)
    k_weight = _randn(head_dim, seed=11)
    cos, sin = (t[0] for t in _rope(head_dim, num_tokens))
    token_mask = torch.tensor([1, 1, 0, 1, 1, 1, 0])
    real_slots = BLOCK_SIZE + torch.randperm(4 * BLOCK_SIZE, generator=_gen(12))[:num_tokens]  # rows 1..4, shuffled
    slot_mapping = torch.where(token_mask != 0, real_slots, torch.tensor([0, 0, 1, 0, 0, 0, 3]))  # padding: row 0
    caches = {}
    for name, op in (("reference", ref.write_kv_normed), ("kernel", kv_kernels.write_kv_normed)):
        key_cache = None if kind == "k_as_v" else _caches(kv_heads, head_dim, seed=13)
        value_cache = _caches(kv_heads, head_dim, seed=14)
        op(k_raw, v_raw, k_weight, cos, sin, EPS, key_cache, value_cache, slot_mapping, token_mask)
        caches[name] = (key_cache, value_cache)
    (ref_keys, ref_values), (keys, values) = caches["reference"], caches["kernel"]
    _close(values, ref_values)
    assert torch.equal(values.view(-1, kv_heads, head_dim)[1], torch.zeros(kv_heads, head_dim))  # a padded slot
    if ref_keys is not None:
        _close(keys, ref_keys)


@pytest.mark.parametrize("kind", ["k_and_v", "k_as_v_with_keys"])
@pytest.mark.parametrize("blocks_and_tail", BLOCKS_AND_TAILS)
def test_write_kv_normed_of_row_counts_off_the_row_block(kind: str, blocks_and_tail: tuple[int, int]) -> None:
    """One kv head of D = 64 (64 rows a program), row counts off the block, every third token padding."""
    kv_heads, head_dim = 1, 64
    num_tokens = _num_rows(kv_kernels.write_kv_normed_launch(head_dim, kind == "k_and_v", True, True), blocks_and_tail)
    k_raw = _randn(num_tokens, kv_heads, head_dim, seed=46, scale=3.0)
    v_raw = _randn(num_tokens, kv_heads, head_dim, seed=47) if kind == "k_and_v" else None
    k_weight = _randn(head_dim, seed=48)
    cos, sin = (t[0] for t in _rope(head_dim, num_tokens))
    token_mask = (torch.arange(num_tokens) % 3 != 2).long()
    cache_rows = 1 + -(-num_tokens // BLOCK_SIZE)
    real_slots = BLOCK_SIZE + torch.randperm((cache_rows - 1) * BLOCK_SIZE, generator=_gen(49))[:num_tokens]
    slot_mapping = torch.where(token_mask != 0, real_slots, torch.arange(num_tokens) % BLOCK_SIZE)  # padding: row 0
    caches = {}
    for name, op in (("reference", ref.write_kv_normed), ("kernel", kv_kernels.write_kv_normed)):
        key_cache, value_cache = (_caches(kv_heads, head_dim, seed, cache_rows) for seed in (50, 51))
        op(k_raw, v_raw, k_weight, cos, sin, EPS, key_cache, value_cache, slot_mapping, token_mask)
        caches[name] = (key_cache, value_cache)
    for actual, expected in zip(caches["kernel"], caches["reference"]):
        _close(actual, expected)


@pytest.mark.parametrize("leading", [(6,), (2, 3), (1,), (23,), (45,)])  # 18, 18, 3, 69, 135 rows; 64 a program
def test_per_layer_inputs(leading: tuple[int, ...]) -> None:
    num_layers, width, vocab = 3, 40, 10
    ids = torch.tensor([1, 7, 12, 3, 10, 0] * 8)[: torch.Size(leading).numel()].reshape(leading)  # 12, 10 >= Vp
    context = _randn(*leading, num_layers * width, seed=15, scale=5.0)
    table, norm_weight = _randn(vocab, num_layers * width, seed=16), _randn(width, seed=17)
    kwargs = dict(num_layers=num_layers, eps=EPS, token_scale=6.25, context_scale=0.125)
    _close(
        kernels.per_layer_inputs(ids, context, table, norm_weight, **kwargs),
        ref.per_layer_inputs(ids, context, table, norm_weight, **kwargs),
    )


@pytest.mark.parametrize("width", [96, 40, 1500])
@pytest.mark.parametrize("leading", [(3, 2), (1,), (5,)])
def test_gelu_mul(width: int, leading: tuple[int, ...]) -> None:
    gate, up = _randn(*leading, width, seed=18, scale=4.0), _randn(*leading, width, seed=19)
    _close(kernels.gelu_mul(gate, up), ref.gelu_mul(gate, up))


@pytest.mark.parametrize("blocks_and_tail", BLOCKS_AND_TAILS)
@pytest.mark.parametrize("width", [96, 1500])  # 32 rows a program; 4 rows and 2 chunks
def test_gelu_mul_of_row_counts_off_the_row_block(width: int, blocks_and_tail: tuple[int, int]) -> None:
    num_rows = _num_rows(kernels.elementwise_launch(width), blocks_and_tail)
    gate, up = _randn(num_rows, width, seed=52, scale=4.0), _randn(num_rows, width, seed=53)
    _close(kernels.gelu_mul(gate, up), ref.gelu_mul(gate, up))


def test_gelu_mul_of_a_packed_gate_up() -> None:
    gate_up = _randn(5, 2 * 96, seed=20, scale=4.0)
    gate, up = gate_up[:, :96], gate_up[:, 96:]
    _close(kernels.gelu_mul(gate, up), ref.gelu_mul(gate, up))


@pytest.mark.parametrize("cap", [30.0, 3.0, None])
@pytest.mark.parametrize("leading", [(3,), (2, 2), (5,), (11,)])  # 4 rows a program
def test_softcap_logits(cap: float | None, leading: tuple[int, ...]) -> None:
    logits = _randn(*leading, 1500, seed=21, scale=25.0)  # saturates at cap 3
    out = kernels.softcap_logits(logits, cap)
    assert out.dtype == torch.float32
    _close(out, ref.softcap_logits(logits, cap))


def test_softcap_logits_of_bf16_is_fp32() -> None:
    logits = _randn(2, 700, seed=22, scale=25.0, dtype=torch.float16)
    out = kernels.softcap_logits(logits, 30.0)
    expected = torch.tanh(logits.double() / 30.0) * 30.0  # the kernel rounds nothing to the input dtype
    torch.testing.assert_close(out, expected.float(), atol=1e-5, rtol=1e-6)


def test_ops_compile_fullgraph() -> None:
    """One graph through every op (the KV write mutating its caches) matches eager."""
    width, heads, head_dim, num_tokens = 40, 2, 40, 3
    cos, sin = (t[0] for t in _rope(head_dim, num_tokens))

    def step(x, residual, q, k_raw, key_cache, value_cache, logits, ids, context, table):  # noqa: ANN001, ANN202
        h = kernels.rms_norm(x, None, EPS)
        h = kernels.residual_rms_norm(residual, h, x[0], EPS, torch.ones(1))
        h = kernels.gelu_mul(h, x)
        q = kernels.norm_rope(q, None, cos, sin, EPS)
        slots, mask = torch.arange(num_tokens), torch.ones(num_tokens, dtype=torch.long)
        kv_kernels.write_kv_normed(k_raw, None, q[0, 0], cos, sin, EPS, key_cache, value_cache, slots, mask)
        ple = kernels.per_layer_inputs(
            ids, context, table, x[0], num_layers=2, eps=EPS, token_scale=2.0, context_scale=0.5
        )
        return h, q, kernels.softcap_logits(logits, 30.0), ple, value_cache.sum()

    def inputs() -> tuple[torch.Tensor, ...]:
        return (
            _randn(num_tokens, width, seed=34),
            _randn(num_tokens, width, seed=35),
            _randn(num_tokens, heads, head_dim, seed=36),
            _randn(num_tokens, heads, head_dim, seed=37),
            torch.zeros(2, BLOCK_SIZE, heads, head_dim),
            torch.zeros(2, BLOCK_SIZE, heads, head_dim),
            _randn(num_tokens, 50, seed=38, scale=40.0),
            torch.tensor([0, 5, 9]),
            _randn(num_tokens, 2 * width, seed=39),
            _randn(7, 2 * width, seed=40),
        )

    eager_inputs, compiled_inputs = inputs(), inputs()
    expected = step(*eager_inputs)
    actual = torch.compile(step, fullgraph=True, backend="aot_eager")(*compiled_inputs)
    for a, e in zip(actual, expected):
        torch.testing.assert_close(a, e, atol=0, rtol=0)
    for a, e in zip(compiled_inputs, eager_inputs):  # the caches were written alike
        assert torch.equal(a, e)


def test_shipped_configs() -> None:
    """Few configs a module, distinct, both dtypes; the launches at the real sizes are among them."""
    for module in (kernels, kv_kernels):
        configs = module.shipped_configs()
        names = [c.name for c in configs]
        assert len(set(names)) == len(names) < 20
        assert any(",bf16]" in n for n in names) and any(",fp16]" in n for n in names)
    shipped = {(c.kernel, tuple(c.constexprs.items()), c.num_warps) for c in kernels.shipped_configs()}
    for width in kernels.HIDDEN_SIZES:
        launch = kernels.rms_norm_launch(width, True, True, True)
        assert (kernels._rms_norm_kernel, tuple(launch.constexprs.items()), launch.num_warps) in shipped
    kv_shipped = {tuple(c.constexprs.items()) for c in kv_kernels.shipped_configs()}
    for head_dim in kernels.HEAD_DIMS:
        assert tuple(kv_kernels.write_kv_normed_launch(head_dim, False, False, True).constexprs.items()) in kv_shipped
