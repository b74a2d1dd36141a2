"""A step's input tensors, staged in one persistent pinned host buffer and copied to the device at once.

The scheduler's plain decision (which requests, how many tokens each) becomes a handful of integer
arrays: token ids, positions, each token's sequence, per-sequence query start/length and context
length, the rows that sample, one block table per cache group, and (models with bidirectional image
blocks) each token's span id. They are written into fixed
sections of a pinned int64 buffer sized for the largest step, the used prefix is copied to a device
buffer of the same layout with one non-blocking transfer, and the step's tensors are views of it.
Shapes are padded to buckets (`StepShape`), so a decode step of a given bucket always reads the same
device addresses: what a CUDA graph replay needs.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from itertools import chain
from typing import Sequence

import numpy as np
import torch

from gemma4.backends import backend_of
from gemma4.engine.request import Request
from gemma4.ops.paged_attention import SequenceLayout


def bucket(n: int, cap: int | None = None) -> int:
    """The padded size for `n`: the next power of two (at least 1), at most `cap`."""
    size = 1 << max(0, math.ceil(math.log2(max(n, 1))))
    return size if cap is None else min(size, cap)


@dataclass(frozen=True)
class StepShape:
    """Static sizes of one padded step: tokens; single-query sequences (decodes) and longer ones
    (prefill chunks and decodes with draft tokens, padded to `max_query_len`); block-table columns;
    sampling rows beyond one per sequence (the draft tokens' verification rows)."""

    num_tokens: int
    decode_seqs: int
    prefill_seqs: int
    max_query_len: int
    table_cols: int
    spec_rows: int = 0

    @property
    def num_seqs(self) -> int:
        return self.decode_seqs + self.prefill_seqs

    @property
    def grids(self) -> tuple[tuple[int, int], ...]:
        """The query grids (sequences, query length) of `ops.paged_attention`, empty ones left out."""
        grids = ((self.decode_seqs, 1), (self.prefill_seqs, self.max_query_len))
        return tuple(g for g in grids if g[0])


@dataclass(frozen=True)
class StepTensors:
    """One step's inputs on the device (views of the step buffer) plus the static shape they have."""

    shape: StepShape
    input_ids: torch.Tensor  # [T]
    positions: torch.Tensor  # [T]
    layout: SequenceLayout
    sample_rows: torch.Tensor  # [S + spec rows] flat-step rows whose logits the sequences sample from
    block_tables: tuple[torch.Tensor, ...]  # per cache group, [S, cols]


@dataclass(frozen=True)
class StagedStep:
    """A staged step: its device tensors, and the requests that sample (in `sample_rows` order; a request
    with k draft tokens appears k + 1 times in a row, for the positions after its last token and each draft)."""

    tensors: StepTensors
    sampling: list[Request]


class StepBuffers:
    """The persistent host (pinned where the backend pins) and device buffers a step is staged through."""

    _SECTIONS = ("input_ids", "positions", "token_seq", "token_mask")
    _SEQ_SECTIONS = ("query_start", "query_len", "context_len", "sample_rows")

    def __init__(
        self,
        max_tokens: int,
        max_seqs: int,
        max_cols: int,
        num_groups: int,
        device: torch.device,
        *,
        spans: bool = False,
    ) -> None:
        """`spans`: stage a span id per token (-1 outside spans) for the bidirectional blocks of a step."""
        self.max_tokens, self.max_seqs, self.max_cols = max_tokens, max_seqs, max_cols
        self.num_groups = num_groups
        self.device = device
        self.spans = spans
        self._token_sections = self._SECTIONS + (("span_ids",) if spans else ())
        # Sampling rows beyond one per sequence are draft verifications: at most one per token.
        size = (len(self._token_sections) + 1) * max_tokens + 4 * max_seqs + num_groups * max_seqs * max_cols
        backend = backend_of(device)
        self.host = torch.zeros(size, dtype=torch.int64, pin_memory=backend.pinned_memory)
        self._host_np = self.host.numpy()
        self.device_buffer = self.host if backend.host_memory else self.host.to(device)
        self._tables = _TableRows(num_groups, max_cols, keep=2 * max_seqs)
        # The host buffer is rewritten only once the previous step's copy out of it has completed.
        self._copied = backend.event()

    def _offsets(self, shape: StepShape) -> tuple[dict[str, tuple[int, int]], int]:
        """Section name -> (offset, length) for `shape`, packed from the start; and the total used."""
        t, s = shape.num_tokens, shape.num_seqs
        sections: dict[str, tuple[int, int]] = {}
        offset = 0
        for name in self._token_sections:
            sections[name] = (offset, t)
            offset += t
        for name in self._SEQ_SECTIONS:
            length = s + shape.spec_rows if name == "sample_rows" else s
            sections[name] = (offset, length)
            offset += length
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
        spans: Sequence[tuple[int, int]] = (),
    ) -> StagedStep:
        """Write the step for `requests` (`num_tokens[i]` new tokens each, `tables[i]` its block tables
        per group, `spans` the step-row ranges of its bidirectional blocks) padded to `shape`, copy it to
        the device, and return the views."""
        if (
            shape.num_tokens > self.max_tokens
            or shape.num_seqs > self.max_seqs
            or shape.table_cols > self.max_cols
            or shape.spec_rows > self.max_tokens
        ):
            raise ValueError(f"step shape {shape} exceeds the step buffers' capacity")
        sections, used = self._offsets(shape)
        if self._copied is not None:
            self._copied.synchronize()
        buf = self._host_np
        buf[:used] = 0

        def section(name: str) -> np.ndarray:
            offset, length = sections[name]
            return buf[offset : offset + length]

        ids, pos, seq, mask = (section(n) for n in self._SECTIONS)
        q_start, q_len, ctx, sample = (section(n) for n in self._SEQ_SECTIONS)
        count = len(requests)
        starts = np.fromiter((r.num_computed_tokens for r in requests), np.int64, count)
        lengths = np.asarray(num_tokens, dtype=np.int64)
        total = int(lengths.sum())
        offsets = np.cumsum(lengths) - lengths
        # Sequence slots: single-query sequences first (the decode grid), then the prefill grid's.
        single = lengths == 1
        slots = np.where(single, np.cumsum(single) - 1, shape.decode_seqs + np.cumsum(~single) - 1)
        q_start[slots], q_len[slots], ctx[slots] = offsets, lengths, starts + lengths
        if total == count:  # decode-only: one token each
            ids[:count] = [r.token_ids[r.num_computed_tokens] for r in requests]
            pos[:count] = starts
            seq[:count] = slots
        else:
            ids[:total] = list(
                chain.from_iterable(
                    (r.token_ids + r.spec_token_ids if r.spec_token_ids else r.token_ids)[s : s + n]
                    for r, s, n in zip(requests, starts.tolist(), num_tokens)
                )
            )
            seq[:total] = np.repeat(slots, lengths)
            pos[:total] = np.arange(total) - np.repeat(offsets - starts, lengths)
        mask[:total] = 1
        if self.spans:
            span = section("span_ids")
            span[:] = -1
            for index, (first, end) in enumerate(spans):
                span[first:end] = index
        ends = starts + lengths
        samples = np.flatnonzero(ends == np.fromiter((r.num_tokens_with_spec for r in requests), np.int64, count))
        last_rows = offsets[samples] + lengths[samples] - 1
        drafts = [len(requests[i].spec_token_ids) for i in samples.tolist()]
        if any(drafts):  # a request with k drafts samples at its last k + 1 rows
            rows = [row - k + j for row, k in zip(last_rows.tolist(), drafts) for j in range(k + 1)]
            sample[: len(rows)] = rows
            sampling = [requests[i] for i, k in zip(samples.tolist(), drafts) for _ in range(k + 1)]
        else:
            sample[: len(samples)] = last_rows
            sampling = [requests[i] for i in samples.tolist()]
        for g in range(self.num_groups):
            table = section(f"table{g}").reshape(shape.num_seqs, shape.table_cols)
            self._tables.fill(table, slots, g, requests, [t[g] for t in tables])
        if self.device_buffer is not self.host:
            self.device_buffer[:used].copy_(self.host[:used], non_blocking=True)
            if self._copied is not None:
                self._copied.record()
        return StagedStep(self._views(shape, sections), sampling)

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
            grids=shape.grids,
            # A single-query grid has no later key to see: decode steps (and their graphs) go without.
            span_ids=view("span_ids") if self.spans and shape.prefill_seqs else None,
        )
        tables = tuple(view(f"table{g}").view(shape.num_seqs, shape.table_cols) for g in range(self.num_groups))
        return StepTensors(shape, view("input_ids"), view("positions"), layout, view("sample_rows"), tables)


class _TableRows:
    """Each running request's block tables as array rows, updated by appending (block tables only grow;
    entries a sliding group releases lie before every later query's window and are never read).

    A table list the KV manager replaced (after preemption) is copied afresh. Rows of requests that
    left are dropped once more than `keep` are held.
    """

    def __init__(self, num_groups: int, max_cols: int, keep: int) -> None:
        self.num_groups, self.max_cols, self.keep = num_groups, max_cols, keep
        # request id -> per group: (the KV manager's table list, its row, entries copied so far)
        self._rows: dict[str, list[tuple[list[int], np.ndarray, int]]] = {}

    def fill(
        self, out: np.ndarray, rows: np.ndarray, group: int, requests: Sequence[Request], tables: Sequence[list[int]]
    ) -> None:
        """Write `tables[i]` (group `group` of `requests[i]`) into row `rows[i]` of `out [S, cols]`."""
        cols = out.shape[1]
        for i, request, table in zip(rows.tolist(), requests, tables):
            entry = self._rows.get(request.request_id)
            if entry is None:
                if len(self._rows) >= self.keep:
                    self._prune({r.request_id for r in requests})
                entry = self._rows[request.request_id] = [([], np.zeros(0, np.int64), 0)] * self.num_groups
            source, row, synced = entry[group]
            if source is not table or len(row) < len(table):
                if source is not table:
                    synced = 0
                grown = np.zeros(max(len(table), min(2 * len(row), self.max_cols), 1), np.int64)
                grown[:synced] = row[:synced]
                row = grown
            if synced < len(table):
                row[synced : len(table)] = table[synced:]
                synced = len(table)
            entry[group] = (table, row, synced)
            n = min(synced, cols)
            out[i, :n] = row[:n]

    def _prune(self, live: set[str]) -> None:
        for request_id in [r for r in self._rows if r not in live]:
            del self._rows[request_id]
