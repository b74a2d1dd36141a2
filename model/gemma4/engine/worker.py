"""One rank of a replica: its model shard, its share of the KV cache, and (rank 0) the sampler.

A worker joins the replica's process group, loads its shard, sizes and allocates its KV pools and
then runs `WorkerStep`s: it mirrors every request it has been sent (prompt, media, parameters, the
tokens so far, block tables), encodes the media items the step reads that its encoder cache lacks
(every rank: the towers are replicated), stages the step through the runner's persistent buffers exactly as a
single-device engine would, runs its shard (the collectives inside the model keep the ranks in
step), and on rank 0 samples from the gathered logits. The engine core never sees tensors.
`Worker.wrap` runs an already-built single-device model in the core's own process (the default).
Rank 0 also keeps the structured-output matchers (with the tokenizer: the checkpoint's, or the one
`wrap` is given) and fills their token masks on a thread while the forward runs.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path
from typing import Mapping

import torch
import torch.distributed as dist

from gemma4.backends import backend_of
from gemma4.config import Gemma4Config
from gemma4.engine.args import EngineArgs, resolve_kv_cache_bytes
from gemma4.engine.encoder_cache import EncoderOutputs
from gemma4.engine.model_runner import ModelRunner
from gemma4.engine.request import Request
from gemma4.engine.sampler import Sampler
from gemma4.engine.scheduler import ScheduledBatch
from gemma4.engine.structured_output.compiler import GrammarCompiler
from gemma4.engine.structured_output.state import StructuredOutputs, sampling_rows
from gemma4.engine.worker_step import NewRequestData, ScheduledSequence, StepOutput, WorkerStep
from gemma4.kv_layout import split_kv_budget
from gemma4.loader import load_model
from gemma4.memory import rank_cache_groups
from gemma4.modeling import Gemma4ForCausalLM
from gemma4.parallel.comm import SINGLE, Collectives, init_collectives
from gemma4.parallel.layout import ParallelLayout
from gemma4.parallel.placement import ExpertPlacement
from gemma4.tokenizer import Gemma4Tokenizer, load_tokenizer


@dataclass(frozen=True)
class WorkerConfig:
    """Everything a rank needs to start (picklable: it crosses to spawned processes and Ray actors).

    `device` is the device this rank uses (a multi-process executor gives each rank its own);
    `dtype` a torch dtype name ("bfloat16"); `layout` the replica's layout at rank 0, matching `engine_args`.
    """

    checkpoint: str
    dtype: str
    device: str
    engine_args: EngineArgs
    layout: ParallelLayout

    def __post_init__(self) -> None:
        if not isinstance(getattr(torch, self.dtype, None), torch.dtype):
            raise ValueError(f"dtype must name a torch dtype (bfloat16, float32, ...), got {self.dtype!r}")
        if self.layout != self.engine_args.layout.with_rank(self.layout.rank):
            raise ValueError(f"layout {self.layout} does not match the engine arguments' {self.engine_args.layout}")
        backend = backend_of(self.device)
        if self.layout.distributed and not backend.multi_device:
            raise ValueError(f"a replica on {backend.name} runs on one device; tensor_parallel_size must be 1")

    @classmethod
    def of(cls, checkpoint: str | Path, dtype: torch.dtype, device: str | torch.device, args: EngineArgs) -> WorkerConfig:
        return cls(str(checkpoint), str(dtype).removeprefix("torch."), str(device), args, args.layout)

    @property
    def torch_dtype(self) -> torch.dtype:
        return getattr(torch, self.dtype)

    def on_device(self, device: str) -> WorkerConfig:
        return dataclasses.replace(self, device=device)


class MirrorRequests:
    """The worker's copy of each request it was sent: a `Request` (what staging and sampling read)
    and its block tables per cache group (what `ModelRunner.stage` reads through `block_tables`)."""

    def __init__(self) -> None:
        self.requests: dict[str, Request] = {}
        self.tables: dict[str, list[list[int]]] = {}

    def add(self, new: NewRequestData, num_groups: int) -> None:
        self.requests[new.request_id] = Request(
            new.request_id, list(new.prompt_token_ids), new.sampling_params, new.stop_token_ids, media=new.media
        )
        self.tables[new.request_id] = [[] for _ in range(num_groups)]

    def remove(self, request_id: str) -> None:
        self.requests.pop(request_id, None)
        self.tables.pop(request_id, None)

    def update(self, seq: ScheduledSequence) -> Request:
        """Apply one scheduled sequence's new tokens, computed count and table deltas; its mirror request.

        A replaced table is a new list, so the runner's staged table rows see a new table and copy it afresh.
        """
        request = self.requests[seq.request_id]
        request.token_ids.extend(seq.new_token_ids)
        request.num_computed_tokens = seq.num_computed_tokens
        tables = self.tables[seq.request_id]
        for g, (replace, blocks) in enumerate(seq.table_updates):
            if replace:
                tables[g] = list(blocks)
            else:
                tables[g].extend(blocks)
        return request

    def block_tables(self, seq_id: str) -> list[list[int]]:
        return self.tables[seq_id]


class Worker:
    """A rank's model shard, KV cache and (rank 0) sampler; every method is called on all ranks alike."""

    def __init__(self, config: WorkerConfig, rank: int, init_method: str | None) -> None:
        layout = config.layout.with_rank(rank)
        backend = backend_of(config.device)
        comm = SINGLE
        if layout.distributed:
            if init_method is None:
                raise ValueError("a rank of a multi-rank replica needs the process group's init_method")
            comm = init_collectives(backend.collectives, init_method, layout.world_size, rank)
        model = load_model(config.checkpoint, dtype=config.torch_dtype, device=config.device, layout=layout, comm=comm)
        has_tokenizer = rank == 0 and (Path(config.checkpoint) / "tokenizer.json").is_file()
        tokenizer = load_tokenizer(config.checkpoint) if has_tokenizer else None
        self._setup(model, config.engine_args, layout, comm, config.checkpoint, tokenizer)

    @classmethod
    def wrap(cls, model: Gemma4ForCausalLM, args: EngineArgs, tokenizer: Gemma4Tokenizer | None = None) -> Worker:
        """A single-device worker over an already-built model, in the caller's process (`tokenizer`: for
        structured outputs)."""
        if args.tensor_parallel_size != 1:
            raise ValueError(
                f"tensor_parallel_size={args.tensor_parallel_size} needs one worker per rank "
                "(a MultiprocExecutor over a checkpoint), not one in-process model"
            )
        worker = cls.__new__(cls)
        worker._setup(model, args, ParallelLayout(), SINGLE, checkpoint=None, tokenizer=tokenizer)
        return worker

    def _setup(
        self, model: Gemma4ForCausalLM, args: EngineArgs, layout: ParallelLayout, comm: Collectives,
        checkpoint: str | None, tokenizer: Gemma4Tokenizer | None,
    ) -> None:
        self.model = model
        self.checkpoint = checkpoint  # where moved experts are read from (None: a wrapped model, ep = 1)
        self.args = args
        self.layout = layout
        self.comm = comm
        text = model.text_config
        self.max_model_len = args.model_len(text)
        self.groups = rank_cache_groups(text, layout.tensor_parallel)
        self.mirrors = MirrorRequests()
        device = next(model.parameters()).device
        self.encoder_outputs = EncoderOutputs(model.encode_media, lambda: backend_of(device).synchronize(device))
        self.runner: ModelRunner | None = None
        self.sampler: Sampler | None = None
        self.tokenizer = tokenizer  # rank 0's, for structured outputs (None: requests carry no constraint)
        self.structured: StructuredOutputs | None = None

    @property
    def config(self) -> Gemma4Config:
        return self.model.config

    def num_kv_blocks(self) -> dict[str, int]:
        """Blocks per cache group that fit this rank's KV budget (or `num_kv_blocks` for every group)."""
        args = self.args
        if args.num_kv_blocks is not None:
            return {g.name: args.num_kv_blocks for g in self.groups}
        return split_kv_budget(
            self.groups,
            resolve_kv_cache_bytes(self.model, args),
            block_size=args.block_size,
            kv_dtype_bytes=next(self.model.parameters()).element_size(),
            max_num_seqs=args.max_num_seqs,
            max_model_len=self.max_model_len,
            max_num_batched_tokens=args.max_num_batched_tokens,
        )

    def init_cache(self, num_blocks: Mapping[str, int]) -> None:
        """Allocate the KV pools (the same block counts on every rank) and the step machinery."""
        args = self.args
        self.runner = ModelRunner(
            self.model,
            self.groups,
            dict(num_blocks),
            args.block_size,
            max_num_seqs=args.max_num_seqs,
            max_num_batched_tokens=args.max_num_batched_tokens,
            max_model_len=self.max_model_len,
            cuda_graphs=args.cuda_graphs,
            torch_compile=args.torch_compile,
            kernels=args.kernels,
        )
        if self.layout.rank == 0:
            text = self.model.text_config
            self.sampler = Sampler(text.vocab_size, self.runner.device, args.seed, draw=self.runner.ops.sample_draw)
            if self.tokenizer is not None:
                pin = backend_of(self.runner.device).pinned_memory
                self.structured = StructuredOutputs(GrammarCompiler(self.tokenizer, text.vocab_size), pin_memory=pin)

    def execute(self, step: WorkerStep) -> StepOutput | None:
        """Run one step; rank 0 returns its output (a result per request that sampled), others None."""
        assert self.runner is not None, "init_cache first"
        for request_id in step.finished_request_ids:
            self.mirrors.remove(request_id)
            if self.sampler is not None:
                self.sampler.remove(request_id)
            if self.structured is not None:
                self.structured.remove(request_id)
        for new in step.new_requests:
            self.mirrors.add(new, len(self.groups))
        self.encoder_outputs.free(step.encoder_frees)
        with backend_of(self.runner.device).inference():
            encoder_seconds = self.encoder_outputs.encode(
                [self.mirrors.requests[request_id].media[index].features for request_id, index in step.encoder_inputs]
            )
        batch = ScheduledBatch()
        for seq in step.sequences:
            batch.add(self.mirrors.update(seq), seq.num_tokens)
        media = self.encoder_outputs.step_media(batch.requests, batch.num_tokens, spans=self.runner.spans)
        masks = None if self.structured is None else self.structured.start(sampling_rows(batch.requests, batch.num_tokens))
        logits, sampling = self.runner.execute(batch, self.mirrors, media=media)
        if self.sampler is None:
            return None
        allowed = None if masks is None else masks.result(sampling)
        return StepOutput(self.sampler.sample(logits, sampling, allowed=allowed), encoder_seconds)

    def expert_load(self) -> dict[int, list[int]]:
        """Tokens routed to each expert so far, per MoE layer (routing is replicated: every rank counts alike)."""
        return self.model.expert_load()

    def expert_placements(self) -> dict[int, ExpertPlacement]:
        """Where each MoE layer's experts live now."""
        return self.model.expert_placements()

    def apply_expert_placements(self, placements: Mapping[int, ExpertPlacement]) -> None:
        """Move experts to `placements` (between steps; every rank at once), reading the moved ones' slices."""
        if self.checkpoint is None:
            raise ValueError("a wrapped model has no checkpoint to read moved experts from")
        self.model.set_expert_placements(placements, self.checkpoint)

    def shutdown(self) -> None:
        """Leave the process group (a single-device worker has none)."""
        if self.comm.world_size > 1 and dist.is_initialized():
            dist.destroy_process_group()
