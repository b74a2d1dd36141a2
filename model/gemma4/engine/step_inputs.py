"""A step's input tensors, staged in one persistent pinned host buffer and copied to the device at once.

The scheduler's plain decision (which requests, how many tokens each) becomes a handful of integer
arrays: token ids, positions, each token's sequence, per-sequence query start/length and context
length, the rows that sample, and one block table per cache group. They are written into fixed
sections of a pinned int64 buffer sized for the largest step, the used prefix is copied to a device
buffer of the same layout with one non-blocking transfer, and the step's tensors are views of it.
Shapes are padded to buckets (`StepShape`), so a decode step of a given bucket always reads the same
device addresses: what a CUDA graph replay needs.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Sequence

import numpy as np
import torch

from gemma4.engine.request import Request
from gemma4.ops.paged_attention import SequenceLayout


def bucket(n: int, cap: int | None = None) -> int:
    """The padded size for `n`: the next power of two (at least 1), at most `cap`."""
    size = 1 << max(0, math.ceil(math.log2(max(n, 1))))
    return size if cap is None else min(size, cap)


@dataclass(frozen=True)
class StepShape:
    """Static sizes of one padded step: tokens, sequences, longest query, block-table columns."""

    num_tokens: int
    num_seqs: int
    max_query_len: int
    table_cols: int


@dataclass(frozen=True)
class StepTensors:
    """One step's inputs on the device (views of the step buffer) plus the static shape they have."""

    shape: StepShape
    input_ids: torch.Tensor  # [T]
    positions: torch.Tensor  # [T]
    layout: SequenceLayout
    sample_rows: torch.Tensor  # [S] flat-step row whose logits each sequence samples from
    block_tables: tuple[torch.Tensor, ...]  # per cache group, [S, cols]


@dataclass(frozen=True)
class StagedStep:
    """A staged step: its device tensors, and the requests that sample (in `sample_rows` order)."""

    tensors: StepTensors
    sampling: list[Request]
    num_seqs: int  # real sequences (the rest of the bucket is padding)


class StepBuffers:
    """The persistent host (pinned on CUDA) and device buffers a step is staged through."""

    _SECTIONS = ("input_ids", "positions", "token_seq", "token_mask")
    _SEQ_SECTIONS = ("query_start", "query_len", "context_len", "sample_rows")

    def __init__(self, max_tokens: int, max_seqs: int, max_cols: int, num_groups: int, device: torch.device) -> None:
        self.max_tokens, self.max_seqs, self.max_cols = max_tokens, max_seqs, max_cols
        self.num_groups = num_groups
        self.device = device
        size = 4 * max_tokens + 4 * max_seqs + num_groups * max_seqs * max_cols
        self.host = torch.zeros(size, dtype=torch.int64, pin_memory=device.type == "cuda")
        self._host_np = self.host.numpy()
        self.device_buffer = self.host.to(device) if device.type != "cpu" else self.host

    def _offsets(self, shape: StepShape) -> tuple[dict[str, tuple[int, int]], int]:
        """Section name -> (offset, length) for `shape`, packed from the start; and the total used."""
        t, s = shape.num_tokens, shape.num_seqs
        sections: dict[str, tuple[int, int]] = {}
        offset = 0
        for name in self._SECTIONS:
            sections[name] = (offset, t)
            offset += t
        for name in self._SEQ_SECTIONS:
            sections[name] = (offset, s)
            offset += s
        for g in range(self.num_groups):
            sections[f"table{g}"] = (offset, s * shape.table_cols)
            offset += s * shape.table_cols
        return sections, offset

    def stage(
        self,
        shape: StepShape,
        requests: Sequence[Request],
        num_tokens: Sequence[int],
        tables: Sequence[Sequence[Sequence[int]]],
    ) -> StagedStep:
        """Write the step for `requests` (`num_tokens[i]` new tokens each, `tables[i]` its block tables
        per group) padded to `shape`, copy it to the device, and return the views."""
        if shape.num_tokens > self.max_tokens or shape.num_seqs > self.max_seqs or shape.table_cols > self.max_cols:
            raise ValueError(f"step shape {shape} exceeds the step buffers' capacity")
        sections, used = self._offsets(shape)
        buf = self._host_np
        buf[:used] = 0

        def section(name: str) -> np.ndarray:
            offset, length = sections[name]
            return buf[offset : offset + length]

        ids, pos, seq, mask = (section(n) for n in self._SECTIONS)
        q_start, q_len, ctx, sample = (section(n) for n in self._SEQ_SECTIONS)
        sampling: list[Request] = []
        row = 0
        for i, (request, n) in enumerate(zip(requests, num_tokens)):
            start = request.num_computed_tokens
            end = row + n
            ids[row:end] = request.token_ids[start : start + n]
            pos[row:end] = np.arange(start, start + n)
            seq[row:end] = i
            q_start[i], q_len[i], ctx[i] = row, n, start + n
            if start + n == request.num_tokens:
                sample[len(sampling)] = end - 1
                sampling.append(request)
            row = end
        mask[:row] = 1
        cols = shape.table_cols
        for g in range(self.num_groups):
            table = section(f"table{g}").reshape(shape.num_seqs, cols)
            for i, request_tables in enumerate(tables):
                blocks = request_tables[g]
                table[i, : len(blocks)] = blocks[:cols]
        if self.device_buffer is not self.host:
            self.device_buffer[:used].copy_(self.host[:used], non_blocking=True)
        return StagedStep(self._views(shape, sections), sampling, len(requests))

    def views(self, shape: StepShape) -> StepTensors:
        """The device tensors of a step of `shape` (the same storage every time: CUDA-graph inputs)."""
        return self._views(shape, self._offsets(shape)[0])

    def _views(self, shape: StepShape, sections: dict[str, tuple[int, int]]) -> StepTensors:
        def view(name: str) -> torch.Tensor:
            offset, length = sections[name]
            return self.device_buffer[offset : offset + length]

        layout = SequenceLayout(
            query_start=view("query_start"),
            query_len=view("query_len"),
            context_len=view("context_len"),
            token_seq=view("token_seq"),
            token_mask=view("token_mask"),
            max_query_len=shape.max_query_len,
        )
        tables = tuple(view(f"table{g}").view(shape.num_seqs, shape.table_cols) for g in range(self.num_groups))
        return StepTensors(shape, view("input_ids"), view("positions"), layout, view("sample_rows"), tables)
