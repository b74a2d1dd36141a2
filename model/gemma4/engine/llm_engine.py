"""The synchronous engine: validated requests in, one scheduled model step at a time, outputs out.

`LLMEngine` validates and tokenizes requests and owns the two halves of a step: the engine core
(`gemma4.engine.core`: schedule, forward, sample, token stops, free blocks) and the output processor
(`gemma4.engine.output_processor`: detokenize, stop strings, chat parsing, delta outputs).
`LLMEngine.step()` runs both inline; the `AsyncEngine` runs them on two threads. The offline `LLM`
drives it directly; it knows nothing of servers.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass
from typing import Any, Mapping, Sequence, Union

import torch

from gemma4.backends import KERNEL_CHOICES, KernelChoice
from gemma4.engine.core import EngineCore
from gemma4.engine.kv_cache_manager import KVCacheManager
from gemma4.engine.model_runner import ModelRunner
from gemma4.engine.output_processor import OutputProcessor
from gemma4.engine.outputs import EngineStats, RequestOutput
from gemma4.engine.request import Request
from gemma4.engine.sampler import Sampler
from gemma4.engine.sampling_params import SamplingParams
from gemma4.engine.scheduler import Scheduler, SchedulerConfig
from gemma4.kv_layout import cache_groups, split_kv_budget
from gemma4.memory import kv_cache_budget_bytes
from gemma4.modeling import Gemma4ForCausalLM
from gemma4.tokenizer import Gemma4Tokenizer


MAX_CACHE_SALT_CHARS = 256
CPU_KV_CACHE_BYTES = 1 << 30  # the KV budget on the CPU, where device memory is the host's
_WEIGHT_DTYPES = {torch.float32: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16"}


@dataclass(frozen=True)
class ChatPrompt:
    """A conversation to render with the checkpoint's chat template; its output is chat-parsed."""

    messages: Sequence[Mapping[str, Any]]
    tools: Sequence[Mapping[str, Any]] | None = None
    thinking: bool = False


Prompt = Union[str, Sequence[int], Sequence[Mapping[str, Any]], ChatPrompt]


@dataclass(frozen=True)
class EngineArgs:
    """Engine limits and cache sizing.

    The KV pools are sized from `kv_cache_memory_bytes` (split across cache groups by
    `gemma4.kv_layout.split_kv_budget`) unless `num_kv_blocks` fixes the block count of every group.
    `kv_cache_memory_bytes=None` sizes the budget from the device: on a GPU, what
    `gemma4.memory.kv_cache_budget_bytes` leaves of `gpu_memory_utilization` of its memory (the
    same arithmetic the planner sizes pods with); on the CPU, `CPU_KV_CACHE_BYTES`.

    `cuda_graphs` captures decode steps per batch-size bucket on CUDA (ignored elsewhere);
    `torch_compile` compiles the decode forward (`fullgraph=True`, one static graph per bucket). It is
    off by default: CUDA graphs already remove the launch overhead compiling would save, compiling
    costs start-up time per bucket, and its gain on a GPU has not been measured yet.

    `kernels` picks the hot-path ops (`gemma4.backends.select_ops`): `auto` runs the Triton kernels on
    CUDA and ROCm and the torch reference ops on the CPU and XLA; `triton` on a CPU needs
    `TRITON_INTERPRET=1` (the tests' way of running the kernels); `torch` forces the reference ops.
    """

    block_size: int = 16
    max_num_seqs: int = 64
    max_num_batched_tokens: int = 2048
    max_model_len: int | None = None
    num_kv_blocks: int | None = None
    kv_cache_memory_bytes: int | None = None
    gpu_memory_utilization: float = 0.90
    enable_prefix_caching: bool = True
    seed: int = 0
    cuda_graphs: bool = True
    torch_compile: bool = False
    kernels: KernelChoice = "auto"

    def __post_init__(self) -> None:
        for name in ("block_size", "max_num_seqs", "max_num_batched_tokens"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(f"{name} must be a positive integer, got {value!r}")
        for name in ("max_model_len", "num_kv_blocks", "kv_cache_memory_bytes"):
            value = getattr(self, name)
            if value is not None and (not isinstance(value, int) or isinstance(value, bool) or value < 1):
                raise ValueError(f"{name} must be a positive integer or None, got {value!r}")
        if not isinstance(self.cuda_graphs, bool):
            raise ValueError(f"cuda_graphs must be a boolean, got {self.cuda_graphs!r}")
        if not isinstance(self.torch_compile, bool):
            raise ValueError(f"torch_compile must be a boolean, got {self.torch_compile!r}")
        if self.kernels not in KERNEL_CHOICES:
            raise ValueError(f"kernels must be one of {', '.join(KERNEL_CHOICES)}, got {self.kernels!r}")
        if not 0 < self.gpu_memory_utilization <= 1:
            raise ValueError(f"gpu_memory_utilization must be in (0, 1], got {self.gpu_memory_utilization!r}")


def resolve_kv_cache_bytes(model: Gemma4ForCausalLM, args: EngineArgs) -> int:
    """The KV budget: the explicit `args.kv_cache_memory_bytes`, else sized from the model's device."""
    if args.kv_cache_memory_bytes is not None:
        return args.kv_cache_memory_bytes
    param = next(model.parameters())
    if param.device.type != "cuda":
        return CPU_KV_CACHE_BYTES
    if param.dtype not in _WEIGHT_DTYPES:
        raise ValueError(f"cannot size a KV cache for {param.dtype} weights; pass kv_cache_memory_bytes")
    budget = kv_cache_budget_bytes(
        model.config,
        weight_dtype=_WEIGHT_DTYPES[param.dtype],
        device_memory_bytes=torch.cuda.get_device_properties(param.device).total_memory,
        usable_fraction=args.gpu_memory_utilization,
        max_num_seqs=args.max_num_seqs,
        max_num_batched_tokens=args.max_num_batched_tokens,
        ple_on_device=True,  # this model keeps the PLE table in its embedding on the device
        cuda_graphs=args.cuda_graphs,
    )
    if budget == 0:
        raise ValueError(
            f"the weights and step buffers leave no GPU memory for a KV cache at gpu_memory_utilization="
            f"{args.gpu_memory_utilization} (max_num_seqs={args.max_num_seqs}, max_num_batched_tokens="
            f"{args.max_num_batched_tokens}): use a larger GPU or a smaller model"
        )
    return budget


class LLMEngine:
    def __init__(self, model: Gemma4ForCausalLM, tokenizer: Gemma4Tokenizer | None, args: EngineArgs) -> None:
        self.model = model
        self.tokenizer = tokenizer
        self.args = args
        text = model.text_config
        self.vocab_size = text.vocab_size
        self.max_model_len = min(args.max_model_len or text.max_position_embeddings, text.max_position_embeddings)
        self.eos_token_ids = tuple(tokenizer.eos_token_ids if tokenizer is not None else model.config.eos_token_ids)
        groups = cache_groups(text)
        if args.num_kv_blocks is not None:
            num_blocks = {g.name: args.num_kv_blocks for g in groups}
        else:
            num_blocks = split_kv_budget(
                groups,
                resolve_kv_cache_bytes(model, args),
                block_size=args.block_size,
                kv_dtype_bytes=next(model.parameters()).element_size(),
                max_num_seqs=args.max_num_seqs,
                max_model_len=self.max_model_len,
                max_num_batched_tokens=args.max_num_batched_tokens,
            )
        for group in groups:
            if group.sliding_window is not None:  # one sequence's window plus a full prefill chunk
                need = group.peak_blocks_per_sequence(args.block_size, self.max_model_len, args.max_num_batched_tokens)
                if num_blocks[group.name] < need:
                    raise ValueError(
                        f"the {group.name} KV pool has {num_blocks[group.name]} blocks; one sequence needs up to "
                        f"{need} (window {group.sliding_window} + max_num_batched_tokens "
                        f"{args.max_num_batched_tokens}): raise the KV budget or lower max_num_batched_tokens"
                    )
        self.kv = KVCacheManager(groups, num_blocks, args.block_size, enable_prefix_caching=args.enable_prefix_caching)
        self.scheduler = Scheduler(
            SchedulerConfig(args.max_num_seqs, args.max_num_batched_tokens, self.max_model_len), self.kv
        )
        self.runner = ModelRunner(
            model,
            groups,
            num_blocks,
            args.block_size,
            max_num_seqs=args.max_num_seqs,
            max_num_batched_tokens=args.max_num_batched_tokens,
            max_model_len=self.max_model_len,
            cuda_graphs=args.cuda_graphs,
            torch_compile=args.torch_compile,
            kernels=args.kernels,
        )
        self.sampler = Sampler(self.vocab_size, self.runner.device, args.seed, draw=self.runner.ops.sample_draw)
        self.core = EngineCore(self.kv, self.scheduler, self.runner, self.sampler, self.max_model_len)
        self.output_processor = OutputProcessor(tokenizer)
        self._arrivals = itertools.count()
        self._ids = itertools.count()

    # ------------------------------------------------------------------ requests
    def tokenize(self, prompt: Prompt) -> tuple[list[int], bool]:
        """Prompt token ids, and whether the output should be chat-parsed."""
        if isinstance(prompt, (list, tuple)) and prompt and all(isinstance(m, Mapping) for m in prompt):
            prompt = ChatPrompt(prompt)
        if isinstance(prompt, ChatPrompt):
            tokenizer = self._require_tokenizer("chat messages")
            return tokenizer.encode_chat(prompt.messages, tools=prompt.tools, thinking=prompt.thinking), True
        if isinstance(prompt, str):
            return self._require_tokenizer("text").encode(prompt), False
        if isinstance(prompt, (list, tuple)) and all(isinstance(t, int) and not isinstance(t, bool) for t in prompt):
            return list(prompt), False
        raise ValueError("prompt must be a string, a list of token ids, a list of chat messages or a ChatPrompt")

    def _require_tokenizer(self, prompt_kind: str) -> Gemma4Tokenizer:
        if self.tokenizer is None:
            raise ValueError(f"prompt given as {prompt_kind} needs a tokenizer; this engine has none (pass token ids)")
        return self.tokenizer

    def add_request(
        self,
        prompt: Prompt,
        params: SamplingParams | None = None,
        *,
        request_id: str | None = None,
        priority: int = 0,
        parse_chat: bool | None = None,
        cache_salt: str | None = None,
    ) -> str:
        """Validate and queue a request; raises ValueError (naming the field) before allocating anything.

        Requests share prefix-cache blocks only with requests of the same `cache_salt` (None: the
        shared namespace), so a tenant's salt keeps others from reusing, or timing, its prompts' KV.
        """
        request, chat = self.make_request(
            prompt, params, request_id=request_id, priority=priority, parse_chat=parse_chat, cache_salt=cache_salt
        )
        self.core.add_request(request)
        self.output_processor.add_request(request, chat)
        return request.request_id

    def make_request(
        self,
        prompt: Prompt,
        params: SamplingParams | None = None,
        *,
        request_id: str | None = None,
        priority: int = 0,
        parse_chat: bool | None = None,
        cache_salt: str | None = None,
    ) -> tuple[Request, bool]:
        """A validated request, not queued, and whether to chat-parse its output (ValueError if invalid).

        Reads only the tokenizer and fixed limits, so it may run beside a step on another thread;
        whether the id is in use is checked where the request is queued.
        """
        params = params or SamplingParams()
        token_ids, chat = self.check_request(prompt, params, priority, cache_salt)
        stop_ids = set(params.stop_token_ids or ()) | (set() if params.ignore_eos else set(self.eos_token_ids))
        request = Request(
            request_id=request_id if request_id is not None else f"req-{next(self._ids)}",
            prompt_token_ids=token_ids,
            sampling_params=params,
            stop_token_ids=frozenset(stop_ids),
            priority=priority,
            cache_salt=cache_salt,
            arrival_order=next(self._arrivals),
        )
        return request, self.tokenizer is not None and (chat if parse_chat is None else parse_chat)

    def check_request(
        self, prompt: Prompt, params: SamplingParams, priority: int = 0, cache_salt: str | None = None
    ) -> tuple[list[int], bool]:
        """Tokenize and validate a request without queueing it.

        Raises ValueError whose message starts with the offending field's name (the gateway reports
        that word as the field), then the limit it broke.
        """
        if not isinstance(params, SamplingParams):
            raise ValueError(f"params must be SamplingParams, got {type(params).__name__}")
        token_ids, chat = self.tokenize(prompt)
        if not token_ids:
            raise ValueError("prompt must not be empty")
        bad = next((t for t in token_ids if not 0 <= t < self.vocab_size), None)
        if bad is not None:
            raise ValueError(f"prompt token id {bad} is outside the vocabulary [0, {self.vocab_size})")
        if params.stop and self.tokenizer is None:
            raise ValueError("stop strings need a tokenizer; this engine has none (use stop_token_ids)")
        bad = next((t for t in params.stop_token_ids or () if t >= self.vocab_size), None)
        if bad is not None:
            raise ValueError(f"stop_token_ids contains {bad}, outside the vocabulary [0, {self.vocab_size})")
        if not isinstance(priority, int) or isinstance(priority, bool):
            raise ValueError(f"priority must be an integer, got {priority!r}")
        if cache_salt is not None and (not isinstance(cache_salt, str) or len(cache_salt) > MAX_CACHE_SALT_CHARS):
            got = f"{len(cache_salt)} characters" if isinstance(cache_salt, str) else type(cache_salt).__name__
            raise ValueError(f"cache_salt must be a string of at most {MAX_CACHE_SALT_CHARS} characters, got {got}")
        total = len(token_ids) + params.max_tokens
        if total > self.max_model_len:
            raise ValueError(
                f"prompt ({len(token_ids)} tokens) + max_tokens ({params.max_tokens}) = {total} exceeds "
                f"max_model_len ({self.max_model_len})"
            )
        for group, pool in zip(self.kv.groups, self.kv.pools):
            need = group.max_blocks_per_sequence(total, self.args.block_size)
            if group.sliding_window is None and need > pool.num_blocks:
                raise ValueError(
                    f"prompt + max_tokens ({total} tokens) needs {need} blocks of the {group.name} KV pool, "
                    f"which has {pool.num_blocks}"
                )
        return token_ids, chat

    def abort_request(self, request_id: str) -> RequestOutput | None:
        """Stop a request now and free its blocks; returns its final output (None if unknown)."""
        record = self.core.abort_request(request_id)
        if record is None:
            return None
        return self.output_processor.process([record]).outputs[0]

    def has_unfinished_requests(self) -> bool:
        return self.core.has_unfinished_requests()

    # ------------------------------------------------------------------ stepping
    def step(self) -> list[RequestOutput]:
        """One scheduled forward pass; outputs for every request that produced a token or finished.

        A request a stop string ended is stopped in the core before this returns, so the next
        step never runs it.
        """
        processed = self.output_processor.process(self.core.step())
        for stop in processed.stops:
            self.core.stop_request(stop)
        return processed.outputs

    # ------------------------------------------------------------------ statistics
    def stats(self) -> EngineStats:
        return EngineStats.of(self.core.stats(), self.output_processor.finished_stats)
