"""The Triton paged-attention kernel equals the reference op (fp32, Triton's CPU interpreter).

Steps mix decode tokens and prefill chunks over random block tables (shuffled block ids, the null
block 0 zeroed); each case compares the kernel with `ops.paged_attention` on the rows of real tokens
and checks that padded rows are finite.
"""

from __future__ import annotations

import os

os.environ.setdefault("TRITON_INTERPRET", "1")  # before triton kernels are defined

import math  # noqa: E402
from dataclasses import dataclass, replace  # noqa: E402

import pytest  # noqa: E402
import torch  # noqa: E402
import triton  # noqa: E402
import triton.language as tl  # noqa: E402

from gemma4.kernels import paged_attention as kernel  # noqa: E402
from gemma4.ops import paged_attention as ref  # noqa: E402
from step_layouts import step_layout  # noqa: E402


@dataclass
class Step:
    layout: ref.SequenceLayout
    positions: torch.Tensor
    tables: torch.Tensor
    q: torch.Tensor
    keys: torch.Tensor | None
    values: torch.Tensor
    key_scale: torch.Tensor | None
    inv_freq: torch.Tensor | None


def make_step(
    seqs: list[tuple[int, int, int]],
    *,
    num_tokens: int,
    grids: tuple[tuple[int, int], ...],
    block_size: int,
    cols: int,
    heads: int,
    kv_heads: int,
    dim: int,
    k_as_v: bool = False,
    seed: int = 0,
    gap: int = 0,
    table_dtype: torch.dtype = torch.int64,
    dtype: torch.dtype = torch.float32,
) -> Step:
    """A padded step for `seqs` of (slot, context_len, query_len), their tokens in list order from row 0,
    `gap` padded tokens after each (the rest padding too; unlisted slots are padded sequences), random
    caches and tables over shuffled blocks; K-as-V steps get a key scale and proportional RoPE
    frequencies (a quarter of them zero)."""
    gen = torch.Generator().manual_seed(seed)
    rows = 1 + sum(math.ceil(context / block_size) for _, context, _ in seqs) + 3  # a few blocks no one owns
    free = (torch.randperm(rows - 1, generator=gen) + 1).tolist()
    layout, positions, tables = step_layout(seqs, num_tokens, grids, block_size, cols, free, gap)
    values = torch.randn(rows, block_size, kv_heads, dim, generator=gen)
    values[0] = 0
    keys = None if k_as_v else torch.randn(rows, block_size, kv_heads, dim, generator=gen)
    if keys is not None:
        keys[0] = 0
    q = torch.randn(num_tokens, heads, dim, generator=gen)
    key_scale = inv_freq = None
    if k_as_v:
        key_scale = 1 + 0.5 * torch.randn(dim, generator=gen)
        pairs = dim // 2 - dim // 8
        inv_freq = torch.cat([1.0 / 100.0 ** (torch.arange(pairs) / pairs), torch.zeros(dim // 2 - pairs)])
    def cast(t: torch.Tensor | None) -> torch.Tensor | None:
        return None if t is None else t.to(dtype)

    return Step(layout, positions, tables.to(table_dtype), *map(cast, (q, keys, values, key_scale)), inv_freq)


def check(
    step: Step, window: int | None, *, spans: bool = False, num_splits: int | None = None, atol: float = 1e-5
) -> torch.Tensor:
    """Kernel vs reference (in fp32) on the real rows; padded rows must be zeros. Returns the kernel's output."""
    args = dict(block_size=step.values.shape[1], sliding_window=window, key_inv_freq=step.inv_freq, spans=spans)
    meta = ref.group_metadata(step.layout, step.positions, step.tables, **args)
    keys, scale = (None if t is None else t.float() for t in (step.keys, step.key_scale))
    expected = ref.paged_attention(step.q.float(), keys, step.values.float(), meta, scale)
    plan = kernel.attention_plan(step.layout, step.positions, step.tables, **args)
    torch.testing.assert_close(plan.slot_mapping, meta.slot_mapping, rtol=0, atol=0)
    out = kernel.paged_attention(step.q, step.keys, step.values, plan, step.key_scale, num_splits=num_splits)
    assert out.shape == step.q.shape and out.dtype == step.q.dtype
    real = step.layout.token_mask.bool()
    assert torch.all(out[~real] == 0)
    torch.testing.assert_close(out[real].float(), expected[real], atol=atol, rtol=atol)
    return out


# (slot, context, query) in token order: decodes in the single-query grid (slots 0-3), two prefill
# chunks (one continuing a prompt) in the other (slots 4-7), a one-token prompt; slots 3, 6, 7 padded.
MIXED = [(4, 19, 7), (0, 9, 1), (1, 30, 1), (5, 12, 5), (2, 1, 1)]
MIXED_GRIDS = ((4, 1), (4, 8))


@pytest.mark.parametrize(
    ("heads", "kv_heads", "window", "k_as_v"),
    [
        (4, 2, None, False), (4, 2, 6, False), (8, 1, 6, False), (2, 2, None, False), (8, 2, 5, False),
        (8, 1, None, True),
    ],
)
def test_mixed_step_matches_reference(heads: int, kv_heads: int, window: int | None, k_as_v: bool) -> None:
    step = make_step(MIXED, num_tokens=20, grids=MIXED_GRIDS, block_size=4, cols=8, heads=heads, kv_heads=kv_heads,
                     dim=32, k_as_v=k_as_v)
    check(step, window)


@pytest.mark.parametrize("block_size", [4, 6, 32])
@pytest.mark.parametrize("window", [None, 7, 8, 9])
def test_block_and_window_boundaries(block_size: int, window: int | None) -> None:
    """Contexts at multiples of the block size +-1 (decodes and chunks), queries just inside and outside
    the window; key tiles (16 keys here) span several cache blocks or lie within one."""
    bs = block_size
    seqs = [(0, bs - 1, 1), (1, bs, 1), (2, bs + 1, 1), (3, 2 * bs - 1, 1), (4, 2 * bs + 1, 1), (5, 4 * bs, 1),
            (8, 2 * bs + 1, 2 * bs + 1), (9, 4 * bs - 1, bs + 2), (10, 3 * bs, bs)]
    step = make_step(seqs, num_tokens=12 + 5 * bs, grids=((8, 1), (3, 2 * bs + 1)), block_size=bs, cols=4, heads=4,
                     kv_heads=2, dim=32, table_dtype=torch.int32)
    check(step, window)


def test_decode_only_step_uses_the_decode_tile() -> None:
    seqs = [(0, 17, 1), (1, 33, 1), (3, 1, 1), (4, 64, 1)]
    step = make_step(seqs, num_tokens=8, grids=((8, 1),), block_size=8, cols=8, heads=8, kv_heads=2, dim=64)
    check(step, 16)
    gen = torch.Generator().manual_seed(11)
    k_as_v = replace(step, keys=None, key_scale=torch.rand(64, generator=gen) + 0.5, inv_freq=torch.rand(32, generator=gen))
    # The kernel's own fp32 sin/cos (within 3e-7 of exact) differs from torch's by as much: scores of
    # ~10 carry it to ~1e-5 in the outputs.
    check(k_as_v, None, atol=5e-5)


# Chunks with several spans each: at a chunk's start and end, one longer than the smaller windows,
# one id reused by another sequence (spans never cross sequences); a decode token in a span.
SPAN_SEQS = [(4, 19, 12), (0, 9, 1), (5, 14, 14), (1, 30, 1)]
SPAN_GRIDS = ((4, 1), (4, 16))


def _span_ids(num_tokens: int) -> torch.Tensor:
    spans = torch.full((num_tokens,), -1)
    spans[0:3] = 7
    spans[5:7] = 2
    spans[9:12] = 3
    spans[12] = 5
    spans[13:22] = 7
    spans[24:27] = 4
    return spans


@pytest.mark.parametrize(("heads", "kv_heads"), [(4, 2), (8, 1)])
@pytest.mark.parametrize("window", [None, 3, 6])
def test_spans(heads: int, kv_heads: int, window: int | None) -> None:
    step = make_step(SPAN_SEQS, num_tokens=32, grids=SPAN_GRIDS, block_size=4, cols=8, heads=heads,
                     kv_heads=kv_heads, dim=32, seed=3)
    step = replace(step, layout=replace(step.layout, span_ids=_span_ids(32)))
    with_spans = check(step, window, spans=True)
    causal = check(step, window, spans=False)
    assert not torch.allclose(with_spans, causal)


@pytest.mark.parametrize("k_as_v", [False, True])
@pytest.mark.parametrize("window", [None, 20])
def test_split_k_matches_one_split(k_as_v: bool, window: int | None) -> None:
    """Long contexts cut into 1, 3 or 4 splits: each equals the reference, and the splits agree."""
    seqs = [(0, 90, 1), (1, 41, 1), (2, 70, 6), (3, 3, 3)]
    step = make_step(seqs, num_tokens=12, grids=((2, 1), (2, 6)), block_size=4, cols=24, heads=8, kv_heads=1,
                     dim=32, k_as_v=k_as_v, seed=4)
    one = check(step, window, num_splits=1)
    for splits in (3, 4):
        torch.testing.assert_close(check(step, window, num_splits=splits), one, atol=1e-6, rtol=1e-6)


def test_split_heuristic_uses_static_shapes() -> None:
    assert kernel.choose_num_splits(programs=1024, max_keys=1 << 17) == 1  # a big decode batch fills the GPU
    assert kernel.choose_num_splits(programs=8, max_keys=1 << 17) == kernel.MAX_SPLITS  # few long sequences
    assert kernel.choose_num_splits(programs=8, max_keys=600) == 2  # short contexts: few keys per split
    assert kernel.choose_num_splits(programs=200, max_keys=1 << 17) == 2


def test_padded_steps() -> None:
    """Padding between and after the sequences, padded sequences (query_len 0) between real ones."""
    seqs = [(5, 13, 6), (1, 8, 1), (6, 7, 7), (3, 22, 1)]
    step = make_step(seqs, num_tokens=32, grids=((4, 1), (4, 8)), block_size=4, cols=8, heads=8, kv_heads=2,
                     dim=32, gap=3, seed=5)
    check(step, None)
    check(step, 5, num_splits=2)


@pytest.mark.parametrize("dtype", [torch.float16])
def test_half_precision(dtype: torch.dtype) -> None:
    step = make_step(MIXED, num_tokens=20, grids=MIXED_GRIDS, block_size=4, cols=8, heads=4, kv_heads=2, dim=32,
                     k_as_v=True, dtype=dtype, seed=6)
    check(step, 6, atol=2e-2)


def test_head_dim_256_window_and_spans() -> None:
    seqs = [(1, 9, 6), (0, 21, 1)]
    step = make_step(seqs, num_tokens=8, grids=((1, 1), (1, 6)), block_size=8, cols=4, heads=2, kv_heads=1, dim=256,
                     seed=7)
    spans = torch.full((8,), -1)
    spans[1:4] = 0
    # Scores of 256-wide random heads reach ~50: fp32 rounding of the two summation orders is ~2e-5.
    check(replace(step, layout=replace(step.layout, span_ids=spans)), 4, spans=True, atol=5e-5)


def test_head_dim_512_k_as_v() -> None:
    seqs = [(0, 40, 1), (1, 7, 1)]
    step = make_step(seqs, num_tokens=2, grids=((2, 1),), block_size=16, cols=4, heads=8, kv_heads=1, dim=512,
                     k_as_v=True, seed=8)
    # Keys are rotated in the kernel with its own sin/cos over 256 pairs (see the K-as-V test above).
    check(step, None, atol=5e-5)
    check(step, None, num_splits=2, atol=5e-5)


def test_custom_op_compiles_fullgraph() -> None:
    step = make_step(MIXED, num_tokens=20, grids=MIXED_GRIDS, block_size=4, cols=8, heads=4, kv_heads=2, dim=32,
                     k_as_v=True, seed=9)

    def attend(q, values, layout, positions, tables, key_scale, inv_freq):
        plan = kernel.attention_plan(layout, positions, tables, block_size=4, sliding_window=6, key_inv_freq=inv_freq)
        return kernel.paged_attention(q, None, values, plan, key_scale)

    inputs = (step.q, step.values, step.layout, step.positions, step.tables, step.key_scale, step.inv_freq)
    compiled = torch.compile(attend, fullgraph=True, backend="aot_eager")(*inputs)
    torch.testing.assert_close(compiled, attend(*inputs), rtol=0, atol=0)


@triton.jit
def _sincos_kernel(angle_ptr, sin_ptr, cos_ptr, BLOCK: tl.constexpr):
    offsets = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    sin, cos = kernel._sincos(tl.load(angle_ptr + offsets))
    tl.store(sin_ptr + offsets, sin)
    tl.store(cos_ptr + offsets, cos)


def test_sincos_is_accurate_for_large_rope_angles() -> None:
    """K-as-V keys at positions up to ~1.6M (inv_freq up to 1): within 3e-7 of sin/cos of the same fp32 angle."""
    gen = torch.Generator().manual_seed(10)
    angles = torch.cat([torch.rand(1024, generator=gen) * 8, torch.rand(3072, generator=gen) * 1.6e6, -angles_edge()])
    sin, cos = torch.empty_like(angles), torch.empty_like(angles)
    _sincos_kernel[(angles.numel() // 256,)](angles, sin, cos, BLOCK=256)
    torch.testing.assert_close(sin, angles.double().sin().float(), atol=3e-7, rtol=0)
    torch.testing.assert_close(cos, angles.double().cos().float(), atol=3e-7, rtol=0)


def angles_edge() -> torch.Tensor:
    """Odd multiples of pi/4 (quadrant boundaries) and large positions times the top frequency."""
    return torch.cat([(torch.arange(128) * 2 + 1) * math.pi / 4, torch.arange(262_144 - 128, 262_144).float()])


def test_misaligned_queries_are_refused() -> None:
    step = make_step([(0, 5, 1)], num_tokens=1, grids=((1, 1),), block_size=4, cols=2, heads=2, kv_heads=1, dim=32)
    plan = kernel.attention_plan(step.layout, step.positions, step.tables, block_size=4, sliding_window=None)
    shifted = torch.randn(2 * 32 + 1)[1:].view(1, 2, 32)  # 4 bytes off a 16-byte boundary
    with pytest.raises(ValueError, match="aligned"):
        kernel.paged_attention(shifted, step.keys, step.values, plan)


def _poison_outside_windows(step: Step, window: int | None) -> Step:
    """The step with NaN in every cache slot no query may see (before the sequences' windows, past their
    contexts, blocks no one owns) and table entries outside the windows pointing at a NaN block (as
    released ones may): any read of them would turn the output NaN."""
    bs = step.values.shape[1]
    tables = step.tables.clone()
    poison_block = max(set(range(1, step.values.shape[0])) - set(tables.flatten().tolist()))  # owned by no one
    caches = [c for c in (step.keys, step.values) if c is not None]
    poisoned = [torch.full_like(c, float("nan")) for c in caches]
    for p in poisoned:
        p[0] = 0  # the null block stays zero
    layout = step.layout
    for s in range(tables.shape[0]):
        context, query = int(layout.context_len[s]), int(layout.query_len[s])
        lo = 0 if window is None else max(0, context - query - window + 1)
        for pos in range(lo, context):
            block = int(tables[s, pos // bs])
            for clean, dirty in zip(caches, poisoned):
                dirty[block, pos % bs] = clean[block, pos % bs]
        outside = [b for b in range(tables.shape[1]) if not lo // bs <= b < -(-context // bs)]
        tables[s, outside] = poison_block
    keys = poisoned[0] if step.keys is not None else None
    return replace(step, keys=keys, values=poisoned[-1], tables=tables)


@pytest.mark.parametrize(("window", "k_as_v", "splits"), [(5, False, None), (9, True, 3), (None, False, 2)])
def test_reads_only_the_keys_in_the_windows(window: int | None, k_as_v: bool, splits: int | None) -> None:
    seqs = [(0, 41, 1), (1, 13, 1), (2, 30, 7), (3, 9, 9)]
    step = make_step(seqs, num_tokens=20, grids=((2, 1), (2, 9)), block_size=4, cols=12, heads=4, kv_heads=1, dim=32,
                     k_as_v=k_as_v, seed=11)
    args = dict(block_size=4, sliding_window=window, key_inv_freq=step.inv_freq)
    meta = ref.group_metadata(step.layout, step.positions, step.tables, **args)
    expected = ref.paged_attention(step.q, step.keys, step.values, meta, step.key_scale)
    dirty = _poison_outside_windows(step, window)
    plan = kernel.attention_plan(dirty.layout, dirty.positions, dirty.tables, **args)
    out = kernel.paged_attention(dirty.q, dirty.keys, dirty.values, plan, dirty.key_scale, num_splits=splits)
    real = step.layout.token_mask.bool()
    assert torch.isfinite(out).all()
    torch.testing.assert_close(out[real], expected[real], atol=1e-5, rtol=1e-5)
