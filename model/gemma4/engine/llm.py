"""Offline batch generation: `gemma4.LLM(path_or_config).generate(prompts, sampling_params)`."""

from __future__ import annotations

from dataclasses import fields
from pathlib import Path
from typing import Any, Mapping, Sequence

import torch

from gemma4.backends import backend_of
from gemma4.config import Gemma4Config
from gemma4.engine.executor import Executor, MultiprocExecutor
from gemma4.engine.llm_engine import EngineArgs, LLMEngine, Prompt
from gemma4.engine.outputs import RequestOutput
from gemma4.engine.sampling_params import SamplingParams
from gemma4.engine.worker import WorkerConfig
from gemma4.loader import load_model
from gemma4.modeling import Gemma4ForCausalLM
from gemma4.media.inputs import MultimodalPrompt
from gemma4.tokenizer import Gemma4Tokenizer, load_tokenizer
from gemma4.towers import reset_tower_constants


def random_weights_model(
    config: Gemma4Config, *, dtype: torch.dtype, device: str | torch.device, seed: int = 0
) -> Gemma4ForCausalLM:
    """A model of `config` with random weights, built directly on the device (benchmarks, no checkpoint);
    a lazy device (XLA) has no generators, so its weights are drawn on the host one tensor at a time."""
    with torch.device("meta"):
        model = Gemma4ForCausalLM(config)
    model = model.to(dtype).to_empty(device=device)
    draw_on = backend_of(device).generator_device(device)
    generator = torch.Generator(device=draw_on).manual_seed(seed)
    with torch.no_grad():
        for tensor in model.state_dict(keep_vars=True).values():
            if tensor.dim() <= 1:
                tensor.fill_(1.0)
            else:
                drawn = torch.empty(tensor.shape, dtype=tensor.dtype, device=draw_on).normal_(0.0, 0.02, generator=generator)
                tensor.copy_(drawn)
    reset_tower_constants(model.towers)
    model.reset_buffers()
    return model.eval().requires_grad_(False)


class LLM:
    """Load a checkpoint directory (or build random weights for a config) and generate in batches.

    Keyword arguments are `EngineArgs` fields (block_size, max_num_seqs, num_kv_blocks, ...). With
    `tensor_parallel_size > 1` each rank loads its shard of the checkpoint in its own process (a
    `MultiprocExecutor`; on GPUs rank r uses device r from `device` on); `shutdown()` stops them.
    """

    def __init__(
        self,
        model: str | Path | Gemma4Config,
        *,
        dtype: torch.dtype = torch.bfloat16,
        device: str | torch.device = "cpu",
        tokenizer: Gemma4Tokenizer | None = None,
        **engine_args: Any,
    ) -> None:
        known = {f.name for f in fields(EngineArgs)}
        unknown = sorted(set(engine_args) - known)
        if unknown:
            raise ValueError(f"unknown engine argument(s) {', '.join(unknown)}; known: {', '.join(sorted(known))}")
        args = EngineArgs(**engine_args)
        target: Gemma4ForCausalLM | Executor
        if isinstance(model, Gemma4Config):
            if args.tensor_parallel_size > 1:
                raise ValueError("tensor_parallel_size > 1 needs a checkpoint path: each rank loads its shard of it")
            target = random_weights_model(model, dtype=dtype, device=device, seed=args.seed)
        else:
            if args.tensor_parallel_size > 1:
                target = MultiprocExecutor(WorkerConfig.of(model, dtype, device, args))
            else:
                target = load_model(model, dtype=dtype, device=device)
            if tokenizer is None and (Path(model) / "tokenizer.json").is_file():
                tokenizer = load_tokenizer(model)
        try:
            self.engine = LLMEngine(target, tokenizer, args)
        except BaseException:
            if isinstance(target, Executor):
                target.shutdown()
            raise

    @property
    def tokenizer(self) -> Gemma4Tokenizer | None:
        return self.engine.tokenizer

    def generate(
        self,
        prompts: Prompt | Sequence[Prompt],
        sampling_params: SamplingParams | Sequence[SamplingParams] | None = None,
    ) -> list[RequestOutput]:
        """Final outputs, in the order of `prompts`. Every prompt is validated before any runs."""
        batch = _as_batch(prompts)
        params = list(sampling_params) if isinstance(sampling_params, (list, tuple)) else [sampling_params] * len(batch)
        if len(params) != len(batch):
            raise ValueError(f"got {len(params)} sampling params for {len(batch)} prompts")
        engine = self.engine
        params = [p or SamplingParams() for p in params]
        checked = [engine.check_request(prompt, p) for prompt, p in zip(batch, params)]  # fail before queueing
        ids = [
            engine.add_request(prompt if isinstance(prompt, MultimodalPrompt) else token_ids, p, parse_chat=chat)
            for prompt, (token_ids, chat), p in zip(batch, checked, params)
        ]
        final: dict[str, RequestOutput] = {}
        while engine.has_unfinished_requests():
            for output in engine.step():
                if output.finished:
                    final[output.request_id] = output
        return [final[i] for i in ids]

    def shutdown(self) -> None:
        """Stop the engine's workers (those of a multi-rank engine are processes)."""
        self.engine.shutdown()


def _as_batch(prompts: Prompt | Sequence[Prompt]) -> list[Prompt]:
    """One prompt (text, token ids, chat messages, ChatPrompt) or a list of them."""
    if isinstance(prompts, str) or not isinstance(prompts, (list, tuple)):
        return [prompts]
    if prompts and all(isinstance(t, int) and not isinstance(t, bool) for t in prompts):
        return [list(prompts)]
    if prompts and all(isinstance(m, Mapping) for m in prompts):
        return [list(prompts)]
    return list(prompts)
