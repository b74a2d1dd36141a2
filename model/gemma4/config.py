"""Gemma 4 architecture configuration: the released variants, and reading a checkpoint's `config.json`.

Pure Python on purpose (no torch): the operator and the memory model import this module on images
that do not carry torch. Everything the model, the KV cache and the memory model need to know about
a layer is derived here once (`Gemma4TextConfig.layers`), so no other module re-derives geometry.

`config.json` comes in two forms, both read by `load_config`: the multimodal form written for the
official checkpoints (`model_type: gemma4`, with `text_config`, `vision_config`, `audio_config`) and
the text-only form (`model_type: gemma4_text`). Global-layer geometry is given either as
`global_head_dim` / `num_global_key_value_heads` (the converter's form) or as the sparse
`per_layer_config` map that transformers 5.x writes back; both are understood.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field, fields
from functools import cached_property
from pathlib import Path
from typing import Any, Mapping

SLIDING = "sliding_attention"
FULL = "full_attention"
LAYER_TYPES = (SLIDING, FULL)

TEXT_MODEL_TYPE = "gemma4_text"
MULTIMODAL_MODEL_TYPE = "gemma4"
CAUSAL_LM_ARCHITECTURE = "Gemma4ForCausalLM"
CONDITIONAL_GENERATION_ARCHITECTURE = "Gemma4ForConditionalGeneration"

SUPPORTED_ACTIVATIONS = ("gelu_pytorch_tanh",)
SUPPORTED_ROPE_TYPES = ("default", "proportional")


class ConfigError(ValueError):
    """A configuration that is malformed or describes something this implementation cannot run."""


@dataclass(frozen=True)
class RopeConfig:
    """Rotary embedding of one layer type.

    `partial_rotary_factor` < 1 means "proportional" RoPE: only the first `factor * head_dim / 2`
    frequency pairs rotate, with exponents over the full head dim; the rest are identity.
    """

    theta: float
    rope_type: str = "default"
    partial_rotary_factor: float = 1.0
    factor: float = 1.0

    def __post_init__(self) -> None:
        if self.rope_type not in SUPPORTED_ROPE_TYPES:
            raise ConfigError(
                f"rope_type {self.rope_type!r} is not supported (supported: {', '.join(SUPPORTED_ROPE_TYPES)})"
            )
        if self.theta <= 0:
            raise ConfigError(f"rope_theta must be > 0, got {self.theta}")
        if not 0.0 < self.partial_rotary_factor <= 1.0:
            raise ConfigError(f"partial_rotary_factor must be in (0, 1], got {self.partial_rotary_factor}")
        if self.factor <= 0:
            raise ConfigError(f"rope factor must be > 0, got {self.factor}")

    def rotated_pairs(self, head_dim: int) -> int:
        """Number of frequency pairs that rotate for a head of `head_dim` (the rest are identity)."""
        if self.rope_type == "default":
            return head_dim // 2
        return int(self.partial_rotary_factor * head_dim // 2)

    def to_hf(self) -> dict[str, Any]:
        out: dict[str, Any] = {"rope_type": self.rope_type, "rope_theta": self.theta}
        if self.rope_type == "proportional":
            out["partial_rotary_factor"] = self.partial_rotary_factor
        if self.factor != 1.0:
            out["factor"] = self.factor
        return out


@dataclass(frozen=True)
class LayerSpec:
    """Geometry of one decoder layer, derived from the config.

    `kv_source` is the layer whose keys/values this layer attends to: itself, or for the KV-sharing
    tail of E2B/E4B the last non-shared layer of the same attention type.
    """

    index: int
    attention_type: str
    head_dim: int
    num_kv_heads: int
    k_eq_v: bool
    kv_source: int
    intermediate_size: int
    sliding_window: int | None
    # The layer reads another model's keys/values (an assistant drafter reading its target's), whatever
    # `kv_source` is: the drafter's own index may equal its target producer's.
    reads_other_model: bool = False

    @property
    def is_sliding(self) -> bool:
        return self.attention_type == SLIDING

    @property
    def shares_kv(self) -> bool:
        """True for layers that compute no keys/values of their own."""
        return self.reads_other_model or self.kv_source != self.index


@dataclass(frozen=True)
class Gemma4TextConfig:
    """The text decoder's architecture (the fields of transformers' `Gemma4TextConfig` we use).

    `num_global_key_value_heads` is the effective KV-head count of full-attention layers, or None
    when they use `num_key_value_heads` like sliding layers.
    """

    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    head_dim: int
    global_head_dim: int
    layer_types: tuple[str, ...]
    sliding_window: int
    num_global_key_value_heads: int | None = None
    attention_k_eq_v: bool = False
    num_kv_shared_layers: int = 0
    hidden_size_per_layer_input: int = 0
    vocab_size_per_layer_input: int = 262_144
    use_double_wide_mlp: bool = False
    enable_moe_block: bool = False
    num_experts: int | None = None
    top_k_experts: int | None = None
    moe_intermediate_size: int | None = None
    sliding_rope: RopeConfig = field(default_factory=lambda: RopeConfig(theta=10_000.0))
    full_rope: RopeConfig = field(
        default_factory=lambda: RopeConfig(theta=1_000_000.0, rope_type="proportional", partial_rotary_factor=0.25)
    )
    max_position_embeddings: int = 131_072
    final_logit_softcapping: float | None = 30.0
    rms_norm_eps: float = 1e-6
    hidden_activation: str = "gelu_pytorch_tanh"
    tie_word_embeddings: bool = True
    use_bidirectional_attention: str | None = None
    pad_token_id: int = 0
    bos_token_id: int = 2
    eos_token_ids: tuple[int, ...] = (1,)

    def __post_init__(self) -> None:
        object.__setattr__(self, "layer_types", tuple(self.layer_types))
        object.__setattr__(self, "eos_token_ids", tuple(self.eos_token_ids))
        self._validate()

    # ------------------------------------------------------------------ validation
    def _validate(self) -> None:
        for name in (
            "vocab_size",
            "hidden_size",
            "intermediate_size",
            "num_hidden_layers",
            "num_attention_heads",
            "num_key_value_heads",
            "head_dim",
            "global_head_dim",
            "sliding_window",
            "max_position_embeddings",
        ):
            _require_positive_int(name, getattr(self, name))
        if len(self.layer_types) != self.num_hidden_layers:
            raise ConfigError(
                f"layer_types has {len(self.layer_types)} entries but num_hidden_layers is {self.num_hidden_layers}"
            )
        for i, kind in enumerate(self.layer_types):
            if kind not in LAYER_TYPES:
                raise ConfigError(f"layer_types[{i}] is {kind!r}; expected one of {', '.join(LAYER_TYPES)}")
        if self.layer_types[-1] != FULL:
            raise ConfigError("the last entry of layer_types must be 'full_attention' (Gemma 4 ends on a global layer)")
        for kind, heads in ((SLIDING, self.num_key_value_heads), (FULL, self.global_kv_heads)):
            _require_positive_int(f"key/value heads of {kind} layers", heads)
            if self.num_attention_heads % heads:
                raise ConfigError(
                    f"num_attention_heads ({self.num_attention_heads}) must be a multiple of the "
                    f"key/value heads of {kind} layers ({heads})"
                )
        for kind, head_dim in ((SLIDING, self.head_dim), (FULL, self.global_head_dim)):
            if head_dim % 2:
                raise ConfigError(f"the head dim of {kind} layers must be even for RoPE, got {head_dim}")
        if not 0 <= self.num_kv_shared_layers < self.num_hidden_layers:
            raise ConfigError(
                f"num_kv_shared_layers must be in [0, num_hidden_layers={self.num_hidden_layers}), "
                f"got {self.num_kv_shared_layers}"
            )
        if self.num_kv_shared_layers:
            producers = set(self.layer_types[: self.first_kv_shared_layer])
            consumers = set(self.layer_types[self.first_kv_shared_layer :])
            if not consumers <= producers:
                missing = ", ".join(sorted(consumers - producers))
                raise ConfigError(f"KV-shared layers of type {missing} have no earlier layer of that type to read from")
        if self.hidden_size_per_layer_input < 0:
            raise ConfigError(f"hidden_size_per_layer_input must be >= 0, got {self.hidden_size_per_layer_input}")
        if self.hidden_size_per_layer_input:
            _require_positive_int("vocab_size_per_layer_input", self.vocab_size_per_layer_input)
        if self.enable_moe_block:
            _require_positive_int("num_experts", self.num_experts)
            _require_positive_int("top_k_experts", self.top_k_experts)
            _require_positive_int("moe_intermediate_size", self.moe_intermediate_size)
            assert self.num_experts is not None and self.top_k_experts is not None
            if self.top_k_experts > self.num_experts:
                raise ConfigError(
                    f"top_k_experts ({self.top_k_experts}) cannot exceed num_experts ({self.num_experts})"
                )
        if self.hidden_activation not in SUPPORTED_ACTIVATIONS:
            raise ConfigError(
                f"hidden_activation {self.hidden_activation!r} is not supported "
                f"(supported: {', '.join(SUPPORTED_ACTIVATIONS)})"
            )
        if self.final_logit_softcapping is not None and self.final_logit_softcapping <= 0:
            raise ConfigError(f"final_logit_softcapping must be > 0 or null, got {self.final_logit_softcapping}")
        if self.rms_norm_eps <= 0:
            raise ConfigError(f"rms_norm_eps must be > 0, got {self.rms_norm_eps}")
        if self.use_bidirectional_attention not in (None, "vision"):
            raise ConfigError(
                f"use_bidirectional_attention={self.use_bidirectional_attention!r} is not supported "
                "(generative Gemma 4 uses null or 'vision')"
            )
        ids = {"pad_token_id": self.pad_token_id, "bos_token_id": self.bos_token_id}
        ids.update({f"eos_token_id[{i}]": eos for i, eos in enumerate(self.eos_token_ids)})
        for name, value in ids.items():
            if not isinstance(value, int) or not 0 <= value < self.vocab_size:
                raise ConfigError(f"{name} must be a token id in [0, {self.vocab_size}), got {value!r}")

    # ------------------------------------------------------------------ derived geometry
    @property
    def global_kv_heads(self) -> int:
        """Key/value heads of full-attention layers."""
        return self.num_global_key_value_heads or self.num_key_value_heads

    @property
    def first_kv_shared_layer(self) -> int:
        return self.num_hidden_layers - self.num_kv_shared_layers

    @property
    def embed_scale(self) -> float:
        """The input-embedding multiplier before rounding to the weight dtype (the model rounds it)."""
        return math.sqrt(self.hidden_size)

    @cached_property
    def layers(self) -> tuple[LayerSpec, ...]:
        """Per-layer geometry: head size, KV heads, K-as-V, KV source, MLP width, window."""
        first_shared = self.first_kv_shared_layer
        last_producer = {kind: i for i, kind in enumerate(self.layer_types[:first_shared])}
        specs = []
        for i, kind in enumerate(self.layer_types):
            full = kind == FULL
            shared = i >= first_shared
            specs.append(
                LayerSpec(
                    index=i,
                    attention_type=kind,
                    head_dim=self.global_head_dim if full else self.head_dim,
                    num_kv_heads=self.global_kv_heads if full else self.num_key_value_heads,
                    k_eq_v=self.attention_k_eq_v and full,
                    kv_source=last_producer[kind] if shared else i,
                    intermediate_size=self.intermediate_size * (2 if self.use_double_wide_mlp and shared else 1),
                    sliding_window=None if full else self.sliding_window,
                )
            )
        return tuple(specs)

    def rope(self, attention_type: str) -> RopeConfig:
        return self.full_rope if attention_type == FULL else self.sliding_rope

    @property
    def family(self) -> str:
        """The released variant this architecture is shaped like: 'e2b', 'e4b', '26b-a4b' or '31b'.

        Used where behaviour follows the variant rather than a single field, e.g. which built-in
        chat-template flavour applies to a checkpoint that ships no template.
        """
        if self.enable_moe_block:
            return "26b-a4b"
        if self.hidden_size_per_layer_input:
            return "e2b" if self.use_double_wide_mlp else "e4b"
        return "31b"

    # ------------------------------------------------------------------ (de)serialisation
    @classmethod
    def from_hf_dict(cls, raw: Mapping[str, Any], *, source: str = "config") -> "Gemma4TextConfig":
        """Build from a transformers-style text config dict; missing keys take transformers' defaults."""
        d = dict(raw)
        model_type = d.get("model_type", TEXT_MODEL_TYPE)
        if model_type != TEXT_MODEL_TYPE:
            raise ConfigError(f"{source}: text config has model_type {model_type!r}, expected {TEXT_MODEL_TYPE!r}")
        if d.get("attention_bias"):
            raise ConfigError(f"{source}: attention_bias=true is not supported (Gemma 4 has no attention bias)")
        num_layers = _get(d, "num_hidden_layers", 30, int, source)
        layer_types = d.get("layer_types")
        if layer_types is None:  # transformers' default: five sliding layers to one full layer
            layer_types = [SLIDING if (i + 1) % 6 else FULL for i in range(num_layers)]
        if not isinstance(layer_types, (list, tuple)):
            raise ConfigError(f"{source}: layer_types must be a list, got {type(layer_types).__name__}")
        k_eq_v = _get(d, "attention_k_eq_v", False, bool, source)
        global_head_dim, global_kv_heads = _global_geometry(d, layer_types, k_eq_v, source)
        rope = d.get("rope_parameters") or {}
        eos = d.get("eos_token_id", 1)
        try:
            return cls(
                vocab_size=_get(d, "vocab_size", 262_144, int, source),
                hidden_size=_get(d, "hidden_size", 2304, int, source),
                intermediate_size=_get(d, "intermediate_size", 9216, int, source),
                num_hidden_layers=num_layers,
                num_attention_heads=_get(d, "num_attention_heads", 8, int, source),
                num_key_value_heads=_get(d, "num_key_value_heads", 4, int, source),
                head_dim=_get(d, "head_dim", 256, int, source),
                global_head_dim=global_head_dim,
                num_global_key_value_heads=global_kv_heads,
                layer_types=tuple(layer_types),
                sliding_window=_get(d, "sliding_window", 512, int, source),
                attention_k_eq_v=k_eq_v,
                num_kv_shared_layers=_get(d, "num_kv_shared_layers", 0, int, source),
                hidden_size_per_layer_input=_get(d, "hidden_size_per_layer_input", 256, int, source),
                vocab_size_per_layer_input=_get(d, "vocab_size_per_layer_input", 262_144, int, source),
                use_double_wide_mlp=_get(d, "use_double_wide_mlp", False, bool, source),
                enable_moe_block=_get(d, "enable_moe_block", False, bool, source),
                num_experts=_get(d, "num_experts", None, int, source),
                top_k_experts=_get(d, "top_k_experts", None, int, source),
                moe_intermediate_size=_get(d, "moe_intermediate_size", None, int, source),
                sliding_rope=_rope(rope, SLIDING, RopeConfig(theta=10_000.0), source),
                full_rope=_rope(
                    rope, FULL, RopeConfig(theta=1_000_000.0, rope_type="proportional", partial_rotary_factor=0.25), source
                ),
                max_position_embeddings=_get(d, "max_position_embeddings", 131_072, int, source),
                final_logit_softcapping=_get(d, "final_logit_softcapping", None, float, source),
                rms_norm_eps=_get(d, "rms_norm_eps", 1e-6, float, source),
                hidden_activation=_get(d, "hidden_activation", "gelu_pytorch_tanh", str, source),
                tie_word_embeddings=_get(d, "tie_word_embeddings", True, bool, source),
                use_bidirectional_attention=d.get("use_bidirectional_attention"),
                pad_token_id=_get(d, "pad_token_id", 0, int, source),
                bos_token_id=_get(d, "bos_token_id", 2, int, source),
                eos_token_ids=tuple(eos) if isinstance(eos, (list, tuple)) else (eos,),
            )
        except ConfigError as exc:
            raise ConfigError(f"{source}: {exc}") from None

    def to_hf_dict(self) -> dict[str, Any]:
        """The converter's form of a `gemma4_text` config (what the official `config.json` carries)."""
        out: dict[str, Any] = {"model_type": TEXT_MODEL_TYPE}
        for f in fields(self):
            value = getattr(self, f.name)
            if f.name in ("sliding_rope", "full_rope", "eos_token_ids"):
                continue
            out[f.name] = list(value) if isinstance(value, tuple) else value
        out["rope_parameters"] = {SLIDING: self.sliding_rope.to_hf(), FULL: self.full_rope.to_hf()}
        out["eos_token_id"] = list(self.eos_token_ids) if len(self.eos_token_ids) > 1 else self.eos_token_ids[0]
        return out


@dataclass(frozen=True)
class Gemma4VisionConfig:
    """The vision tower's size (the fields the memory model and later the vision encoder need)."""

    hidden_size: int = 768
    intermediate_size: int = 3072
    num_hidden_layers: int = 16
    num_attention_heads: int = 12
    num_key_value_heads: int = 12
    head_dim: int = 64
    patch_size: int = 16
    pooling_kernel_size: int = 3
    position_embedding_size: int = 10_240
    use_clipped_linears: bool = False
    standardize: bool = False
    default_output_length: int = 280
    rms_norm_eps: float = 1e-6
    rope_theta: float = 100.0
    hidden_activation: str = "gelu_pytorch_tanh"

    def __post_init__(self) -> None:
        if self.hidden_activation not in SUPPORTED_ACTIVATIONS:
            raise ConfigError(
                f"vision hidden_activation {self.hidden_activation!r} is not supported "
                f"(supported: {', '.join(SUPPORTED_ACTIVATIONS)})"
            )
        if self.rope_theta <= 0:
            raise ConfigError(f"vision rope_theta must be > 0, got {self.rope_theta}")
        if self.head_dim % 4:
            raise ConfigError(f"vision head_dim must be a multiple of 4 for 2-D RoPE, got {self.head_dim}")

    @classmethod
    def from_hf_dict(cls, raw: Mapping[str, Any], *, source: str) -> "Gemma4VisionConfig":
        """Known fields of a `gemma4_vision` config; the RoPE base comes from `rope_parameters` (axial only)."""
        rope = raw.get("rope_parameters") or {}
        if not isinstance(rope, Mapping):
            raise ConfigError(f"{source}: rope_parameters must be an object")
        if rope.get("rope_type", "axial") != "axial":
            raise ConfigError(f"{source}: the vision tower supports only axial RoPE, got {rope.get('rope_type')!r}")
        fields_only = {k: v for k, v in raw.items() if k != "rope_theta"}
        if "rope_theta" in rope:
            fields_only["rope_theta"] = _get(rope, "rope_theta", 100.0, float, source)
        try:
            return _known_fields(cls, fields_only)
        except ConfigError as exc:
            raise ConfigError(f"{source}: {exc}") from None

    def to_hf_dict(self) -> dict[str, Any]:
        """What transformers' `Gemma4VisionConfig` accepts (`default_output_length` is ours only)."""
        out: dict[str, Any] = {"model_type": "gemma4_vision"}
        for f in fields(self):
            if f.name not in ("rope_theta", "default_output_length"):
                out[f.name] = getattr(self, f.name)
        out["rope_parameters"] = {"rope_type": "axial", "rope_theta": self.rope_theta}
        return out


@dataclass(frozen=True)
class Gemma4AudioConfig:
    """The audio tower (E2B/E4B only): size, and the conformer's constants under transformers' field names.

    Attention is local: each frame sees itself and the `attention_context_left - 1` frames before it
    (`attention_context_right` after), processed in chunks of `attention_chunk_size` queries.
    `gradient_clipping` is the bound of the tower's activation clamps (bounded again by the dtype's max).
    """

    hidden_size: int = 1024
    num_hidden_layers: int = 12
    num_attention_heads: int = 8
    hidden_act: str = "silu"
    conv_kernel_size: int = 5
    subsampling_conv_channels: tuple[int, ...] = (128, 32)
    residual_weight: float = 0.5
    attention_chunk_size: int = 12
    attention_context_left: int = 13
    attention_context_right: int = 0
    attention_logit_cap: float = 50.0
    attention_invalid_logits_value: float = -1.0e9
    gradient_clipping: float = 1e10
    output_proj_dims: int = 1536
    use_clipped_linears: bool = True
    rms_norm_eps: float = 1e-6

    @classmethod
    def from_hf_dict(cls, raw: Mapping[str, Any], *, source: str) -> "Gemma4AudioConfig":
        return _known_fields(cls, raw)

    def to_hf_dict(self) -> dict[str, Any]:
        """The fields as transformers' `Gemma4AudioConfig` takes them (tuples as lists)."""
        out: dict[str, Any] = {"model_type": "gemma4_audio"}
        for f in fields(self):
            value = getattr(self, f.name)
            out[f.name] = list(value) if isinstance(value, tuple) else value
        return out


@dataclass(frozen=True)
class Gemma4Config:
    """A whole checkpoint's configuration: the text decoder plus the optional vision/audio towers.

    `architecture` records the checkpoint layout: `Gemma4ForConditionalGeneration` stores the text
    decoder under `model.language_model.`, `Gemma4ForCausalLM` under `model.`.
    """

    text: Gemma4TextConfig
    vision: Gemma4VisionConfig | None = None
    audio: Gemma4AudioConfig | None = None
    architecture: str = CONDITIONAL_GENERATION_ARCHITECTURE
    image_token_id: int | None = 258_880
    audio_token_id: int | None = 258_881
    video_token_id: int | None = 258_884
    boi_token_id: int | None = 255_999
    eoi_token_id: int | None = 258_882
    boa_token_id: int | None = 256_000
    eoa_token_id: int | None = 258_883
    eos_token_ids: tuple[int, ...] = (1, 106)

    @property
    def family(self) -> str:
        return self.text.family

    @property
    def modalities(self) -> tuple[str, ...]:
        out = ["text"]
        if self.vision is not None:
            out += ["image", "video"]
        if self.audio is not None:
            out.append("audio")
        return tuple(out)

    @property
    def multimodal_placeholder_ids(self) -> tuple[int, ...]:
        """Ids the text decoder embeds as `<pad>` (soft tokens are scattered into those slots)."""
        if self.architecture == CAUSAL_LM_ARCHITECTURE:
            return ()
        ids = (self.image_token_id, self.video_token_id, self.audio_token_id)
        return tuple(i for i in ids if i is not None)

    @classmethod
    def from_hf_dict(cls, raw: Mapping[str, Any], *, source: str = "config.json") -> "Gemma4Config":
        if not isinstance(raw, Mapping):
            raise ConfigError(f"{source}: expected a JSON object, got {type(raw).__name__}")
        model_type = raw.get("model_type")
        if model_type == TEXT_MODEL_TYPE:
            text = Gemma4TextConfig.from_hf_dict(raw, source=source)
            return cls(text=text, vision=None, audio=None, architecture=CAUSAL_LM_ARCHITECTURE,
                       eos_token_ids=text.eos_token_ids)
        if model_type != MULTIMODAL_MODEL_TYPE:
            raise ConfigError(
                f"{source}: unknown model_type {model_type!r}; expected {MULTIMODAL_MODEL_TYPE!r} "
                f"or {TEXT_MODEL_TYPE!r} (a Gemma 4 checkpoint)"
            )
        text_raw = raw.get("text_config")
        if not isinstance(text_raw, Mapping):
            raise ConfigError(f"{source}: a {MULTIMODAL_MODEL_TYPE!r} config needs a 'text_config' object")
        text = Gemma4TextConfig.from_hf_dict(text_raw, source=f"{source}: text_config")
        eos = raw.get("eos_token_id", list(text.eos_token_ids))
        ids = {name: raw.get(key, getattr(cls, name)) for name, key in MEDIA_TOKEN_KEYS}
        return cls(
            text=text,
            vision=_tower(Gemma4VisionConfig, raw.get("vision_config"), f"{source}: vision_config"),
            audio=_tower(Gemma4AudioConfig, raw.get("audio_config"), f"{source}: audio_config"),
            architecture=CONDITIONAL_GENERATION_ARCHITECTURE,
            eos_token_ids=tuple(eos) if isinstance(eos, (list, tuple)) else (eos,),
            **ids,
        )


# Gemma4Config's media token id fields and the config.json keys transformers writes them under.
MEDIA_TOKEN_KEYS: tuple[tuple[str, str], ...] = (
    ("image_token_id", "image_token_id"),
    ("audio_token_id", "audio_token_id"),
    ("video_token_id", "video_token_id"),
    ("boi_token_id", "boi_token_id"),
    ("eoi_token_id", "eoi_token_id"),
    ("boa_token_id", "boa_token_id"),
    ("eoa_token_id", "eoa_token_index"),
)


# ---------------------------------------------------------------------------- helpers
def _require_positive_int(name: str, value: Any) -> None:
    if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
        raise ConfigError(f"{name} must be a positive integer, got {value!r}")


_JSON_TYPES: dict[type, tuple[type, ...]] = {int: (int,), float: (int, float), bool: (bool,), str: (str,)}


def _get(d: Mapping[str, Any], key: str, default: Any, kind: type, source: str) -> Any:
    """Read `key`, allowing null where the default is null, and type-check it with a clear message."""
    value = d.get(key, default)
    if value is None and default is None:
        return None
    ok = isinstance(value, _JSON_TYPES[kind]) and not (kind in (int, float) and isinstance(value, bool))
    if not ok:
        raise ConfigError(f"{source}: {key} must be {kind.__name__}, got {value!r}")
    return kind(value)


def _global_geometry(
    d: Mapping[str, Any], layer_types: list[str], k_eq_v: bool, source: str
) -> tuple[int, int | None]:
    """Head dim and KV heads of full-attention layers, from either config form."""
    per_layer = d.get("per_layer_config")
    if per_layer is None:
        head_dim = _get(d, "global_head_dim", 512, int, source)
        kv_heads = _get(d, "num_global_key_value_heads", None, int, source)
        # transformers applies the global KV-head override only to K-as-V models.
        return head_dim, kv_heads if k_eq_v else None
    if not isinstance(per_layer, Mapping):
        raise ConfigError(f"{source}: per_layer_config must be an object keyed by layer index")
    try:  # keys are layer indices, written as (zero-padded) strings
        overrides = {int(key): value for key, value in per_layer.items()}
    except ValueError:
        raise ConfigError(f"{source}: per_layer_config keys must be layer indices, got {list(per_layer)}") from None
    head_dims: set[int] = set()
    kv_heads_seen: set[int | None] = set()
    for i, kind in enumerate(layer_types):
        entry = overrides.get(i)
        if kind != FULL:
            if entry:
                raise ConfigError(f"{source}: per_layer_config overrides sliding layer {i}, which is not supported")
            continue
        if not isinstance(entry, Mapping) or "head_dim" not in entry:
            raise ConfigError(f"{source}: per_layer_config has no head_dim for full-attention layer {i}")
        head_dims.add(entry["head_dim"])
        kv_heads_seen.add(entry.get("num_key_value_heads"))
    if len(head_dims) > 1 or len(kv_heads_seen) > 1:
        raise ConfigError(f"{source}: per_layer_config gives full-attention layers different geometries")
    head_dim = head_dims.pop() if head_dims else _get(d, "global_head_dim", 512, int, source)
    kv_heads = kv_heads_seen.pop() if kv_heads_seen else None
    return head_dim, kv_heads


def _rope(rope: Mapping[str, Any], layer_type: str, default: RopeConfig, source: str) -> RopeConfig:
    params = rope.get(layer_type)
    if params is None:
        return default
    if not isinstance(params, Mapping):
        raise ConfigError(f"{source}: rope_parameters.{layer_type} must be an object")
    try:
        return RopeConfig(
            theta=float(params.get("rope_theta", default.theta)),
            rope_type=params.get("rope_type", default.rope_type),
            partial_rotary_factor=float(params.get("partial_rotary_factor", 1.0)),
            factor=float(params.get("factor", 1.0)),
        )
    except ConfigError as exc:
        raise ConfigError(f"{source}: rope_parameters.{layer_type}: {exc}") from None


def _tower(cls: type, raw: Any, source: str) -> Any:
    """Read an optional tower config (`cls.from_hf_dict`); null means no tower."""
    if raw is None:
        return None
    if not isinstance(raw, Mapping):
        raise ConfigError(f"{source}: expected an object or null")
    return cls.from_hf_dict(raw, source=source)


def _known_fields(cls: type, raw: Mapping[str, Any]) -> Any:
    """`cls` from the keys of `raw` that name its fields (lists become tuples); the rest is ignored."""
    known = {f.name for f in fields(cls)}
    return cls(**{k: tuple(v) if isinstance(v, list) else v for k, v in raw.items() if k in known})


# ---------------------------------------------------------------------------- released variants
def _pattern(sliding_per_full: int, repeats: int) -> tuple[str, ...]:
    return ((SLIDING,) * sliding_per_full + (FULL,)) * repeats


_SMALL_VISION = Gemma4VisionConfig(use_clipped_linears=True)
_LARGE_VISION = Gemma4VisionConfig(
    hidden_size=1152, intermediate_size=4304, num_hidden_layers=27, num_attention_heads=16,
    num_key_value_heads=16, head_dim=72, standardize=True,
)

# Drafts per step with speculative decoding, per variant (`Gemma4TextConfig.family`): the vLLM Gemma 4
# recipe's values for the assistant drafters.
DEFAULT_SPECULATIVE_TOKENS: dict[str, int] = {"e2b": 2, "e4b": 4, "26b-a4b": 4, "31b": 6}

VARIANTS: dict[str, Gemma4Config] = {
    "e2b": Gemma4Config(
        text=Gemma4TextConfig(
            vocab_size=262_144, hidden_size=1536, intermediate_size=6144, num_hidden_layers=35,
            num_attention_heads=8, num_key_value_heads=1, head_dim=256, global_head_dim=512,
            layer_types=_pattern(4, 7), sliding_window=512, num_kv_shared_layers=20,
            hidden_size_per_layer_input=256, use_double_wide_mlp=True,
        ),
        vision=_SMALL_VISION,
        audio=Gemma4AudioConfig(),
    ),
    "e4b": Gemma4Config(
        text=Gemma4TextConfig(
            vocab_size=262_144, hidden_size=2560, intermediate_size=10240, num_hidden_layers=42,
            num_attention_heads=8, num_key_value_heads=2, head_dim=256, global_head_dim=512,
            layer_types=_pattern(5, 7), sliding_window=512, num_kv_shared_layers=18,
            hidden_size_per_layer_input=256,
        ),
        vision=_SMALL_VISION,
        audio=Gemma4AudioConfig(),
    ),
    "26b-a4b": Gemma4Config(
        text=Gemma4TextConfig(
            vocab_size=262_144, hidden_size=2816, intermediate_size=2112, num_hidden_layers=30,
            num_attention_heads=16, num_key_value_heads=8, num_global_key_value_heads=2, head_dim=256,
            global_head_dim=512, attention_k_eq_v=True, layer_types=_pattern(5, 5), sliding_window=1024,
            hidden_size_per_layer_input=0, enable_moe_block=True, num_experts=128, top_k_experts=8,
            moe_intermediate_size=704, max_position_embeddings=262_144, use_bidirectional_attention="vision",
        ),
        vision=_LARGE_VISION,
    ),
    "31b": Gemma4Config(
        text=Gemma4TextConfig(
            vocab_size=262_144, hidden_size=5376, intermediate_size=21504, num_hidden_layers=60,
            num_attention_heads=32, num_key_value_heads=16, num_global_key_value_heads=4, head_dim=256,
            global_head_dim=512, attention_k_eq_v=True, layer_types=_pattern(5, 10), sliding_window=1024,
            hidden_size_per_layer_input=0, max_position_embeddings=262_144, use_bidirectional_attention="vision",
        ),
        vision=_LARGE_VISION,
    ),
}

_VARIANT_ALIASES = {"2b": "e2b", "4b": "e4b", "26b": "26b-a4b", "26b_a4b": "26b-a4b", "26ba4b": "26b-a4b"}


def variant_config(name: str) -> Gemma4Config:
    """The configuration of a released variant by name ('e2b', 'e4b', '26b-a4b', '31b', any case)."""
    key = name.strip().lower().removeprefix("gemma-4-").removeprefix("gemma4-").removesuffix("-it")
    key = _VARIANT_ALIASES.get(key, key)
    try:
        return VARIANTS[key]
    except KeyError:
        raise ConfigError(f"unknown Gemma 4 variant {name!r}; known: {', '.join(VARIANTS)}") from None


def load_config(path: str | Path) -> Gemma4Config:
    """Read `config.json` from a checkpoint directory (or the file itself)."""
    path = Path(path)
    file = path / "config.json" if path.is_dir() else path
    try:
        text = file.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise ConfigError(f"{file}: no config.json (is this a Gemma 4 checkpoint directory?)") from None
    try:
        raw = json.loads(text)
    except json.JSONDecodeError as exc:
        raise ConfigError(f"{file}: not valid JSON ({exc})") from None
    return Gemma4Config.from_hf_dict(raw, source=str(file))
