"""Runs one scheduled step through the model over the paged KV cache.

The step's tokens are flattened into one row, padded to bucketed shapes and staged through
persistent buffers (`step_inputs`); logits are computed only for the last token of each request whose
computed tokens reach its end (a finished prefill or a decode), since only those sample. A step that
computes media placeholders gets their soft tokens (`StepMedia`, from the worker's encoder cache),
scattered into the embeddings, and on the vision models its image blocks as bidirectional spans;
such a step always runs eagerly.

Decode-only steps run at a batch-size bucket with one query per sequence and block tables of the
full `max_model_len` width: on CUDA each bucket is a captured graph (`DecodeGraphs`) replayed over
the same buffers; elsewhere (and above the largest bucket) the same padded step runs eagerly, so the
CPU tests cover everything but the capture itself. Prefill and mixed steps run eagerly at bucketed
shapes. `torch.compile` of the decode forward (`fullgraph=True`, one static graph per bucket, compiled
while the graphs are captured at start-up) is an option; the whole forward compiles, prefill included.
The runner picks the hot-path ops once (`gemma4.backends.select_ops`: Triton kernels on CUDA/ROCm,
torch reference ops on the CPU/XLA, or as `kernels` says) and hands them to the model (`use_ops`).
"""

from __future__ import annotations

from typing import Protocol

import torch

from gemma4.backends import KernelChoice, backend_of, select_ops
from gemma4.config import FULL
from gemma4.engine.encoder_cache import StepMedia
from gemma4.engine.paged_attention import PagedAttention, key_scales, PagedKVCache, SequenceSlice, check_block_tables, debug_checks_enabled
from gemma4.engine.request import Request
from gemma4.engine.scheduler import ScheduledBatch
from gemma4.engine.step_inputs import StagedStep, StepBuffers, StepShape, StepTensors, bucket
from gemma4.kv_layout import CacheGroup
from gemma4.modeling import Gemma4ForCausalLM, SoftTokens


class BlockTables(Protocol):
    """Where a step's block tables come from: the KV manager, or a worker's mirror of its tables."""

    def block_tables(self, seq_id: str) -> list[list[int]]: ...


def decode_buckets(max_num_seqs: int) -> tuple[int, ...]:
    """Batch sizes decode steps are padded to (and captured at): powers of two up to `max_num_seqs`."""
    return tuple(sorted({bucket(n, max_num_seqs) for n in range(1, max_num_seqs + 1)}))


class ModelRunner:
    """Stages steps, runs the forward (graph replay, compiled or eager) and returns the sampling rows' logits."""

    def __init__(
        self,
        model: Gemma4ForCausalLM,
        groups: tuple[CacheGroup, ...],
        num_blocks: dict[str, int],
        block_size: int,
        *,
        max_num_seqs: int,
        max_num_batched_tokens: int,
        max_model_len: int,
        cuda_graphs: bool = True,
        torch_compile: bool = False,
        kernels: KernelChoice = "auto",
        keep_hidden: bool = False,
    ) -> None:
        """`keep_hidden`: keep the sampling rows' final hidden states of each step (`sample_hidden`), the
        assistant drafter's input."""
        self.model = model
        self.keep_hidden = keep_hidden
        self.sample_hidden: torch.Tensor | None = None
        param = next(model.parameters())
        self.device, self.dtype = param.device, param.dtype
        self.ops = select_ops(self.device, kernels)
        model.use_ops(self.ops)
        self.block_size = block_size
        self.cache = PagedKVCache(groups, num_blocks, block_size, self.dtype, self.device)
        self.max_cols = -(-max_model_len // block_size)
        self.buckets = decode_buckets(max_num_seqs)
        max_tokens = bucket(max(max_num_batched_tokens, max_num_seqs))
        # Image blocks attend bidirectionally on the sliding layers of the vision models.
        self.spans = model.text_config.use_bidirectional_attention == "vision"
        # Two grids of up to a bucket each: decodes and prefill chunks.
        self.buffers = StepBuffers(
            max_tokens, 2 * self.buckets[-1], self.max_cols, len(groups), self.device, spans=self.spans
        )
        # What PagedAttention reads K-as-V keys with (also the assistant drafter, over this cache).
        self.key_scales = key_scales(model)
        self.key_inv_freq = model.model.rotary[FULL].inv_freq
        if torch_compile:
            # One static graph per decode bucket (and table width): room for each of them.
            torch._dynamo.config.recompile_limit = max(torch._dynamo.config.recompile_limit, 4 * len(self.buckets))
        self._decode_forward = torch.compile(self.eager_forward, fullgraph=True, dynamic=False) if torch_compile else self.eager_forward
        self.graphs = DecodeGraphs(self) if cuda_graphs and backend_of(self.device).cuda_graphs else None

    def forward(self, step: StepTensors) -> torch.Tensor:
        """The model over a staged step: fp32 logits of the sampling rows, `[S, vocab]` (compiled for
        decode steps when `torch_compile` is on; prefill and mixed steps, whose shapes vary most, run eagerly)."""
        return (self._decode_forward if step.shape.prefill_seqs == 0 else self.eager_forward)(step)

    def eager_forward(self, step: StepTensors, soft_tokens: SoftTokens | None = None) -> torch.Tensor:
        attention = PagedAttention(self.cache, step, self.ops, self.key_scales, self.key_inv_freq, spans=self.spans)
        token_mask = (step.layout.token_mask != 0)[None]
        hidden = self.model.hidden_states(
            step.input_ids[None], step.positions[None], attention, token_mask=token_mask, soft_tokens=soft_tokens
        )[0, step.sample_rows]
        if self.keep_hidden:
            self.sample_hidden = hidden
        return self.model.compute_logits(hidden)

    def step_shape(self, batch: ScheduledBatch) -> StepShape:
        """The padded shape of `batch`: a decode bucket, or bucketed prefill/mixed sizes."""
        num_seqs = len(batch.requests)
        if max(batch.num_tokens) == 1 and num_seqs <= self.buckets[-1]:
            size = bucket(num_seqs, self.buckets[-1])
            # Graph buckets read tables of the full width; eager decode only what the batch needs.
            cols = self.max_cols if self.graphs is not None and size in self.graphs.sizes else self._table_cols(batch)
            return StepShape(size, size, 0, 1, cols)
        decodes = sum(1 for n in batch.num_tokens if n == 1)
        chunks = [n for n in batch.num_tokens if n > 1]
        drafts = sum(len(r.spec_token_ids) for r in batch.requests)
        return StepShape(
            num_tokens=bucket(batch.total_tokens, self.buffers.max_tokens),
            decode_seqs=bucket(decodes) if decodes else 0,
            prefill_seqs=bucket(len(chunks)) if chunks else 0,
            max_query_len=bucket(max(chunks, default=1)),
            table_cols=self._table_cols(batch),
            spec_rows=bucket(drafts, self.buffers.max_tokens) if drafts else 0,
        )

    def _table_cols(self, batch: ScheduledBatch) -> int:
        longest = max(r.num_computed_tokens + n for r, n in zip(batch.requests, batch.num_tokens))
        return bucket(-(-longest // self.block_size), self.max_cols)

    def stage(
        self, batch: ScheduledBatch, kv: BlockTables, spans: list[tuple[int, int]] | None = None
    ) -> StagedStep:
        tables = [kv.block_tables(r.request_id) for r in batch.requests]
        if debug_checks_enabled():
            check_block_tables(self.cache, _slices(batch, tables))
        return self.buffers.stage(self.step_shape(batch), batch.requests, batch.num_tokens, tables, spans or ())

    def execute(
        self, batch: ScheduledBatch, kv: BlockTables, *, media: StepMedia | None = None
    ) -> tuple[torch.Tensor, list[Request]]:
        """Run the step; returns fp32 logits `[n, vocab]` for the requests that sample, in order (n >= the
        number of sampling requests: padded rows follow and are to be ignored)."""
        with backend_of(self.device).inference():
            return self._execute(batch, kv, media)

    def _execute(
        self, batch: ScheduledBatch, kv: BlockTables, media: StepMedia | None
    ) -> tuple[torch.Tensor, list[Request]]:
        staged = self.stage(batch, kv, None if media is None else media.spans)
        step = staged.tensors
        if media is not None:
            logits = self.eager_forward(step, media.soft_tokens)
        elif self.graphs is not None and self.graphs.captured(step.shape):
            logits = self.graphs.replay(step.shape.decode_seqs)
        else:
            logits = self.forward(step)
        return logits, staged.sampling


def _slices(batch: ScheduledBatch, tables: list[list[list[int]]]) -> list[SequenceSlice]:
    """The step as the debug block-table check reads it."""
    slices, row = [], 0
    for request, n, table in zip(batch.requests, batch.num_tokens, tables):
        slices.append(SequenceSlice(row, n, request.num_computed_tokens + n, table))
        row += n
    return slices


class DecodeGraphs:
    """CUDA graphs of decode steps, one per batch-size bucket, over the runner's persistent buffers.

    A graph's step has block tables of the full `max_model_len` width, so the reference attention op
    gathers that many keys per sequence: with it, buckets whose gather would exceed
    `GATHER_BUDGET_BYTES` per layer are not captured and run eagerly at the widths the step needs. The
    attention kernel reads only each sequence's context, whatever the table width: every bucket is
    captured. Captured at start-up with
    every sequence padded (they write only zeros to the null block and count no expert load), largest
    bucket first so smaller ones reuse its memory pool. A replay reads the step the runner staged
    into the same buffer addresses.
    """

    GATHER_BUDGET_BYTES = 1 << 30

    def __init__(self, runner: ModelRunner) -> None:
        self.max_cols = runner.max_cols
        per_sequence = 0 if runner.ops.kernels == "triton" else max(
            runner.max_cols * runner.block_size * g.num_kv_heads * g.head_dim * runner.dtype.itemsize
            for g in runner.cache.groups
        )
        self.sizes = [b for b in runner.buckets if b * per_sequence <= self.GATHER_BUDGET_BYTES]
        self.logits: dict[int, torch.Tensor] = {}
        self.hidden: dict[int, torch.Tensor | None] = {}  # the sampling rows' hidden states, with keep_hidden
        self.graphs: dict[int, torch.cuda.CUDAGraph] = {}
        self.runner = runner
        pool = torch.cuda.graph_pool_handle()
        with torch.inference_mode():
            for size in reversed(self.sizes):
                shape = self.shape(size)
                runner.buffers.stage(shape, [], [], [])
                step = runner.buffers.views(shape)
                stream = torch.cuda.Stream()
                stream.wait_stream(torch.cuda.current_stream())
                with torch.cuda.stream(stream):
                    for _ in range(2):  # warm up (allocator, autotuning, compilation) outside capture
                        runner.forward(step)
                torch.cuda.current_stream().wait_stream(stream)
                graph = torch.cuda.CUDAGraph()
                with torch.cuda.graph(graph, pool=pool):
                    self.logits[size] = runner.forward(step)
                self.graphs[size] = graph
                self.hidden[size] = runner.sample_hidden
        torch.cuda.synchronize()

    def shape(self, size: int) -> StepShape:
        """The step shape a decode graph of batch `size` was captured at."""
        return StepShape(size, size, 0, 1, self.max_cols)

    def captured(self, shape: StepShape) -> bool:
        return shape.decode_seqs in self.graphs and shape == self.shape(shape.decode_seqs)

    def replay(self, size: int) -> torch.Tensor:
        self.graphs[size].replay()
        self.runner.sample_hidden = self.hidden[size]
        return self.logits[size]
