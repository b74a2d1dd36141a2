"""How much accelerator and host memory a Gemma 4 replica needs, and how to lay it out (pure Python).

The operator sizes pods with `plan`, the CLI prints it, and the engine sizes its KV pools with
`kv_cache_budget_bytes`; both go through `_fixed_costs`, so a plan and a running engine agree on
what is left for the KV cache. No torch: this runs in the operator's slim image.

Parameters are counted from the configs tensor by tensor (`_text_tensors`, `_vision_tensors`,
`_audio_tensors`), the same inventory that prices weights per GPU; the tests hold the counts to the
real checkpoints' key lists.

Layout assumptions (what vLLM-style engines do):
* Tensor parallelism (TP) splits attention heads (q/k/v column-parallel, o row-parallel), the MLP
  intermediate (gate/up column-, down row-parallel) and the vocabulary of the tied embedding / LM
  head and of the PLE table. KV heads are split too; when TP exceeds a layer's KV heads each rank
  keeps one head (replicated), for both the weights and the KV cache.
* Expert parallelism (EP) gives each EP rank `(num_experts + redundant_experts) / ep` whole expert
  slots (redundant slots hold copies of hot experts, `gemma4.parallel.placement`); TP ranks inside
  one EP rank split the expert intermediate. Auto layouts use EP = TP = GPU count for the MoE variant.
* Norms, layer scalars, the router, and the vision/audio towers are replicated on every GPU.
* Quantised formats quantise only the decoder's matmul weights (attention, MLP, experts, PLE
  projections). The token embedding / tied LM head stays in bf16 as public FP8-block checkpoints
  keep it (performance anchors s3.2), and so do the PLE table, norms, router and the towers.
* A replica serving a media modality holds the engine's encoder-output cache (`encoder_cache_bytes`:
  soft tokens x text hidden x the model dtype, on every rank) on top of one item's encoder activations.
* The per-sequence KV reservation is the engine's (`split_kv_budget`): a sliding group reserves
  its window plus one prefill chunk per sequence, a full group the whole max_model_len; each pool
  also holds one null block.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator, Mapping

from gemma4.accelerators import ACCELERATORS, Accelerator, GiB, MiB, get_accelerator
from gemma4.assistant_config import Gemma4AssistantConfig, load_assistant_config
from gemma4.config import (
    DEFAULT_SPECULATIVE_TOKENS,
    Gemma4AudioConfig,
    Gemma4Config,
    Gemma4TextConfig,
    Gemma4VisionConfig,
    LayerSpec,
    variant_config,
)
from gemma4.kv_layout import CacheGroup, cache_groups, split_kv_budget

# ---------------------------------------------------------------------------- formats


@dataclass(frozen=True)
class WeightFormat:
    """How a weight dtype stores a matmul weight `[rows, cols]` (rows = output features).

    One scale of `scale_bytes` covers `scale_rows x scale_cols` elements; `scale_cols == 0` means a
    whole row (per-output-channel scales). Formats without scales store every tensor as is.
    """

    name: str
    bytes_per_param: float
    scale_bytes: int = 0
    scale_rows: int = 1
    scale_cols: int = 0

    @property
    def quantised(self) -> bool:
        return self.scale_bytes > 0

    @property
    def unquantised_bytes(self) -> int:
        """Bytes per element of the tensors a quantised checkpoint keeps in 16-bit."""
        return 2 if self.quantised else int(self.bytes_per_param)

    def matrix_bytes(self, rows: int, cols: int) -> int:
        """Bytes of one quantised matrix, its scales included."""
        col_groups = math.ceil(cols / self.scale_cols) if self.scale_cols else 1
        scales = math.ceil(rows / self.scale_rows) * col_groups
        return math.ceil(rows * cols * self.bytes_per_param) + scales * self.scale_bytes


WEIGHT_FORMATS: dict[str, WeightFormat] = {
    f.name: f
    for f in (
        WeightFormat("fp32", 4),
        WeightFormat("bf16", 2),
        WeightFormat("fp16", 2),
        # FP8 "block" checkpoints (DeepSeek-style, RedHatAI FP8-block): one fp32 scale per 128x128 tile.
        WeightFormat("fp8", 1, scale_bytes=4, scale_rows=128, scale_cols=128),
        # INT8 W8A8 (compressed-tensors channel-wise): one fp32 scale per output channel.
        WeightFormat("int8", 1, scale_bytes=4),
        # INT4 W4A16, symmetric, groups of 128 inputs with a bf16 scale: +3.1% (the anchors' "+3%").
        WeightFormat("int4", 0.5, scale_bytes=2, scale_cols=128),
    )
}

KV_DTYPE_BYTES: dict[str, int] = {"fp32": 4, "bf16": 2, "fp16": 2, "fp8": 1}

MODALITIES = ("text", "image", "video", "audio")

# ---------------------------------------------------------------------------- constants
# Live [tokens, hidden] tensors at a layer's peak: residual, normed input, the attention or MLP
# output, and its post-norm.
RESIDUAL_BUFFERS = 4
# The sampler's transient per logit beyond the fp32 logits themselves: fp32 probabilities, a
# sorted fp32 copy and int64 sort indices (top-p / top-k). 262,144 entries per sampled row make
# this the largest single transient at high concurrency.
SAMPLER_BYTES_PER_LOGIT = 4 + 4 + 8
# An EP rank may receive up to this multiple of the balanced share of routed tokens (routing skew).
MOE_IMBALANCE = 2.0
# CUDA/HIP context, cuBLAS(Lt)/hipBLASLt workspaces and loaded kernels, per device: what engines
# report as "non-torch memory" on one GPU (0.5-1 GiB); TPUs reserve XLA scratch of the same order.
RUNTIME_RESERVED_BYTES = 1 * GiB
# Collective buffers once a replica spans GPUs (NCCL channels, custom all-reduce IPC buffers).
COLLECTIVE_BUFFER_BYTES = 512 * MiB
# The caching allocator rounds and splits blocks; activation shapes vary step to step, so part of
# the activation pool cannot be reused. Weights and the KV cache are allocated once and do not
# fragment.
ALLOCATOR_SLACK_FRACTION = 0.20
# Kept free on top of everything modelled: workspaces that grow on first use, library caches.
HEADROOM_FRACTION = 0.02
# Captured graphs: kernel nodes and their parameters per captured batch size, on top of the graph
# pool (the decode activations at the largest captured batch, shared by all captures). 8 MiB per
# size puts vLLM's default 67 sizes at ~0.5 GiB, the order engines report for graph capture.
GRAPH_BYTES_PER_CAPTURE = 8 * MiB
MAX_CAPTURED_BATCH = 512  # vLLM's default largest captured decode batch
# Pod memory: the replica process (Ray Serve, tokenizer, Python), and per GPU worker its torch and
# CUDA host runtime; each worker stages one checkpoint tensor at a time (read + cast copy).
HOST_BASE_BYTES = 4 * GiB
HOST_PER_WORKER_BYTES = 3 * GiB
STAGING_COPIES = 2
# Encoder inputs: the vision tower sees `default_output_length * pooling_kernel_size**2` patches per
# image; the audio tower at most 30 s = 3,000 mel frames of 128 bins -> 750 tokens (arch. ref. s9).
AUDIO_MEL_BINS = 128
AUDIO_MAX_TOKENS = 750
AUDIO_FRAMES_PER_TOKEN = 4
AUDIO_ATTENTION_KEYS = 24  # a chunk of 12 queries against 12 past + 12 chunk keys
# The engine's default encoder-output cache holds this many steps' worth of soft tokens
# (`EngineArgs.encoder_cache_tokens` None = 2 x max_num_batched_tokens).
ENCODER_CACHE_STEPS = 2

# ---------------------------------------------------------------------------- tensor inventory
EMBEDDING, DECODER, EXPERTS, PLE, UNUSED_KV, VISION, AUDIO = (
    "embedding", "decoder", "experts", "ple", "unused_kv", "vision", "audio",
)
DRAFTER = "drafter"  # a speculative-decoding drafter's weights (`weight_bytes_per_gpu` keys plus this one)
# How an axis is split across ranks.
_TP, _EP, _TP_IN_EP, _KV = "tp", "ep", "tp/ep", "kv"


@dataclass(frozen=True)
class _Tensor:
    """One stored tensor: its component, full shape, and how a layout shards it."""

    component: str
    shape: tuple[int, ...]
    quantisable: bool = False
    split: tuple[str, ...] = ()
    kv_heads: int = 0

    @property
    def numel(self) -> int:
        return math.prod(self.shape)

    def rank_shape(self, tp: int, ep: int, redundant: int = 0) -> tuple[int, ...]:
        """The shard one rank holds; an expert axis grows by the `redundant` slots before it splits."""
        divisors = {_TP: tp, _EP: ep, _TP_IN_EP: tp // ep}
        out = []
        for i, size in enumerate(self.shape):
            how = self.split[i] if i < len(self.split) else ""
            if how == _KV:
                size = math.ceil(self.kv_heads / tp) * (size // self.kv_heads)
            elif how == _EP:
                size = (size + redundant) // ep
            elif how:
                size //= divisors[how]
            out.append(size)
        return tuple(out)

    def rank_bytes(self, fmt: WeightFormat, tp: int, ep: int, redundant: int = 0) -> int:
        shape = self.rank_shape(tp, ep, redundant)
        if not (self.quantisable and fmt.quantised):
            return math.prod(shape) * fmt.unquantised_bytes
        *lead, rows, cols = shape
        return math.prod(lead) * fmt.matrix_bytes(rows, cols)


def _column(component: str, rows: int, cols: int) -> _Tensor:
    return _Tensor(component, (rows, cols), True, (_TP, ""))


def _row(component: str, rows: int, cols: int) -> _Tensor:
    return _Tensor(component, (rows, cols), True, ("", _TP))


def _vector(component: str, size: int) -> _Tensor:
    return _Tensor(component, (size,))


def _text_tensors(text: Gemma4TextConfig) -> Iterator[_Tensor]:
    h, p, layers = text.hidden_size, text.hidden_size_per_layer_input, text.num_hidden_layers
    yield _Tensor(EMBEDDING, (text.vocab_size, h), split=(_TP, ""))  # also the tied LM head
    yield _vector(DECODER, h)  # final norm
    if p:
        yield _Tensor(PLE, (text.vocab_size_per_layer_input, layers * p), split=(_TP, ""))
        yield _Tensor(DECODER, (layers * p, h), quantisable=True)  # per_layer_model_projection
        yield _vector(DECODER, p)  # per_layer_projection_norm
    for spec in text.layers:
        yield from _layer_tensors(text, spec)


def _layer_tensors(text: Gemma4TextConfig, spec: LayerSpec) -> Iterator[_Tensor]:
    h, d, heads = text.hidden_size, spec.head_dim, text.num_attention_heads
    yield _column(DECODER, heads * d, h)  # q_proj
    yield _vector(DECODER, d)  # q_norm
    # KV-sharing layers still carry k/v projections in the checkpoint; the model never loads them.
    kv_component = UNUSED_KV if spec.shares_kv else DECODER
    kv_proj = _Tensor(kv_component, (spec.num_kv_heads * d, h), True, (_KV, ""), spec.num_kv_heads)
    yield kv_proj  # k_proj
    if not spec.k_eq_v:
        yield kv_proj  # v_proj
    yield _vector(kv_component, d)  # k_norm
    yield _row(DECODER, h, heads * d)  # o_proj
    for _ in range(4):  # input, post-attention, pre- and post-feed-forward norms
        yield _vector(DECODER, h)
    yield _vector(DECODER, 1)  # layer_scalar
    i = spec.intermediate_size
    yield _column(DECODER, i, h)  # gate_proj
    yield _column(DECODER, i, h)  # up_proj
    yield _row(DECODER, h, i)  # down_proj
    if text.enable_moe_block:
        assert text.num_experts is not None and text.moe_intermediate_size is not None
        e, mi = text.num_experts, text.moe_intermediate_size
        yield _Tensor(DECODER, (e, h))  # router.proj: routing stays in bf16 and fp32 math
        yield _vector(DECODER, h)  # router.scale
        yield _vector(DECODER, e)  # router.per_expert_scale
        yield _Tensor(EXPERTS, (e, 2 * mi, h), True, (_EP, _TP_IN_EP, ""))  # gate_up_proj
        yield _Tensor(EXPERTS, (e, h, mi), True, (_EP, "", _TP_IN_EP))  # down_proj
        for _ in range(3):  # pre_feedforward_layernorm_2, post_feedforward_layernorm_1 and _2
            yield _vector(DECODER, h)
    p = text.hidden_size_per_layer_input
    if p:
        yield _Tensor(DECODER, (p, h), quantisable=True)  # per_layer_input_gate
        yield _Tensor(DECODER, (h, p), quantisable=True)  # per_layer_projection
        yield _vector(DECODER, h)  # post_per_layer_input_norm


def _tower_linear(component: str, rows: int, cols: int, clipped: bool) -> Iterator[_Tensor]:
    """A tower linear; clipped linears add four scalar bounds (input/output min/max)."""
    yield _Tensor(component, (rows, cols))
    if clipped:
        for _ in range(4):
            yield _Tensor(component, ())


def _vision_tensors(vision: Gemma4VisionConfig, text_hidden: int) -> Iterator[_Tensor]:
    d, hd, i, clip = vision.hidden_size, vision.head_dim, vision.intermediate_size, vision.use_clipped_linears
    q, kv = vision.num_attention_heads * hd, vision.num_key_value_heads * hd
    yield _Tensor(VISION, (2, vision.position_embedding_size, d))
    yield _Tensor(VISION, (d, 3 * vision.patch_size**2))  # input_proj over RGB patches
    for _ in range(vision.num_hidden_layers):
        for rows, cols in ((q, d), (kv, d), (kv, d), (d, q), (i, d), (i, d), (d, i)):
            yield from _tower_linear(VISION, rows, cols, clip)
        yield from (_vector(VISION, hd), _vector(VISION, hd))  # q_norm, k_norm
        for _ in range(4):
            yield _vector(VISION, d)
    if vision.standardize:
        yield from (_vector(VISION, d), _vector(VISION, d))  # std_bias, std_scale
    yield _Tensor(VISION, (text_hidden, d))  # embed_vision.embedding_projection


def _audio_tensors(audio: Gemma4AudioConfig, text_hidden: int) -> Iterator[_Tensor]:
    a, clip = audio.hidden_size, audio.use_clipped_linears
    c0, c1 = audio.subsampling_conv_channels
    yield from (_Tensor(AUDIO, (c0, 1, 3, 3)), _vector(AUDIO, c0), _Tensor(AUDIO, (c1, c0, 3, 3)), _vector(AUDIO, c1))
    yield _Tensor(AUDIO, (a, (c0 // 4) * c1))  # input_proj_linear (transformers' sizing)
    for _ in range(audio.num_hidden_layers):
        for _ in range(2):  # the two half-step feed-forward blocks
            yield from _tower_linear(AUDIO, 4 * a, a, clip)
            yield from _tower_linear(AUDIO, a, 4 * a, clip)
            yield from (_vector(AUDIO, a), _vector(AUDIO, a))
        yield _vector(AUDIO, a // audio.num_attention_heads)  # per_dim_scale
        for _ in range(4):  # q, k, v, post
            yield from _tower_linear(AUDIO, a, a, clip)
        yield _Tensor(AUDIO, (a, a))  # relative_k_proj
        yield from _tower_linear(AUDIO, 2 * a, a, clip)  # light conv: linear_start (GLU)
        yield from _tower_linear(AUDIO, a, a, clip)  # linear_end
        yield _Tensor(AUDIO, (a, 1, audio.conv_kernel_size))  # depthwise conv
        for _ in range(5):  # lconv pre/conv norms, norm_pre_attn, norm_post_attn, norm_out
            yield _vector(AUDIO, a)
    yield from (_Tensor(AUDIO, (audio.output_proj_dims, a)), _vector(AUDIO, audio.output_proj_dims))
    yield _Tensor(AUDIO, (text_hidden, audio.output_proj_dims))  # embed_audio.embedding_projection


def _tensors(config: Gemma4Config) -> Iterator[_Tensor]:
    yield from _text_tensors(config.text)
    if config.vision is not None:
        yield from _vision_tensors(config.vision, config.text.hidden_size)
    if config.audio is not None:
        yield from _audio_tensors(config.audio, config.text.hidden_size)


# ---------------------------------------------------------------------------- parameters


@dataclass(frozen=True)
class ParamCounts:
    """Parameters per component; the tied LM head is the embedding, counted once.

    `text` is what transformers builds for the decoder (the checkpoint's `model.language_model.`);
    `unused_kv` are the K/V projections E2B/E4B checkpoints also store for KV-sharing layers.
    """

    embedding: int
    decoder: int
    experts: int
    ple: int
    unused_kv: int
    vision: int
    audio: int

    @property
    def text(self) -> int:
        return self.embedding + self.decoder + self.experts + self.ple

    @property
    def total(self) -> int:
        """All model parameters, towers included (the published "total params")."""
        return self.text + self.vision + self.audio

    @property
    def stored(self) -> int:
        """Everything the safetensors hold."""
        return self.total + self.unused_kv


def param_counts(variant: str | Gemma4Config) -> ParamCounts:
    """Parameter counts of a variant (by name) or of any config."""
    counts = dict.fromkeys((EMBEDDING, DECODER, EXPERTS, PLE, UNUSED_KV, VISION, AUDIO), 0)
    for tensor in _tensors(_config(variant)):
        counts[tensor.component] += tensor.numel
    return ParamCounts(**counts)


def _config(variant: str | Gemma4Config) -> Gemma4Config:
    return variant if isinstance(variant, Gemma4Config) else variant_config(variant)


def _weight_format(name: str) -> WeightFormat:
    try:
        return WEIGHT_FORMATS[name]
    except KeyError:
        raise ValueError(f"unknown weight dtype {name!r}; known: {', '.join(WEIGHT_FORMATS)}") from None


def _kv_bytes(name: str) -> int:
    try:
        return KV_DTYPE_BYTES[name]
    except KeyError:
        raise ValueError(f"unknown KV cache dtype {name!r}; known: {', '.join(KV_DTYPE_BYTES)}") from None


def checkpoint_bytes(variant: str | Gemma4Config, dtype: str) -> int:
    """Size of the whole checkpoint at `dtype`: every stored parameter times its nominal width.

    This is how published weight tables are made (total params x 2 / 1 / 0.5 bytes), with no
    scales and no bf16 embeddings; `weight_bytes_per_gpu` is the figure to plan with.
    """
    return math.ceil(param_counts(variant).stored * _weight_format(dtype).bytes_per_param)


# ---------------------------------------------------------------------------- layout and weights


def served_modalities(config: Gemma4Config, requested: tuple[str, ...] | str) -> tuple[str, ...]:
    """The modalities a deployment serves, in MODALITIES order ('all' = what the checkpoint takes; text is
    always on); ValueError for an unknown one or one the checkpoint has no tower for."""
    if requested == "all":
        return config.modalities
    mods = (requested,) if isinstance(requested, str) else tuple(requested)
    unknown = [m for m in mods if m not in MODALITIES]
    if unknown:
        raise ValueError(f"unknown modalities {unknown}; known: {', '.join(MODALITIES)} or 'all'")
    missing = [m for m in mods if m not in config.modalities]
    if missing:
        raise ValueError(f"this checkpoint has no {'/'.join(missing)} input (it takes {', '.join(config.modalities)})")
    return tuple(m for m in MODALITIES if m == "text" or m in mods)


def check_layout(text: Gemma4TextConfig, tensor_parallel: int, expert_parallel: int, redundant_experts: int = 0) -> None:
    """Raise ValueError if the decoder cannot be split `tensor_parallel` / `expert_parallel` ways with
    `redundant_experts` extra expert slots per MoE layer (spread evenly over the EP groups)."""
    tp, ep, r = tensor_parallel, expert_parallel, redundant_experts
    if tp < 1 or ep < 1:
        raise ValueError(f"tensor_parallel and expert_parallel must be >= 1, got {tp} and {ep}")
    if r < 0:
        raise ValueError(f"redundant_experts must be >= 0, got {r}")
    sizes = [("attention heads", text.num_attention_heads), ("vocabulary", text.vocab_size)]
    sizes += [("MLP width", n) for n in {s.intermediate_size for s in text.layers}]
    bad = [f"{what} ({n})" for what, n in sizes if n % tp]
    # KV heads split evenly, or (TP beyond the heads) each rank keeps one replicated head.
    bad += [f"KV heads ({n})" for n in {s.num_kv_heads for s in text.layers} if n % tp and tp % n]
    if bad:
        raise ValueError(f"tensor_parallel={tp} does not divide the {', '.join(bad)}")
    if not text.enable_moe_block:
        for name, value, default in (("expert_parallel", ep, 1), ("redundant_experts", r, 0)):
            if value != default:
                raise ValueError(f"{name} applies to the MoE variant (26b-a4b) only")
        return
    assert text.num_experts is not None and text.moe_intermediate_size is not None
    if tp % ep or text.num_experts % ep or text.moe_intermediate_size % (tp // ep):
        raise ValueError(
            f"expert_parallel={ep} must divide tensor_parallel={tp} and the {text.num_experts} experts, "
            f"and tensor_parallel/expert_parallel must divide the expert width {text.moe_intermediate_size}"
        )
    if r % ep:
        raise ValueError(f"redundant_experts={r} must be a multiple of expert_parallel={ep} (each EP group "
                         "holds the same number of expert slots)")


def _device_components(config: Gemma4Config, *, ple_on_device: bool, modalities: tuple[str, ...]) -> set[str]:
    """The components a GPU holds for this deployment."""
    loaded = {EMBEDDING, DECODER}
    loaded |= {EXPERTS} if config.text.enable_moe_block else set()
    loaded |= {PLE} if ple_on_device and config.text.hidden_size_per_layer_input else set()
    loaded |= {VISION} if {"image", "video"} & set(modalities) else set()
    loaded |= {AUDIO} if "audio" in modalities else set()
    return loaded


def weight_bytes_per_gpu(
    config: Gemma4Config,
    *,
    weight_dtype: str = "bf16",
    tensor_parallel: int = 1,
    expert_parallel: int = 1,
    ple_on_device: bool = False,
    modalities: tuple[str, ...] | str = ("text",),
    redundant_experts: int = 0,
) -> dict[str, int]:
    """Bytes one GPU holds per component (embedding, decoder, experts, ple, vision, audio).

    The PLE table counts only with `ple_on_device` (else it lives in host memory); towers only for
    the modalities served; the unused K/V of KV-sharing layers never. Each EP rank holds
    `(num_experts + redundant_experts) / expert_parallel` experts' shards.
    """
    fmt = _weight_format(weight_dtype)
    check_layout(config.text, tensor_parallel, expert_parallel, redundant_experts)
    loaded = _device_components(config, ple_on_device=ple_on_device, modalities=served_modalities(config, modalities))
    out = dict.fromkeys(sorted(loaded), 0)
    for tensor in _tensors(config):
        if tensor.component in loaded:
            out[tensor.component] += tensor.rank_bytes(fmt, tensor_parallel, expert_parallel, redundant_experts)
    return out


def ple_table_bytes(text: Gemma4TextConfig) -> int:
    """The bf16 PLE table (E2B/E4B); 0 for the variants without PLE."""
    return sum(t.numel for t in _text_tensors(text) if t.component == PLE) * 2


# ---------------------------------------------------------------------------- KV cache


def rank_cache_groups(text: Gemma4TextConfig, tensor_parallel: int = 1) -> tuple[CacheGroup, ...]:
    """The cache groups as one TP rank holds them: KV heads split, at least one head per rank."""
    return tuple(
        dataclasses.replace(g, num_kv_heads=math.ceil(g.num_kv_heads / tensor_parallel)) for g in cache_groups(text)
    )


def kv_bytes_per_token(text: Gemma4TextConfig, kv_dtype: str = "bf16", *, tensor_parallel: int = 1) -> dict[str, int]:
    """Bytes one token occupies per cache group (all its layers), on one TP rank."""
    width = _kv_bytes(kv_dtype)
    return {g.name: g.bytes_per_token(width) for g in rank_cache_groups(text, tensor_parallel)}


def kv_bytes_per_sequence(
    text: Gemma4TextConfig, context_len: int, kv_dtype: str = "bf16", *, tensor_parallel: int = 1
) -> int:
    """Bytes a sequence of `context_len` tokens holds on one TP rank; sliding groups keep only their window."""
    width = _kv_bytes(kv_dtype)
    return sum(
        g.bytes_per_token(width) * (context_len if g.sliding_window is None else min(context_len, g.sliding_window))
        for g in rank_cache_groups(text, tensor_parallel)
    )


def _kv_reservation_per_sequence(
    groups: tuple[CacheGroup, ...], *, kv_width: int, block_size: int, max_model_len: int, max_num_batched_tokens: int
) -> int:
    """Bytes the engine's pools set aside per concurrent sequence (`split_kv_budget`'s per-sequence need)."""
    return sum(
        g.peak_blocks_per_sequence(block_size, max_model_len, max_num_batched_tokens)
        * g.bytes_per_block(block_size, kv_width)
        for g in groups
    )


# ---------------------------------------------------------------------------- activations


def _decoder_activation_phases(
    text: Gemma4TextConfig, *, tokens: int, tp: int, ep: int, width: int
) -> dict[str, int]:
    """Per-layer transients of one forward step over `tokens` tokens, by phase (they do not overlap)."""
    heads = text.num_attention_heads // tp
    head_dim = max(s.head_dim for s in text.layers)
    kv = max(math.ceil(s.num_kv_heads / tp) * s.head_dim * (1 if s.k_eq_v else 2) for s in text.layers)
    # q, k/v and the attention output in the activation dtype, plus fp32 accumulators / split-KV partials.
    attention = tokens * (2 * heads * head_dim + kv) * width + tokens * heads * head_dim * 4
    mlp_width = max(s.intermediate_size for s in text.layers) // tp
    feed_forward = 3 * tokens * mlp_width * width  # gate, up, and their product
    if text.enable_moe_block:
        assert text.top_k_experts is not None and text.num_experts is not None
        assert text.moe_intermediate_size is not None
        routed = tokens * text.top_k_experts
        rows = min(routed, math.ceil(routed / ep * MOE_IMBALANCE)) if ep > 1 else routed
        expert_width = text.moe_intermediate_size // (tp // ep)
        dispatch = (2 if ep > 1 else 1) * routed * text.hidden_size * width  # permuted (sent + received) rows
        feed_forward += (
            tokens * text.num_experts * 4  # fp32 router probabilities
            + dispatch
            + rows * 3 * expert_width * width  # gate_up output and the activated product
            + rows * text.hidden_size * width  # expert outputs before the weighted sum
        )
    return {"attention": attention, "feed_forward": feed_forward}


def _vision_activations(vision: Gemma4VisionConfig, width: int) -> int:
    patches = vision.default_output_length * vision.pooling_kernel_size**2
    q = vision.num_attention_heads * vision.head_dim
    return patches * (RESIDUAL_BUFFERS * vision.hidden_size + 3 * q + 3 * vision.intermediate_size) * width


def _audio_activations(audio: Gemma4AudioConfig, width: int) -> int:
    a, c0 = audio.hidden_size, audio.subsampling_conv_channels[0]
    frames = AUDIO_MAX_TOKENS * AUDIO_FRAMES_PER_TOKEN
    conv = c0 * (frames // 2) * (AUDIO_MEL_BINS // 2) * width  # the first stride-2 conv's output
    conformer = AUDIO_MAX_TOKENS * (RESIDUAL_BUFFERS * a + 3 * a + 4 * a) * width
    logits = AUDIO_MAX_TOKENS * audio.num_attention_heads * AUDIO_ATTENTION_KEYS * 4
    return max(conv, conformer + logits)


def activation_bytes(
    config: Gemma4Config,
    *,
    tokens: int,
    sampled_rows: int,
    tensor_parallel: int = 1,
    expert_parallel: int = 1,
    activation_width: int = 2,
    modalities: tuple[str, ...] = ("text",),
) -> int:
    """Peak transient memory of one engine step on one GPU.

    Live across the step: the residual stream buffers and (E2B/E4B) the per-layer inputs. On top,
    the largest of the phases that do not overlap: attention, the feed-forward (dense MLP plus
    MoE dispatch and expert buffers), the sampler (fp32 logits over the whole vocabulary for each
    sampled row, plus its sort temporaries) and, when served, one image or audio clip's encoder.
    Attention is priced for a flash-style kernel that never materialises scores.
    """
    text = config.text
    live = RESIDUAL_BUFFERS * tokens * text.hidden_size * activation_width
    if text.hidden_size_per_layer_input:  # token-identity and context parts of the per-layer inputs
        live += 2 * tokens * text.num_hidden_layers * text.hidden_size_per_layer_input * activation_width
    phases = _decoder_activation_phases(
        text, tokens=tokens, tp=tensor_parallel, ep=expert_parallel, width=activation_width
    )
    phases["sampler"] = sampled_rows * text.vocab_size * (4 + SAMPLER_BYTES_PER_LOGIT)
    if config.vision is not None and {"image", "video"} & set(modalities):
        phases["vision"] = _vision_activations(config.vision, activation_width)
    if config.audio is not None and "audio" in modalities:
        phases["audio"] = _audio_activations(config.audio, activation_width)
    return live + max(phases.values())


def encoder_cache_bytes(
    config: Gemma4Config,
    *,
    modalities: tuple[str, ...] | str,
    max_num_batched_tokens: int,
    encoder_cache_tokens: int | None = None,
    activation_width: int = 2,
) -> int:
    """The engine's device-side cache of encoder outputs, so a media item is encoded once per request
    however many prefill chunks it spans: `encoder_cache_tokens` soft tokens (None: the engine's
    default, ENCODER_CACHE_STEPS x max_num_batched_tokens), each one text-hidden vector in the model
    dtype, on every TP rank (the towers are replicated). 0 when only text is served: no cache then."""
    if served_modalities(config, modalities) == ("text",):
        return 0
    tokens = ENCODER_CACHE_STEPS * max_num_batched_tokens if encoder_cache_tokens is None else encoder_cache_tokens
    return tokens * config.text.hidden_size * activation_width


def capture_sizes(max_num_seqs: int) -> list[int]:
    """Decode batch sizes an engine captures graphs for (vLLM's default list, up to max_num_seqs)."""
    top = min(max_num_seqs, MAX_CAPTURED_BATCH)
    return sorted({b for b in (1, 2, 4, *range(8, top + 1, 8)) if b <= top} | {top})


def cuda_graph_bytes(
    config: Gemma4Config, *, max_num_seqs: int, tensor_parallel: int = 1, expert_parallel: int = 1,
    activation_width: int = 2,
) -> int:
    """Graph pool (forward activations at the largest captured decode batch) plus per-capture overhead."""
    sizes = capture_sizes(max_num_seqs)
    pool = activation_bytes(
        config, tokens=sizes[-1], sampled_rows=0, tensor_parallel=tensor_parallel,
        expert_parallel=expert_parallel, activation_width=activation_width,
    )
    return pool + len(sizes) * GRAPH_BYTES_PER_CAPTURE


# ---------------------------------------------------------------------------- speculative decoding


@dataclass(frozen=True)
class DrafterShape:
    """What the memory model needs of a `gemma4_assistant` drafter (its config.json, or `PUBLISHED_DRAFTERS`).

    Its decoder layers all read the target's KV (no k/v projections or k-norms of their own); the
    embedding is tied to its LM head; `pre_projection` maps [target embedding, target hidden] to its
    width and `post_projection` back. With `use_ordered_embeddings` it also holds the masked embedder's
    centroids and its int64 `token_ordering` buffer.
    """

    hidden_size: int
    backbone_hidden_size: int
    intermediate_size: int
    num_attention_heads: int
    layer_head_dims: tuple[int, ...]  # per layer: head_dim (sliding) or global_head_dim (full)
    vocab_size: int = 262_144
    use_ordered_embeddings: bool = False
    num_centroids: int = 2048
    tie_word_embeddings: bool = True  # else its own lm_head besides the embedding

    @classmethod
    def of(cls, config: Gemma4AssistantConfig) -> "DrafterShape":
        """The shape of a drafter's parsed config (`gemma4.assistant_config`: one reader of config.json)."""
        text = config.text
        return cls(
            hidden_size=text.hidden_size,
            backbone_hidden_size=config.backbone_hidden_size,
            intermediate_size=text.intermediate_size,
            num_attention_heads=text.num_attention_heads,
            layer_head_dims=tuple(layer.head_dim for layer in text.layers),
            vocab_size=text.vocab_size,
            use_ordered_embeddings=config.use_ordered_embeddings,
            num_centroids=config.num_centroids,
            tie_word_embeddings=config.tie_word_embeddings,
        )

    @classmethod
    def from_hf_dict(cls, raw: Mapping[str, Any]) -> "DrafterShape":
        """From a gemma4_assistant config.json's contents (ConfigError, a ValueError, when it is not one)."""
        return cls.of(Gemma4AssistantConfig.from_hf_dict(raw))


def load_drafter_shape(path: str | Path) -> DrafterShape:
    """The drafter shape of a gemma4_assistant checkpoint directory (its config.json)."""
    return DrafterShape.of(load_assistant_config(path))


def _drafter(backbone: int, hidden: int, intermediate: int, heads: int, ordered: bool) -> DrafterShape:
    """Four layers, three sliding (head_dim 256) and one full (512), as Gemma 4's published drafters have."""
    return DrafterShape(hidden, backbone, intermediate, heads, (256, 256, 256, 512), use_ordered_embeddings=ordered)


# The published `google/gemma-4-*-it-assistant` drafters, for plans made from a model reference alone.
# E2B: hidden 256 gives 77.7 M parameters, the published ~78 M (performance anchors s4.7). 31B: the shape
# Modular MAX documents as its Gemma4AssistantConfig defaults (hidden 1024, 4 layers, 32 heads, FFN 8192,
# backbone 5376). E4B and 26B-A4B shapes are not published anywhere we found: conservative estimates,
# E4B at twice the E2B drafter's width and 26B-A4B at the 31B drafter's size (over-counting only costs
# KV blocks). The E2B/E4B drafters score centroid-selected candidates (the vLLM recipe), so they carry
# the masked embedder.
PUBLISHED_DRAFTERS: dict[str, DrafterShape] = {
    "e2b": _drafter(1536, 256, 2048, 4, ordered=True),
    "e4b": _drafter(2560, 512, 4096, 8, ordered=True),
    "26b-a4b": _drafter(2816, 1024, 8192, 32, ordered=False),
    "31b": _drafter(5376, 1024, 8192, 32, ordered=False),
}
SPECULATIVE_METHODS = ("ngram", "assistant")


def _drafter_tensors(drafter: DrafterShape) -> Iterator[_Tensor]:
    h, heads, i = drafter.hidden_size, drafter.num_attention_heads, drafter.intermediate_size
    yield _Tensor(DRAFTER, (drafter.vocab_size, h))  # embed_tokens, also the lm_head when tied
    if not drafter.tie_word_embeddings:
        yield _Tensor(DRAFTER, (drafter.vocab_size, h))  # lm_head
    yield _vector(DRAFTER, h)  # final norm
    yield _Tensor(DRAFTER, (h, 2 * drafter.backbone_hidden_size))  # pre_projection
    yield _Tensor(DRAFTER, (drafter.backbone_hidden_size, h))  # post_projection
    for d in drafter.layer_head_dims:
        yield from (_Tensor(DRAFTER, (heads * d, h)), _vector(DRAFTER, d), _Tensor(DRAFTER, (h, heads * d)))  # q, q_norm, o
        for _ in range(4):  # input, post-attention, pre- and post-feed-forward norms
            yield _vector(DRAFTER, h)
        yield _vector(DRAFTER, 1)  # layer_scalar
        yield from (_Tensor(DRAFTER, (i, h)), _Tensor(DRAFTER, (i, h)), _Tensor(DRAFTER, (h, i)))  # gate, up, down
    if drafter.use_ordered_embeddings:
        yield _Tensor(DRAFTER, (drafter.num_centroids, h))  # masked_embedding.centroids


def drafter_param_count(drafter: DrafterShape) -> int:
    """The drafter's parameters (the tied head counted once; the token_ordering buffer is no parameter)."""
    return sum(t.numel for t in _drafter_tensors(drafter))


def drafter_weight_bytes(drafter: DrafterShape, weight_dtype: str) -> int:
    """The drafter on every rank (replicated: it is small, and its steps then need no collectives), in the
    target's 16-bit (or fp32) width, plus its int64 token_ordering buffer."""
    width = _weight_format(weight_dtype).unquantised_bytes
    ordering = drafter.vocab_size * 8 if drafter.use_ordered_embeddings else 0
    return drafter_param_count(drafter) * width + ordering


def speculative_buffer_bytes(
    text: Gemma4TextConfig, *, num_tokens: int, max_num_seqs: int, drafter: DrafterShape | None,
    activation_width: int = 2,
) -> int:
    """Step buffers speculation adds on one GPU (fixed shapes, allocated once like the KV pools).

    The verification step scores 1 + k positions per sequence: max_num_seqs x (1 + k) rows of fp32 target
    logits. A drafter (None = n-gram drafting, which needs nothing else) runs k steps over max_num_seqs
    rows: per step its input ([embedding, hidden] of the target), residual buffers and the projected
    hidden state, and the fp32 logits over the vocabulary that rejection sampling reads back.
    """
    if num_tokens < 1:
        return 0
    verify = max_num_seqs * (1 + num_tokens) * text.vocab_size * 4
    if drafter is None:
        return verify
    b, h = drafter.backbone_hidden_size, drafter.hidden_size
    hidden = (2 * b + RESIDUAL_BUFFERS * h + 3 * drafter.intermediate_size + b) * activation_width
    return verify + num_tokens * max_num_seqs * (hidden + drafter.vocab_size * 4)


# ---------------------------------------------------------------------------- budget


@dataclass(frozen=True)
class MemoryBreakdown:
    """Bytes on one GPU. `kv_cache` is what the requested concurrency needs; `total` must fit `capacity`."""

    weights: int
    kv_cache: int
    activations: int
    encoder_cache: int
    cuda_graphs: int
    runtime_overhead: int
    headroom: int
    capacity: int
    speculative: int = 0

    @property
    def total(self) -> int:
        return (
            self.weights + self.kv_cache + self.activations + self.encoder_cache + self.cuda_graphs
            + self.runtime_overhead + self.headroom + self.speculative
        )

    def to_dict(self) -> dict[str, int]:
        return {**dataclasses.asdict(self), "total": self.total}


@dataclass(frozen=True)
class _Fixed:
    """Everything on one GPU except the KV cache."""

    weights: dict[str, int]
    activations: int
    encoder_cache: int
    cuda_graphs: int
    runtime_overhead: int
    headroom: int
    capacity: int
    speculative: int = 0

    @property
    def kv_budget(self) -> int:
        """What is left for the KV cache (negative when even the rest does not fit)."""
        used = sum(self.weights.values()) + self.activations + self.encoder_cache + self.cuda_graphs
        used += self.runtime_overhead + self.speculative
        return self.capacity - used - self.headroom


def _fixed_costs(
    config: Gemma4Config,
    *,
    weight_dtype: str,
    capacity_bytes: int,
    max_num_seqs: int,
    max_num_batched_tokens: int,
    tensor_parallel: int,
    expert_parallel: int,
    ple_on_device: bool,
    modalities: tuple[str, ...] | str,
    cuda_graphs: bool,
    redundant_experts: int = 0,
    encoder_cache_tokens: int | None = None,
    speculative_tokens: int = 0,
    drafter: DrafterShape | None = None,
) -> _Fixed:
    """The one place the non-KV memory of a GPU is computed (plan and engine both use it).

    `speculative_tokens` drafts per sequence and step (0: no speculation) by `drafter` (None: n-gram)."""
    mods = served_modalities(config, modalities)
    weights = weight_bytes_per_gpu(
        config, weight_dtype=weight_dtype, tensor_parallel=tensor_parallel, expert_parallel=expert_parallel,
        ple_on_device=ple_on_device, modalities=mods, redundant_experts=redundant_experts,
    )
    if speculative_tokens and drafter is not None:
        weights[DRAFTER] = drafter_weight_bytes(drafter, weight_dtype)
    width = 4 if weight_dtype == "fp32" else 2  # quantised weights still compute in bf16
    activations = activation_bytes(
        config, tokens=max_num_batched_tokens, sampled_rows=min(max_num_seqs, max_num_batched_tokens),
        tensor_parallel=tensor_parallel, expert_parallel=expert_parallel, activation_width=width, modalities=mods,
    )
    graphs = cuda_graph_bytes(
        config, max_num_seqs=max_num_seqs, tensor_parallel=tensor_parallel, expert_parallel=expert_parallel,
        activation_width=width,
    ) if cuda_graphs else 0
    overhead = RUNTIME_RESERVED_BYTES + (COLLECTIVE_BUFFER_BYTES if tensor_parallel > 1 else 0)
    overhead += math.ceil(ALLOCATOR_SLACK_FRACTION * activations)
    return _Fixed(
        weights=weights,
        activations=activations,
        encoder_cache=encoder_cache_bytes(
            config, modalities=mods, max_num_batched_tokens=max_num_batched_tokens,
            encoder_cache_tokens=encoder_cache_tokens, activation_width=width,
        ),
        cuda_graphs=graphs,
        runtime_overhead=overhead,
        headroom=math.ceil(HEADROOM_FRACTION * capacity_bytes),
        capacity=capacity_bytes,
        speculative=speculative_buffer_bytes(
            config.text, num_tokens=speculative_tokens, max_num_seqs=max_num_seqs, drafter=drafter,
            activation_width=width,
        ),
    )


def kv_cache_budget_bytes(
    config: Gemma4Config,
    *,
    weight_dtype: str,
    device_memory_bytes: int,
    usable_fraction: float,
    max_num_seqs: int,
    max_num_batched_tokens: int,
    tensor_parallel: int = 1,
    expert_parallel: int = 1,
    ple_on_device: bool = True,
    modalities: tuple[str, ...] | str = ("text",),
    cuda_graphs: bool = True,
    redundant_experts: int = 0,
    encoder_cache_tokens: int | None = None,
    speculative_tokens: int = 0,
    drafter: DrafterShape | None = None,
) -> int:
    """Bytes of KV cache one GPU can hold: its usable memory minus weights (a drafter's included), activations,
    the encoder cache (media served), speculation's buffers, graphs, runtime overhead and headroom (0 when
    those alone do not fit). `plan` uses the same arithmetic."""
    fixed = _fixed_costs(
        config, weight_dtype=weight_dtype, capacity_bytes=int(device_memory_bytes * usable_fraction),
        max_num_seqs=max_num_seqs, max_num_batched_tokens=max_num_batched_tokens,
        tensor_parallel=tensor_parallel, expert_parallel=expert_parallel, ple_on_device=ple_on_device,
        modalities=modalities, cuda_graphs=cuda_graphs, redundant_experts=redundant_experts,
        encoder_cache_tokens=encoder_cache_tokens, speculative_tokens=speculative_tokens, drafter=drafter,
    )
    return max(0, fixed.kv_budget)


# ---------------------------------------------------------------------------- plan


@dataclass(frozen=True)
class ServingSpec:
    """What to serve and on what. `gpus` / `tensor_parallel` / `expert_parallel` None = chosen by `plan`.

    `redundant_experts` extra expert slots per MoE layer hold copies of hot experts (the engine's
    `redundant_experts`); a layout whose EP degree does not divide them is not chosen.

    `gpu_memory_utilization` None takes the accelerator's usable fraction. `modalities` is a tuple
    of 'text', 'image', 'video', 'audio', or 'all' (whatever the checkpoint takes).
    `encoder_cache_tokens` sizes the engine's encoder-output cache (its `encoder_cache_tokens`; None:
    its default), which a replica holds when it serves a media modality.

    `speculative` turns on speculative decoding: 'ngram' (prompt lookup, no model) or 'assistant' (the
    variant's published drafter, `PUBLISHED_DRAFTERS`); `num_speculative_tokens` drafts per sequence and
    step (None: the variant's default, `gemma4.config.DEFAULT_SPECULATIVE_TOKENS`).
    """

    variant: str
    weight_dtype: str = "bf16"
    kv_dtype: str = "bf16"
    accelerator: str = "h100-80gb"
    max_model_len: int = 8192
    max_num_seqs: int = 16
    gpus: int | None = None
    tensor_parallel: int | None = None
    expert_parallel: int | None = None
    redundant_experts: int = 0
    max_num_batched_tokens: int = 2048
    block_size: int = 16
    ple_on_device: bool = True  # our engine keeps the PLE table on the device
    modalities: tuple[str, ...] | str = ("text",)
    gpu_memory_utilization: float | None = None
    encoder_cache_tokens: int | None = None
    speculative: str | None = None
    num_speculative_tokens: int | None = None

    def __post_init__(self) -> None:
        if not isinstance(self.modalities, str):
            object.__setattr__(self, "modalities", tuple(self.modalities))
        _weight_format(self.weight_dtype)
        _kv_bytes(self.kv_dtype)
        config = variant_config(self.variant)
        object.__setattr__(self, "variant", config.family)  # canonical names: "31B" -> "31b"
        object.__setattr__(self, "accelerator", get_accelerator(self.accelerator).name)
        for name in ("max_model_len", "max_num_seqs", "max_num_batched_tokens", "block_size"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(f"{name} must be a positive integer, got {value!r}")
        if not isinstance(self.redundant_experts, int) or isinstance(self.redundant_experts, bool) \
                or self.redundant_experts < 0:
            raise ValueError(f"redundant_experts must be a non-negative integer, got {self.redundant_experts!r}")
        if self.redundant_experts and not config.text.enable_moe_block:
            raise ValueError("redundant_experts applies to the MoE variant (26b-a4b) only")
        if self.speculative is not None and self.speculative not in SPECULATIVE_METHODS:
            raise ValueError(f"speculative must be one of {', '.join(SPECULATIVE_METHODS)} or None, got {self.speculative!r}")
        if self.num_speculative_tokens is not None and self.speculative is None:
            raise ValueError("num_speculative_tokens needs speculative ('ngram' or 'assistant')")
        for name in ("gpus", "tensor_parallel", "expert_parallel", "encoder_cache_tokens", "num_speculative_tokens"):
            value = getattr(self, name)
            if value is not None and (not isinstance(value, int) or isinstance(value, bool) or value < 1):
                raise ValueError(f"{name} must be a positive integer or None, got {value!r}")
        if self.gpus is not None and self.tensor_parallel is not None and self.gpus != self.tensor_parallel:
            raise ValueError(
                f"gpus ({self.gpus}) and tensor_parallel ({self.tensor_parallel}) differ; a replica is one "
                "tensor-parallel group, so give one of them"
            )
        fraction = self.gpu_memory_utilization
        if fraction is not None and not 0 < fraction <= 1:
            raise ValueError(f"gpu_memory_utilization must be in (0, 1], got {fraction}")
        if self.max_model_len > config.text.max_position_embeddings:
            raise ValueError(
                f"max_model_len {self.max_model_len} exceeds the model's context "
                f"({config.text.max_position_embeddings} tokens)"
            )
        served_modalities(config, self.modalities)

    @property
    def speculative_tokens(self) -> int:
        """Drafts per sequence and step: 0 without speculation."""
        if self.speculative is None:
            return 0
        return self.num_speculative_tokens or DEFAULT_SPECULATIVE_TOKENS[self.variant]

    @property
    def drafter(self) -> DrafterShape | None:
        """The drafter model the plan prices (None without one: no speculation, or n-gram drafting)."""
        return PUBLISHED_DRAFTERS[self.variant] if self.speculative == "assistant" else None


@dataclass(frozen=True)
class Plan:
    """A replica layout and its memory, or why it does not fit and what would."""

    feasible: bool
    reason: str | None
    suggestions: list[str]
    accelerator: str
    gpus_per_replica: int
    tensor_parallel: int
    expert_parallel: int
    per_gpu: MemoryBreakdown
    weights_per_gpu: dict[str, int]
    kv_cache_bytes_per_gpu: int
    kv_blocks: dict[str, int]
    max_num_seqs_at_max_model_len: int
    host_memory_bytes: int
    spec: ServingSpec

    def to_dict(self) -> dict[str, Any]:
        out = {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}
        out["per_gpu"] = self.per_gpu.to_dict()
        out["spec"] = dataclasses.asdict(self.spec)
        out["suggestions"] = list(self.suggestions)
        return out


@dataclass(frozen=True)
class _Layout:
    gpus: int
    ep: int


@dataclass(frozen=True)
class _Evaluation:
    """One layout at one concurrency."""

    layout: _Layout
    fixed: _Fixed
    kv_needed: int
    kv_per_sequence: int

    @property
    def fits(self) -> bool:
        return self.kv_needed <= self.fixed.kv_budget


def _capacity(spec: ServingSpec, acc: Accelerator) -> int:
    fraction = spec.gpu_memory_utilization if spec.gpu_memory_utilization is not None else acc.usable_fraction
    return int(acc.memory_bytes * fraction)


def _evaluate(config: Gemma4Config, spec: ServingSpec, layout: _Layout, max_num_seqs: int) -> _Evaluation:
    acc = get_accelerator(spec.accelerator)
    fixed = _fixed_costs(
        config, weight_dtype=spec.weight_dtype, capacity_bytes=_capacity(spec, acc), max_num_seqs=max_num_seqs,
        max_num_batched_tokens=spec.max_num_batched_tokens, tensor_parallel=layout.gpus,
        expert_parallel=layout.ep, ple_on_device=spec.ple_on_device, modalities=spec.modalities,
        cuda_graphs=acc.captures_graphs, redundant_experts=spec.redundant_experts,
        encoder_cache_tokens=spec.encoder_cache_tokens, speculative_tokens=spec.speculative_tokens,
        drafter=spec.drafter,
    )
    groups = rank_cache_groups(config.text, layout.gpus)
    kv_width = _kv_bytes(spec.kv_dtype)
    per_seq = _kv_reservation_per_sequence(
        groups, kv_width=kv_width, block_size=spec.block_size,
        max_model_len=spec.max_model_len, max_num_batched_tokens=spec.max_num_batched_tokens,
    )
    null_blocks = sum(g.pool_bytes(0, spec.block_size, kv_width) for g in groups)  # one reserved block per pool
    return _Evaluation(layout, fixed, max_num_seqs * per_seq + null_blocks, per_seq)


def _layouts(config: Gemma4Config, spec: ServingSpec) -> list[_Layout]:
    """The spec's layout, or every per-node device count the model splits over, smallest first.

    EP defaults to the GPU count for the MoE variant (1 otherwise); auto layouts whose EP degree does not
    divide the spec's redundant experts are skipped.
    """
    moe = config.text.enable_moe_block
    if spec.expert_parallel not in (None, 1) and not moe:
        raise ValueError("expert_parallel applies to the MoE variant (26b-a4b) only")
    explicit = spec.gpus or spec.tensor_parallel
    counts = [explicit] if explicit is not None else get_accelerator(spec.accelerator).chips_per_node_options
    layouts = []
    for n in counts:
        layout = _Layout(n, spec.expert_parallel or (n if moe else 1))
        try:
            check_layout(config.text, layout.gpus, layout.ep, spec.redundant_experts)
        except ValueError:
            if explicit is not None:  # a layout the spec asks for and the model cannot take is a spec error
                raise
            continue
        layouts.append(layout)
    return layouts


def _max_seqs(config: Gemma4Config, spec: ServingSpec, layout: _Layout) -> int:
    """Largest concurrency at max_model_len that fits `layout` (activations grow with it, so search)."""
    first = _evaluate(config, spec, layout, 1)
    if not first.fits:
        return 0
    lo, hi = 1, max(1, first.fixed.kv_budget // first.kv_per_sequence)
    while lo < hi:
        mid = (lo + hi + 1) // 2
        if _evaluate(config, spec, layout, mid).fits:
            lo = mid
        else:
            hi = mid - 1
    return lo


def _fit(spec: ServingSpec) -> tuple[_Evaluation, bool]:
    """The chosen layout's evaluation and whether it fits (smallest fitting count, else the largest tried)."""
    config = variant_config(spec.variant)
    layouts = _layouts(config, spec)
    if not layouts:
        counts = get_accelerator(spec.accelerator).chips_per_node_options
        raise ValueError(f"{spec.variant} cannot be split over {', '.join(map(str, counts))} devices")
    evaluation = None
    for layout in layouts:
        evaluation = _evaluate(config, spec, layout, spec.max_num_seqs)
        if evaluation.fits:
            return evaluation, _fp8_ok(spec)
    assert evaluation is not None
    return evaluation, False


def _fp8_ok(spec: ServingSpec) -> bool:
    return spec.weight_dtype != "fp8" or get_accelerator(spec.accelerator).supports_fp8


def _gib(n: int) -> str:
    return f"{n / GiB:.2f} GiB"


def _reason(spec: ServingSpec, evaluation: _Evaluation, auto: bool) -> str:
    acc = get_accelerator(spec.accelerator)
    if not _fp8_ok(spec):
        return f"{acc.name} has no FP8 support; use int8, int4 or 16-bit weights"
    fixed, n = evaluation.fixed, evaluation.layout.gpus
    where = f"{n} x {acc.name}" + (" (the most per node)" if auto else "")
    weights = sum(fixed.weights.values())
    rest = "activations, " + ("the encoder cache, " if fixed.encoder_cache else "")
    rest += ("speculative decoding's buffers, " if fixed.speculative else "") + "graphs, runtime and headroom"
    if fixed.kv_budget <= 0:
        return (
            f"{spec.variant} with {spec.weight_dtype} weights does not fit on {where}: weights "
            f"({_gib(weights)}) plus {rest} "
            f"({_gib(fixed.capacity - fixed.kv_budget - weights)}) exceed the {_gib(fixed.capacity)} usable per GPU"
        )
    return (
        f"the KV cache for {spec.max_num_seqs} sequences x {spec.max_model_len} tokens needs "
        f"{_gib(evaluation.kv_needed)} per GPU on {where}, but only {_gib(fixed.kv_budget)} is left after "
        f"weights ({_gib(weights)}), {rest}"
    )


def _suggestions(spec: ServingSpec, evaluation: _Evaluation) -> list[str]:
    """Changes that make the spec fit, each checked with the same arithmetic."""
    acc = get_accelerator(spec.accelerator)
    config = variant_config(spec.variant)
    out: list[str] = []

    def fits(**changes: Any) -> _Evaluation | None:
        try:
            candidate = dataclasses.replace(spec, **changes)
        except ValueError:
            return None
        chosen, ok = _fit(candidate)
        return chosen if ok else None

    explicit = spec.gpus or spec.tensor_parallel
    if explicit is not None:
        more = fits(gpus=None, tensor_parallel=None, expert_parallel=None)
        if more is not None and more.layout.gpus > explicit:
            out.append(f"use {more.layout.gpus} x {acc.name} per replica (tensor parallel {more.layout.gpus})")
    current = WEIGHT_FORMATS[spec.weight_dtype]
    weight_options = [
        d for d in (("fp8",) if acc.supports_fp8 else ()) + ("int8", "int4")
        if WEIGHT_FORMATS[d].bytes_per_param < current.bytes_per_param or (not _fp8_ok(spec) and d != spec.weight_dtype)
    ]
    kv_options = ["fp8"] if spec.kv_dtype != "fp8" and acc.supports_fp8 else []

    def first_fit(options: list[dict[str, str]]) -> list[str]:
        for changes in options:
            smaller = fits(**changes)
            if smaller is not None:
                return [f"use {_describe(changes)}: fits on {smaller.layout.gpus} x {acc.name}"]
        return []

    # The smallest change first: a lighter weight format or an fp8 KV cache, and only if neither fits, both.
    dtypes = first_fit([{"weight_dtype": d} for d in weight_options]) + first_fit([{"kv_dtype": k} for k in kv_options])
    out += dtypes or first_fit([{"weight_dtype": d, "kv_dtype": k} for d in weight_options for k in kv_options])
    layout = {"gpus": evaluation.layout.gpus, "tensor_parallel": None, "expert_parallel": evaluation.layout.ep}
    if _fp8_ok(spec):
        seqs = _max_seqs(config, spec, evaluation.layout)
        if 0 < seqs < spec.max_num_seqs:
            out.append(f"lower max_num_seqs to {seqs} (fits on {evaluation.layout.gpus} x {acc.name})")
        length = longest_context(dataclasses.replace(spec, **layout))
        if length:
            out.append(f"lower max_model_len to {length} (fits on {evaluation.layout.gpus} x {acc.name})")
    for other in sorted(ACCELERATORS.values(), key=lambda a: a.memory_bytes):
        if other.vendor == acc.vendor and other.memory_bytes > acc.memory_bytes:
            bigger = fits(accelerator=other.name)
            if bigger is not None:
                out.append(f"use {other.name}: fits on {bigger.layout.gpus} x {other.name}")
                break
    return out


def _describe(changes: dict[str, str]) -> str:
    parts = [f"{changes['weight_dtype']} weights"] if "weight_dtype" in changes else []
    parts += [f"an {changes['kv_dtype']} KV cache"] if "kv_dtype" in changes else []
    return " and ".join(parts)


def longest_context(spec: ServingSpec) -> int:
    """The longest max_model_len (a multiple of 1024) below the requested one that fits `spec` (on its own
    layout when it gives one, else on the fewest devices that fit); 0 if none."""
    lo, hi = 0, (spec.max_model_len - 1) // 1024
    while lo < hi:
        mid = (lo + hi + 1) // 2
        if _fit(dataclasses.replace(spec, max_model_len=mid * 1024))[1]:
            lo = mid
        else:
            hi = mid - 1
    return lo * 1024


def _host_memory(config: Gemma4Config, spec: ServingSpec, gpus: int) -> int:
    """Pod memory: the replica process, and per GPU worker its runtime, the largest tensor it stages
    to the device (bf16 read + cast copy) and, unless on the device, its own copy of the PLE table."""
    mods = served_modalities(config, spec.modalities)
    loaded = _device_components(config, ple_on_device=spec.ple_on_device, modalities=mods)
    largest = max(t.numel for t in _tensors(config) if t.component in loaded) * 2
    ple_host = 0 if spec.ple_on_device else ple_table_bytes(config.text)
    return HOST_BASE_BYTES + gpus * (HOST_PER_WORKER_BYTES + STAGING_COPIES * largest + ple_host)


def plan(spec: ServingSpec) -> Plan:
    """Lay out one replica and account for its memory; see the module docstring for the assumptions."""
    config = variant_config(spec.variant)
    evaluation, feasible = _fit(spec)
    fixed, layout = evaluation.fixed, evaluation.layout
    auto = spec.gpus is None and spec.tensor_parallel is None
    groups = rank_cache_groups(config.text, layout.gpus)
    budget = max(0, fixed.kv_budget)
    return Plan(
        feasible=feasible,
        reason=None if feasible else _reason(spec, evaluation, auto and len(_layouts(config, spec)) > 1),
        suggestions=[] if feasible else _suggestions(spec, evaluation),
        accelerator=spec.accelerator,
        gpus_per_replica=layout.gpus,
        tensor_parallel=layout.gpus,
        expert_parallel=layout.ep,
        per_gpu=MemoryBreakdown(
            weights=sum(fixed.weights.values()),
            kv_cache=evaluation.kv_needed,
            activations=fixed.activations,
            encoder_cache=fixed.encoder_cache,
            cuda_graphs=fixed.cuda_graphs,
            runtime_overhead=fixed.runtime_overhead,
            headroom=fixed.headroom,
            capacity=fixed.capacity,
            speculative=fixed.speculative,
        ),
        weights_per_gpu=fixed.weights,
        kv_cache_bytes_per_gpu=budget,
        kv_blocks=split_kv_budget(
            groups, budget, block_size=spec.block_size, kv_dtype_bytes=_kv_bytes(spec.kv_dtype),
            max_num_seqs=spec.max_num_seqs, max_model_len=spec.max_model_len,
            max_num_batched_tokens=spec.max_num_batched_tokens,
        ),
        max_num_seqs_at_max_model_len=_max_seqs(config, spec, layout) if _fp8_ok(spec) else 0,
        host_memory_bytes=_host_memory(config, spec, layout.gpus),
        spec=spec,
    )


def max_num_seqs(spec: ServingSpec) -> int:
    """The most sequences of max_model_len tokens that fit, on the layout `plan(spec)` chooses."""
    return plan(spec).max_num_seqs_at_max_model_len


def min_gpus(spec: ServingSpec) -> int | None:
    """The fewest devices per replica (from the accelerator's per-node counts) that fit; None if none do."""
    evaluation, ok = _fit(dataclasses.replace(spec, gpus=None, tensor_parallel=None))
    return evaluation.layout.gpus if ok else None
