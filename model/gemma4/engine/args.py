"""The engine's settings (`EngineArgs`) and what follows from them alone: the context limit and each
rank's KV budget. Shared by the engine core's process and every worker."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from gemma4.backends import KERNEL_CHOICES, KernelChoice, backend_of
from gemma4.config import DEFAULT_SPECULATIVE_TOKENS, Gemma4TextConfig
from gemma4.memory import DrafterShape, check_layout, kv_cache_budget_bytes, load_drafter_shape
from gemma4.modeling import Gemma4ForCausalLM
from gemma4.parallel.layout import ParallelLayout, check_parallel_settings

CPU_KV_CACHE_BYTES = 1 << 30  # the KV budget on the CPU, where device memory is the host's
NGRAM = "ngram"  # speculative_model for prompt-lookup drafting, without a drafter model
_WEIGHT_DTYPES = {torch.float32: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16"}


@dataclass(frozen=True)
class EngineArgs:
    """Engine limits, cache sizing and the replica's parallel layout.

    The KV pools are sized from `kv_cache_memory_bytes` (split across cache groups by
    `gemma4.kv_layout.split_kv_budget`) unless `num_kv_blocks` fixes the block count of every group.
    `kv_cache_memory_bytes=None` sizes the budget from the device: on a GPU, what
    `gemma4.memory.kv_cache_budget_bytes` leaves of `gpu_memory_utilization` of its memory (the
    same arithmetic the planner sizes pods with); on the CPU, `CPU_KV_CACHE_BYTES`. With several
    ranks every one of them holds that budget of its share of the KV heads.

    `cuda_graphs` captures decode steps per batch-size bucket on CUDA (ignored elsewhere);
    `torch_compile` compiles the decode forward (`fullgraph=True`, one static graph per bucket). It is
    off by default: CUDA graphs already remove the launch overhead compiling would save, compiling
    costs start-up time per bucket, and its gain on a GPU has not been measured yet.

    `kernels` picks the hot-path ops (`gemma4.backends.select_ops`): `auto` runs the Triton kernels on
    CUDA and ROCm and the torch reference ops on the CPU and XLA; `triton` on a CPU needs
    `TRITON_INTERPRET=1` (the tests' way of running the kernels); `torch` forces the reference ops.

    `tensor_parallel_size` ranks (devices) run one replica, `expert_parallel_size` groups of them
    hold the MoE experts (`gemma4.parallel.layout`); `redundant_experts` extra expert slots per MoE
    layer hold copies of hot experts, and every `expert_rebalance_interval` steps (0: never) the
    engine re-places the experts by the load measured since the last placement.

    Media (checkpoints with towers): at most `max_num_encoder_tokens` soft tokens are encoded per
    step (None: `max_num_batched_tokens`), and the encoder cache keeps up to `encoder_cache_tokens` soft
    tokens of encoded items on the device (None: twice `max_num_batched_tokens`).

    Speculative decoding: `speculative_model` is a `gemma4_assistant` checkpoint directory (Gemma 4's
    own drafter for this target), or "ngram" for prompt-lookup drafting without a model (None: off);
    `num_speculative_tokens` drafts per request and step (None: the variant's default,
    `gemma4.config.DEFAULT_SPECULATIVE_TOKENS`).
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
    tensor_parallel_size: int = 1
    expert_parallel_size: int = 1
    redundant_experts: int = 0
    expert_rebalance_interval: int = 0
    max_num_encoder_tokens: int | None = None
    encoder_cache_tokens: int | None = None
    speculative_model: str | None = None
    num_speculative_tokens: int | None = None

    def __post_init__(self) -> None:
        for name in ("block_size", "max_num_seqs", "max_num_batched_tokens", "tensor_parallel_size", "expert_parallel_size"):
            value = getattr(self, name)
            if not _is_int(value) or value < 1:
                raise ValueError(f"{name} must be a positive integer, got {value!r}")
        optional = (
            "max_model_len", "num_kv_blocks", "kv_cache_memory_bytes", "max_num_encoder_tokens", "encoder_cache_tokens",
            "num_speculative_tokens",
        )
        for name in optional:
            value = getattr(self, name)
            if value is not None and (not _is_int(value) or value < 1):
                raise ValueError(f"{name} must be a positive integer or None, got {value!r}")
        for name in ("redundant_experts", "expert_rebalance_interval"):
            value = getattr(self, name)
            if not _is_int(value) or value < 0:
                raise ValueError(f"{name} must be a non-negative integer, got {value!r}")
        if self.speculative_model is not None and (not isinstance(self.speculative_model, str) or not self.speculative_model):
            raise ValueError(f"speculative_model must be 'ngram' or an assistant checkpoint path, got {self.speculative_model!r}")
        if not isinstance(self.cuda_graphs, bool):
            raise ValueError(f"cuda_graphs must be a boolean, got {self.cuda_graphs!r}")
        if not isinstance(self.torch_compile, bool):
            raise ValueError(f"torch_compile must be a boolean, got {self.torch_compile!r}")
        if self.kernels not in KERNEL_CHOICES:
            raise ValueError(f"kernels must be one of {', '.join(KERNEL_CHOICES)}, got {self.kernels!r}")
        if not 0 < self.gpu_memory_utilization <= 1:
            raise ValueError(f"gpu_memory_utilization must be in (0, 1], got {self.gpu_memory_utilization!r}")
        check_parallel_settings(
            self.tensor_parallel_size, self.expert_parallel_size, self.redundant_experts, self.expert_rebalance_interval
        )

    @property
    def encoder_budget(self) -> int:
        """Soft tokens encoded per step at most."""
        return self.max_num_encoder_tokens or self.max_num_batched_tokens

    @property
    def encoder_cache_capacity(self) -> int:
        """Soft tokens the encoder cache holds."""
        return self.encoder_cache_tokens or 2 * self.max_num_batched_tokens

    @property
    def layout(self) -> ParallelLayout:
        """Rank 0's layout; a worker takes `layout.with_rank(rank)`."""
        return ParallelLayout(self.tensor_parallel_size, self.expert_parallel_size, 0, self.redundant_experts)

    def speculative_tokens(self, text: Gemma4TextConfig) -> int:
        """Drafts per request and step: 0 without speculation, else `num_speculative_tokens` or the variant's default."""
        if self.speculative_model is None:
            return 0
        return self.num_speculative_tokens or DEFAULT_SPECULATIVE_TOKENS[text.family]

    def check_model(self, text: Gemma4TextConfig) -> None:
        """Raise ValueError if this layout cannot split the decoder `text`."""
        check_layout(text, self.tensor_parallel_size, self.expert_parallel_size, self.redundant_experts)

    def model_len(self, text: Gemma4TextConfig) -> int:
        """The context limit: `max_model_len`, at most the model's positions."""
        return min(self.max_model_len or text.max_position_embeddings, text.max_position_embeddings)


def _is_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def drafter_shape(args: EngineArgs) -> DrafterShape | None:
    """The assistant drafter `args.speculative_model` names, as the memory model prices it (None: no drafter)."""
    if args.speculative_model in (None, NGRAM):
        return None
    try:
        return load_drafter_shape(args.speculative_model)
    except ValueError as exc:
        raise ValueError(f"speculative_model: {exc}") from None


def resolve_kv_cache_bytes(model: Gemma4ForCausalLM, args: EngineArgs) -> int:
    """One rank's KV budget: the explicit `args.kv_cache_memory_bytes`, else sized from its device (less the
    drafter's weights and speculation's step buffers when `args.speculative_model` is set)."""
    if args.kv_cache_memory_bytes is not None:
        return args.kv_cache_memory_bytes
    param = next(model.parameters())
    memory = backend_of(param.device).device_memory_bytes(param.device)
    if memory is None:
        return CPU_KV_CACHE_BYTES
    if param.dtype not in _WEIGHT_DTYPES:
        raise ValueError(f"cannot size a KV cache for {param.dtype} weights; pass kv_cache_memory_bytes")
    budget = kv_cache_budget_bytes(
        model.config,
        weight_dtype=_WEIGHT_DTYPES[param.dtype],
        device_memory_bytes=memory,
        usable_fraction=args.gpu_memory_utilization,
        max_num_seqs=args.max_num_seqs,
        max_num_batched_tokens=args.max_num_batched_tokens,
        tensor_parallel=args.tensor_parallel_size,
        expert_parallel=args.expert_parallel_size,
        redundant_experts=args.redundant_experts,
        ple_on_device=True,  # this model keeps the PLE table in its embedding on the device
        # The towers this model loaded, their activations and the encoder cache come off the budget.
        modalities=model.config.modalities if len(model.towers) else ("text",),
        encoder_cache_tokens=args.encoder_cache_capacity,
        cuda_graphs=args.cuda_graphs,
        speculative_tokens=args.speculative_tokens(model.config.text),
        drafter=drafter_shape(args),
    )
    if budget == 0:
        raise ValueError(
            f"the weights and step buffers leave no GPU memory for a KV cache at gpu_memory_utilization="
            f"{args.gpu_memory_utilization} (max_num_seqs={args.max_num_seqs}, max_num_batched_tokens="
            f"{args.max_num_batched_tokens}): use a larger GPU or a smaller model"
        )
    return budget
