"""Kernel microbenchmarks for `gpu_decode.py`: each hot-path op, Triton kernel against the torch reference op.

Attention per layer type (the 26B-A4B / 31B sliding layers: head_dim 256, window 1024; their global
layers: head_dim 512, K-as-V) at several context lengths, decode-shaped (one query per sequence);
MoE (26B-A4B: 128 experts, top-8, 2816 x 704) per batch size; the sandwich norm at the 31B width;
sampling (top-p over 262,144 logits). Each row has the median time of both implementations and the
kernel's achieved bandwidth: the bytes the op must read (KV of the visible keys; the chosen experts'
weights; the rows) over its time, against the device's peak. `tiny=True` shrinks every shape for a CPU
smoke run through Triton's interpreter (its times mean nothing).
"""

from __future__ import annotations

import dataclasses
import statistics
import time
from typing import Any, Callable

import torch

from gemma4.backends import backend_of, reference_ops, triton_ops
from gemma4.ops.paged_attention import SequenceLayout


@dataclasses.dataclass(frozen=True)
class AttentionCase:
    name: str
    heads: int
    kv_heads: int
    head_dim: int
    window: int | None
    k_eq_v: bool


REAL_ATTENTION = (
    AttentionCase("sliding d256 w1024 (31B)", 32, 16, 256, 1024, False),
    AttentionCase("global d512 K-as-V (31B)", 32, 4, 512, None, True),
    AttentionCase("global d512 K-as-V (26B-A4B)", 16, 2, 512, None, True),
    AttentionCase("global d512 (E4B)", 8, 2, 512, None, False),
)
TINY_ATTENTION = (
    AttentionCase("sliding d32 w8", 4, 2, 32, 8, False),
    AttentionCase("global d64 K-as-V", 4, 1, 64, None, True),
)


def timed(fn: Callable[[], Any], device: torch.device, reps: int) -> float:
    """Median seconds of `fn` over `reps` runs after one warm-up (stream events where the backend has them)."""
    backend = backend_of(device)
    fn()
    times = []
    for _ in range(reps):
        start, end = backend.event(timing=True), backend.event(timing=True)
        if start is not None and end is not None:
            start.record()
            fn()
            end.record()
            end.synchronize()
            times.append(start.elapsed_time(end) / 1000)
        else:
            began = time.perf_counter()
            fn()
            times.append(time.perf_counter() - began)
    return statistics.median(times)


def _significant(value: float) -> float:
    """Three significant digits (interpreter runs on a CPU give tiny figures that must not round to 0)."""
    return float(f"{value:.3g}")


def _row(kind: str, case: str, shape: dict[str, Any], bytes_read: int, times: dict[str, float], peak: float | None) -> dict[str, Any]:
    kernel = times["triton"]
    return {
        "kernel": kind, "case": case, **shape,
        "triton_us": round(kernel * 1e6, 2), "torch_us": round(times["torch"] * 1e6, 2),
        "speedup": round(times["torch"] / kernel, 2),
        "bytes_read": bytes_read, "achieved_gbs": _significant(bytes_read / kernel / 1e9),
        "peak_pct": _significant(100 * bytes_read / kernel / peak) if peak else None,
    }


def _decode_step(batch: int, context: int, block_size: int, device: torch.device) -> tuple[SequenceLayout, torch.Tensor, torch.Tensor]:
    """A decode step of `batch` sequences at `context` tokens: layout, positions, shuffled block tables."""
    cols = -(-context // block_size)
    layout = SequenceLayout(
        query_start=torch.arange(batch, device=device), query_len=torch.ones(batch, dtype=torch.long, device=device),
        context_len=torch.full((batch,), context, device=device), token_seq=torch.arange(batch, device=device),
        token_mask=torch.ones(batch, dtype=torch.long, device=device), grids=((batch, 1),),
    )
    tables = (torch.randperm(batch * cols, device=device) + 1).view(batch, cols).to(torch.int32)
    return layout, torch.full((batch,), context - 1, device=device), tables


def attention_rows(cases: tuple[AttentionCase, ...], contexts: list[int], batches: list[int], dtype: torch.dtype,
                   device: torch.device, reps: int, peak: float | None) -> list[dict[str, Any]]:
    block_size = 16
    rows = []
    for case in cases:
        for batch in batches:
            for context in contexts:
                layout, positions, table = _decode_step(batch, context, block_size, device)
                shape = (batch * table.shape[1] + 1, block_size, case.kv_heads, case.head_dim)
                values = torch.randn(shape, dtype=dtype, device=device)
                keys = None if case.k_eq_v else torch.randn(shape, dtype=dtype, device=device)
                q = torch.randn(batch, case.heads, case.head_dim, dtype=dtype, device=device)
                inv_freq = 1.0 / 1e6 ** (torch.arange(0, case.head_dim, 2, device=device).float() / case.head_dim)
                scale = torch.rand(case.head_dim, dtype=dtype, device=device) if case.k_eq_v else None
                times = {}
                for ops in (triton_ops(), reference_ops()):
                    plan = ops.attention_plan(layout, positions, table, block_size=block_size,
                                              sliding_window=case.window, key_inv_freq=inv_freq if case.k_eq_v else None)
                    times[ops.kernels] = timed(lambda: ops.paged_attention(q, keys, values, plan, scale), device, reps)
                visible = context if case.window is None else min(context, case.window)
                tensors = 1 if case.k_eq_v else 2
                read = batch * visible * case.kv_heads * case.head_dim * dtype.itemsize * tensors
                rows.append(_row("attention", case.name, {"batch": batch, "context": context}, read, times, peak))
    return rows


def moe_rows(experts: int, top_k: int, hidden: int, intermediate: int, batches: list[int], dtype: torch.dtype,
             device: torch.device, reps: int, peak: float | None) -> list[dict[str, Any]]:
    gate_up = torch.randn(experts, 2 * intermediate, hidden, dtype=dtype, device=device) * hidden**-0.5
    down = torch.randn(experts, hidden, intermediate, dtype=dtype, device=device) * intermediate**-0.5
    scale = torch.ones(experts, device=device)
    rows = []
    for n in batches:
        x = torch.randn(n, hidden, dtype=dtype, device=device)
        scores = torch.randn(n, experts, device=device)
        weights, chosen = reference_ops().moe_route(scores, scale, top_k)
        times = {
            ops.kernels: timed(lambda: ops.moe_experts(x, weights, chosen, gate_up, down), device, reps)
            for ops in (triton_ops(), reference_ops())
        }
        distinct = int(torch.unique(chosen).numel())
        read = distinct * 3 * hidden * intermediate * dtype.itemsize
        rows.append(_row("moe", f"E{experts} top{top_k} {hidden}x{intermediate}", {"batch": n, "experts_read": distinct},
                         read, times, peak))
    return rows


def norm_rows(width: int, batches: list[int], dtype: torch.dtype, device: torch.device, reps: int,
              peak: float | None) -> list[dict[str, Any]]:
    weight = torch.rand(width, dtype=dtype, device=device)
    scalar = torch.rand(1, dtype=dtype, device=device)
    rows = []
    for n in batches:
        residual, x = (torch.randn(n, width, dtype=dtype, device=device) for _ in range(2))
        times = {
            ops.kernels: timed(lambda: ops.residual_rms_norm(residual, x, weight, 1e-6, scalar), device, reps)
            for ops in (triton_ops(), reference_ops())
        }
        rows.append(_row("residual_rms_norm", f"width {width}", {"batch": n}, 3 * n * width * dtype.itemsize, times, peak))
    return rows


def sampling_rows(vocab: int, batches: list[int], device: torch.device, reps: int, peak: float | None) -> list[dict[str, Any]]:
    rows = []
    for m in batches:
        logits = torch.randn(m, vocab, device=device) * 3
        top_k = torch.full((m,), vocab, dtype=torch.long, device=device)
        temperature = torch.full((m,), 0.8, device=device)
        top_p = torch.full((m,), 0.9, device=device)
        min_p = torch.zeros(m, device=device)
        keys = torch.arange(m, dtype=torch.long, device=device)
        times = {
            ops.kernels: timed(lambda: ops.sample_draw(logits, top_k, temperature, top_p, min_p, keys, vocab), device, reps)
            for ops in (triton_ops(), reference_ops())
        }
        rows.append(_row("sample_draw", f"top-p 0.9 over {vocab}", {"batch": m}, m * vocab * 4, times, peak))
    return rows


def run(device: torch.device, dtype: torch.dtype, tiny: bool, peak: float | None) -> list[dict[str, Any]]:
    """Every microbenchmark at real sizes (or tiny ones for the CPU smoke run)."""
    torch.manual_seed(0)
    if tiny:
        return [
            *attention_rows(TINY_ATTENTION, [12, 40], [1, 2], dtype, device, 1, peak),
            *moe_rows(16, 4, 32, 16, [1, 3], dtype, device, 1, peak),
            *norm_rows(48, [1, 3], dtype, device, 1, peak),
            *sampling_rows(500, [1, 2], device, 1, peak),
        ]
    return [
        *attention_rows(REAL_ATTENTION, [1024, 8192, 32768], [1, 16], dtype, device, 20, peak),
        *moe_rows(128, 8, 2816, 704, [1, 4, 16, 64], dtype, device, 20, peak),
        *norm_rows(5376, [1, 64], dtype, device, 50, peak),
        *sampling_rows(262144, [1, 32], device, 20, peak),
    ]
