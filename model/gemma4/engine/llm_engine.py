"""The synchronous engine: validated requests in, one scheduled model step at a time, outputs out.

`LLMEngine.step()` schedules, runs the model over the paged cache, samples, detokenizes, applies
stop conditions and frees finished requests' blocks. The offline `LLM` and the `AsyncEngine` both
drive it; it knows nothing of servers.
"""

from __future__ import annotations

import itertools
import time
from dataclasses import dataclass, field
from typing import Any, Mapping, Sequence, Union

import torch

from gemma4.chat import ChatDelta, StreamParser
from gemma4.engine.detokenizer import IncrementalDetokenizer
from gemma4.engine.kv_cache_manager import KVCacheManager
from gemma4.engine.model_runner import ModelRunner
from gemma4.engine.outputs import CacheGroupStats, EngineStats, LatencyHistogram, RequestMetrics, RequestOutput, Usage
from gemma4.engine.request import FinishReason, Request, RequestStatus
from gemma4.engine.sampler import Sampler, TokenLogprobs
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


@dataclass
class _Tracked:
    """Engine-side state of a request beyond scheduling: streaming text and what was reported."""

    request: Request
    detokenizer: IncrementalDetokenizer | None
    chat_parser: StreamParser | None
    reported_tokens: int = 0
    logprobs: list[TokenLogprobs] = field(default_factory=list)


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
        )
        self.sampler = Sampler(self.vocab_size, self.runner.device, args.seed)
        self._tracked: dict[str, _Tracked] = {}
        self._arrivals = itertools.count()
        self._ids = itertools.count()
        self.prompt_tokens_total = 0
        self.generation_tokens_total = 0
        self.finished_requests: dict[str, int] = {reason.value: 0 for reason in FinishReason}
        self.time_to_first_token = LatencyHistogram.empty()
        self.inter_token_latency = LatencyHistogram.empty()
        self.e2e_latency = LatencyHistogram.empty()

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
        params = params or SamplingParams()
        token_ids, chat = self.check_request(prompt, params, priority, cache_salt)
        request_id = request_id if request_id is not None else f"req-{next(self._ids)}"
        if request_id in self._tracked:
            raise ValueError(f"request_id {request_id!r} is already in use")
        stop_ids = set(params.stop_token_ids or ()) | (set() if params.ignore_eos else set(self.eos_token_ids))
        request = Request(
            request_id=request_id,
            prompt_token_ids=token_ids,
            sampling_params=params,
            stop_token_ids=frozenset(stop_ids),
            priority=priority,
            cache_salt=cache_salt,
            arrival_order=next(self._arrivals),
        )
        needs_text = self.tokenizer is not None
        self._tracked[request_id] = _Tracked(
            request=request,
            detokenizer=IncrementalDetokenizer(self.tokenizer, params.stop, params.min_tokens) if needs_text else None,
            chat_parser=StreamParser() if needs_text and (chat if parse_chat is None else parse_chat) else None,
        )
        self.scheduler.add(request)
        self.prompt_tokens_total += len(token_ids)
        return request_id

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
        tracked = self._tracked.get(request_id)
        if tracked is None:
            return None
        request = tracked.request
        self.scheduler.remove(request_id)
        self._finish(request, FinishReason.ABORT)
        return self._output(tracked)

    def has_unfinished_requests(self) -> bool:
        return self.scheduler.has_work

    # ------------------------------------------------------------------ stepping
    def step(self) -> list[RequestOutput]:
        """One scheduled forward pass; outputs for every request that produced a token or finished."""
        batch = self.scheduler.schedule()
        if not batch.requests:
            return []
        logits, sampling = self.runner.execute(batch, self.kv)
        for request, n in zip(batch.requests, batch.num_tokens):
            request.num_computed_tokens += n
            self.kv.commit(request.request_id, request.token_ids, request.num_computed_tokens)
        results = self.sampler.sample(logits, sampling)
        now = time.monotonic()
        outputs = []
        for request, result in zip(sampling, results):
            tracked = self._tracked[request.request_id]
            request.append_token(result.token_id, now)
            self.generation_tokens_total += 1
            if result.logprobs is not None:
                tracked.logprobs.append(result.logprobs)
            self._check_stop(tracked, result.token_id)
            if request.finished:
                self.scheduler.remove(request.request_id)
            outputs.append(self._output(tracked))
        return outputs

    def _check_stop(self, tracked: _Tracked, token: int) -> None:
        """Stop tokens and stop strings end a request only after its first `min_tokens` output tokens
        (the sampler never draws a stop token before; the detokenizer ignores earlier stop strings)."""
        request = tracked.request
        params = request.sampling_params
        if token in request.stop_token_ids and request.num_output_tokens > params.min_tokens:
            self._finish(request, FinishReason.STOP, stop_reason=token)
            return
        if tracked.detokenizer is not None:
            tracked.detokenizer.add_token(token)
            if tracked.detokenizer.stopped_on is not None:
                self._finish(request, FinishReason.STOP, stop_reason=tracked.detokenizer.stopped_on)
                return
        if request.num_output_tokens >= params.max_tokens or request.num_tokens >= self.max_model_len:
            self._finish(request, FinishReason.LENGTH)

    def _finish(self, request: Request, reason: FinishReason, stop_reason: int | str | None = None) -> None:
        request.status = RequestStatus.FINISHED
        request.finish_reason = reason
        request.stop_reason = stop_reason
        self.sampler.remove(request.request_id)
        self.finished_requests[reason.value] += 1
        if request.first_token_time is not None:
            self.time_to_first_token = self.time_to_first_token.add([request.first_token_time - request.arrival_time])
        self.inter_token_latency = self.inter_token_latency.add(request.inter_token_times)
        self.e2e_latency = self.e2e_latency.add([time.monotonic() - request.arrival_time])

    def _output(self, tracked: _Tracked) -> RequestOutput:
        request = tracked.request
        finished = request.finished
        delta_ids = request.output_token_ids[tracked.reported_tokens :]
        tracked.reported_tokens = request.num_output_tokens
        text = delta_text = ""
        chat_deltas: list[ChatDelta] = []
        if tracked.detokenizer is not None:
            if finished and request.finish_reason != FinishReason.STOP:
                tracked.detokenizer.flush()
            delta_text = tracked.detokenizer.take_delta(finished)
            text = tracked.detokenizer.streamed_text
            if tracked.chat_parser is not None:
                chat_deltas = tracked.chat_parser.feed(delta_text) if delta_text else []
                if finished:
                    chat_deltas += tracked.chat_parser.finish()
        metrics = RequestMetrics(
            arrival_time=request.arrival_time,
            first_token_time=request.first_token_time,
            last_token_time=request.token_times[-1] if request.token_times else None,
            inter_token_times=request.inter_token_times,
            num_preemptions=request.num_preemptions,
        )
        if finished:
            del self._tracked[request.request_id]
        return RequestOutput(
            request_id=request.request_id,
            prompt_token_ids=request.prompt_token_ids,
            token_ids=request.output_token_ids,
            text=text,
            delta_token_ids=delta_ids,
            delta_text=delta_text,
            finished=finished,
            finish_reason=request.finish_reason,
            stop_reason=request.stop_reason,
            usage=Usage(request.num_prompt_tokens, request.num_output_tokens, request.num_cached_prompt_tokens),
            metrics=metrics,
            logprobs=list(tracked.logprobs) if request.sampling_params.logprobs is not None else None,
            chat_deltas=chat_deltas,
        )

    # ------------------------------------------------------------------ statistics
    def stats(self) -> EngineStats:
        return EngineStats(
            num_waiting=len(self.scheduler.waiting),
            num_running=len(self.scheduler.running),
            kv_cache=[CacheGroupStats(u.name, u.num_blocks, u.used_blocks, u.usage) for u in self.kv.usage()],
            prefix_query_tokens=self.scheduler.prefix_query_tokens,
            prefix_hit_tokens=self.scheduler.prefix_hit_tokens,
            num_preemptions=self.scheduler.num_preemptions,
            prompt_tokens_total=self.prompt_tokens_total,
            generation_tokens_total=self.generation_tokens_total,
            finished_requests=dict(self.finished_requests),
            time_to_first_token=self.time_to_first_token,
            inter_token_latency=self.inter_token_latency,
            e2e_latency=self.e2e_latency,
        )

