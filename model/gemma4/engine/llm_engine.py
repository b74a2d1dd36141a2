"""The synchronous engine: validated requests in, one scheduled model step at a time, outputs out.

`LLMEngine` validates and tokenizes requests and owns the two halves of a step: the engine core
(`gemma4.engine.core`: schedule, forward, sample, token stops, free blocks) and the output processor
(`gemma4.engine.output_processor`: detokenize, stop strings, chat parsing, delta outputs).
`LLMEngine.step()` runs both inline; the `AsyncEngine` runs them on two threads. The offline `LLM`
drives it directly; it knows nothing of servers. The model itself runs behind an executor: in this
process for a single-device model, or one worker per rank of a multi-device replica.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass
from typing import Any, Mapping, Sequence, Union

from gemma4.config import Gemma4Config
from gemma4.engine.args import CPU_KV_CACHE_BYTES, EngineArgs, resolve_kv_cache_bytes  # noqa: F401 - re-exported
from gemma4.engine.core import EngineCore, ExpertRebalancer
from gemma4.engine.encoder_cache import EncoderCacheManager
from gemma4.engine.executor import Executor, UniprocExecutor
from gemma4.engine.kv_cache_manager import KVCacheManager
from gemma4.engine.model_runner import ModelRunner
from gemma4.engine.output_processor import OutputProcessor
from gemma4.engine.outputs import EngineStats, RequestOutput
from gemma4.engine.request import Request
from gemma4.engine.sampling_params import SamplingParams
from gemma4.engine.scheduler import Scheduler, SchedulerConfig
from gemma4.engine.structured_output.compiler import GrammarCompiler
from gemma4.engine.worker import Worker
from gemma4.kv_layout import cache_groups
from gemma4.media.inputs import MediaPlaceholder, MultimodalPrompt
from gemma4.media.prompt import MediaTokenIds
from gemma4.modeling import Gemma4ForCausalLM
from gemma4.parallel.placement import ExpertPlacement
from gemma4.towers import check_media_item
from gemma4.tokenizer import Gemma4Tokenizer


MAX_CACHE_SALT_CHARS = 256


@dataclass(frozen=True)
class ChatPrompt:
    """A conversation to render with the checkpoint's chat template; its output is chat-parsed."""

    messages: Sequence[Mapping[str, Any]]
    tools: Sequence[Mapping[str, Any]] | None = None
    thinking: bool = False


Prompt = Union[str, Sequence[int], Sequence[Mapping[str, Any]], ChatPrompt, MultimodalPrompt]


class LLMEngine:
    """`LLMEngine(model, tokenizer, args)` runs an in-process model (a `UniprocExecutor`);
    `LLMEngine(executor, tokenizer, args)` runs the workers an executor holds (one per rank)."""

    def __init__(
        self, model: Gemma4ForCausalLM | Executor, tokenizer: Gemma4Tokenizer | None, args: EngineArgs
    ) -> None:
        self.executor = model if isinstance(model, Executor) else UniprocExecutor(Worker.wrap(model, args, tokenizer))
        if self.executor.world_size != args.tensor_parallel_size:
            raise ValueError(
                f"tensor_parallel_size={args.tensor_parallel_size} but the executor runs {self.executor.world_size} ranks"
            )
        self.config: Gemma4Config = self.executor.config
        self.tokenizer = tokenizer
        self.args = args
        text = self.config.text
        args.check_model(text)
        self.vocab_size = text.vocab_size
        # Validates structured-output constraints at add time (rank 0's worker compiles its own).
        self.grammars = GrammarCompiler(tokenizer, self.vocab_size) if tokenizer is not None else None
        self.max_model_len = args.model_len(text)
        self.eos_token_ids = tuple(tokenizer.eos_token_ids if tokenizer is not None else self.config.eos_token_ids)
        groups = cache_groups(text)
        num_blocks = self.executor.num_kv_blocks()
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
        self.placeholder_ids = frozenset(self.config.multimodal_placeholder_ids)
        self.scheduler_config = SchedulerConfig(
            args.max_num_seqs, args.max_num_batched_tokens, self.max_model_len, args.encoder_budget
        )
        encoder = EncoderCacheManager(args.encoder_cache_capacity) if self.placeholder_ids else None
        self.scheduler = Scheduler(self.scheduler_config, self.kv, encoder)
        self.executor.init_cache(num_blocks)
        rebalancer = None
        if args.expert_rebalance_interval and text.enable_moe_block:
            rebalancer = ExpertRebalancer(
                self.executor, args.expert_rebalance_interval, args.expert_parallel_size, args.redundant_experts
            )
        self.core = EngineCore(self.kv, self.scheduler, self.executor, self.max_model_len, rebalancer)
        self.output_processor = OutputProcessor(tokenizer)
        self._arrivals = itertools.count()
        self._ids = itertools.count()

    @property
    def runner(self) -> ModelRunner:
        """The in-process worker's runner (single-device engines; tests and benchmarks look inside it)."""
        runner = self._local_worker().runner
        assert runner is not None
        return runner

    @property
    def model(self) -> Gemma4ForCausalLM:
        """The in-process model (single-device engines)."""
        return self._local_worker().model

    def _local_worker(self) -> Worker:
        if not isinstance(self.executor, UniprocExecutor):
            raise AttributeError(f"the model runs in {self.executor.world_size} worker processes, not here")
        return self.executor.worker

    def expert_load(self) -> dict[int, list[int]]:
        """Tokens routed to each expert so far, per MoE layer (empty for dense models); for metrics."""
        return self.executor.expert_load()

    def expert_placements(self) -> dict[int, ExpertPlacement]:
        """Where each MoE layer's experts live now (empty for dense models)."""
        return self.executor.expert_placements()

    def shutdown(self) -> None:
        """Stop the workers; the engine takes no more steps."""
        self.executor.shutdown()

    # ------------------------------------------------------------------ requests
    def tokenize(self, prompt: Prompt) -> tuple[list[int], bool]:
        """Prompt token ids, and whether the output should be chat-parsed."""
        if isinstance(prompt, MultimodalPrompt):
            return list(prompt.token_ids), False
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
        media = prompt.media if isinstance(prompt, MultimodalPrompt) else ()
        stop_ids = set(params.stop_token_ids or ()) | (set() if params.ignore_eos else set(self.eos_token_ids))
        request = Request(
            request_id=request_id if request_id is not None else f"req-{next(self._ids)}",
            prompt_token_ids=token_ids,
            sampling_params=params,
            stop_token_ids=frozenset(stop_ids),
            priority=priority,
            cache_salt=cache_salt,
            media=tuple(media),
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
        self._check_media(token_ids, prompt.media if isinstance(prompt, MultimodalPrompt) else ())
        if params.stop and self.tokenizer is None:
            raise ValueError("stop strings need a tokenizer; this engine has none (use stop_token_ids)")
        bad = next((t for t in params.stop_token_ids or () if t >= self.vocab_size), None)
        if bad is not None:
            raise ValueError(f"stop_token_ids contains {bad}, outside the vocabulary [0, {self.vocab_size})")
        if params.structured is not None:
            if self.grammars is None:
                raise ValueError("structured: structured outputs need a tokenizer; this engine has none")
            self.grammars.validate(params.structured)
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

    def _check_media(self, token_ids: list[int], media: Sequence[MediaPlaceholder]) -> None:
        """Every placeholder id of the prompt lies in exactly one media item of the right modality, which
        its tower can encode and the scheduler can fit into one step (ValueError naming `prompt.media[i]`)."""
        covered = 0
        limit = self.scheduler_config.max_media_item_tokens
        for index, item in enumerate(media):
            where = f"prompt.media[{index}]"
            if not isinstance(item, MediaPlaceholder):
                raise ValueError(f"{where}: expected a MediaPlaceholder, got {type(item).__name__}")
            check_media_item(self.config, item.features, where)
            if item.offset < covered or item.end > len(token_ids):
                raise ValueError(f"{where}: tokens [{item.offset}, {item.end}) overlap another item or pass the end")
            marker = MediaTokenIds.of(self.config).marker(item.features.modality)
            if any(t != marker for t in token_ids[item.offset : item.end]):
                raise ValueError(
                    f"{where}: its {item.length} positions must hold the {item.features.modality} placeholder "
                    f"id {marker}"
                )
            if item.length > limit:
                raise ValueError(
                    f"{where}: a {item.features.modality} item of {item.length} soft tokens exceeds what one step "
                    f"can encode and compute ({limit}: max_num_encoder_tokens, and max_num_batched_tokens less "
                    "one token for each other running sequence); raise max_num_batched_tokens or send a smaller item"
                )
            covered = item.end
        if self.placeholder_ids:
            inside = set()
            for item in media:
                inside.update(range(item.offset, item.end))
            stray = next((p for p, t in enumerate(token_ids) if t in self.placeholder_ids and p not in inside), None)
            if stray is not None:
                raise ValueError(
                    f"prompt token {stray} is a media placeholder id ({token_ids[stray]}) outside every media item"
                )

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
