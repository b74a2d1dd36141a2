"""The configuration of Gemma 4's assistant drafter (`gemma4_assistant`), read from its `config.json`.

Pure Python (no torch), like `gemma4.config`: the memory model counts the drafter's weights from it.
The drafter's text model is a `gemma4_text` stack whose layers all read the TARGET's keys/values
(transformers' `Gemma4AssistantConfig.validate_architecture`: no PLE, no MoE, no double-wide MLP,
every layer KV-shared). A sliding layer reads the target's last producer sliding layer, a full layer
its last producer full layer; `layers_for(target)` derives those `LayerSpec`s.

Its sliding layers see `sliding_window + 1` keys (the last ones before the drafted position):
transformers builds that mask as a bidirectional window of inclusive distance `<= sliding_window`
from key 0, then flips it, while the target's own sliding layers see `sliding_window` keys.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Callable, Mapping

from gemma4.config import ConfigError, Gemma4TextConfig, LayerSpec, _get

ASSISTANT_MODEL_TYPE = "gemma4_assistant"
ASSISTANT_ARCHITECTURE = "Gemma4AssistantForCausalLM"


@dataclass(frozen=True)
class Gemma4AssistantConfig:
    """The drafter: its text stack (`text`, read with no KV sharing of its own: its layers' KV sources
    are in the target, see `layers_for`), the target hidden size it was trained with, and the optional
    masked embedder (`use_ordered_embeddings`: `num_centroids` clusters of the vocabulary, the
    `centroid_intermediate_top_k` best scored). transformers ties the head by the top-level
    `tie_word_embeddings`, not the text config's."""

    text: Gemma4TextConfig
    backbone_hidden_size: int
    use_ordered_embeddings: bool = False
    num_centroids: int = 2048
    centroid_intermediate_top_k: int = 32
    tie_word_embeddings: bool = True  # the head is `model.embed_tokens` (else its own `lm_head`)

    def __post_init__(self) -> None:
        for name in ("backbone_hidden_size", "num_centroids", "centroid_intermediate_top_k"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
                raise ConfigError(f"{name} must be a positive integer, got {value!r}")
        t = self.text
        _check_required(lambda name, default: getattr(t, name))
        if self.use_ordered_embeddings:
            if t.vocab_size % self.num_centroids:
                raise ConfigError(
                    f"num_centroids ({self.num_centroids}) must divide vocab_size ({t.vocab_size})"
                )
            if self.centroid_intermediate_top_k > self.num_centroids:
                raise ConfigError(
                    f"centroid_intermediate_top_k ({self.centroid_intermediate_top_k}) cannot exceed "
                    f"num_centroids ({self.num_centroids})"
                )

    @property
    def tokens_per_centroid(self) -> int:
        return self.text.vocab_size // self.num_centroids

    # ------------------------------------------------------------------ fitting a target
    def layers_for(self, target: Gemma4TextConfig) -> tuple[LayerSpec, ...]:
        """The drafter's layers, each reading the target's last producer layer of its type
        (raises ConfigError unless the drafter fits `target`, see `check_fits`)."""
        self.check_fits(target)
        producers = _last_producers(target)
        return tuple(
            replace(spec, kv_source=producers[spec.attention_type].index, reads_other_model=True)
            for spec in self.text.layers
        )

    def check_fits(self, target: Gemma4TextConfig) -> None:
        """Raise ConfigError unless this drafter can read `target`'s hidden states, vocabulary and KV."""
        if self.backbone_hidden_size != target.hidden_size:
            raise ConfigError(
                f"backbone_hidden_size ({self.backbone_hidden_size}) must equal the target's hidden_size "
                f"({target.hidden_size})"
            )
        if self.text.vocab_size != target.vocab_size:
            raise ConfigError(
                f"the assistant's vocab_size ({self.text.vocab_size}) must equal the target's ({target.vocab_size})"
            )
        producers = _last_producers(target)
        for spec in self.text.layers:
            source = producers.get(spec.attention_type)
            if source is None:
                raise ConfigError(f"assistant layer {spec.index} is {spec.attention_type}; the target has no such layer")
            for name in ("head_dim", "num_kv_heads"):
                if getattr(spec, name) != getattr(source, name):
                    raise ConfigError(
                        f"assistant layer {spec.index} ({spec.attention_type}) has {name} {getattr(spec, name)}, "
                        f"but the target layer {source.index} it reads has {getattr(source, name)}"
                    )

    # ------------------------------------------------------------------ (de)serialisation
    @classmethod
    def from_hf_dict(cls, raw: Mapping[str, Any], *, source: str = "config.json") -> "Gemma4AssistantConfig":
        """Read a `gemma4_assistant` config.json (transformers' field names and defaults)."""
        if not isinstance(raw, Mapping):
            raise ConfigError(f"{source}: expected a JSON object, got {type(raw).__name__}")
        if raw.get("model_type") != ASSISTANT_MODEL_TYPE:
            raise ConfigError(f"{source}: model_type is {raw.get('model_type')!r}, expected {ASSISTANT_MODEL_TYPE!r}")
        text_raw = raw.get("text_config")
        if not isinstance(text_raw, Mapping):
            raise ConfigError(f"{source}: an assistant config needs a 'text_config' object")
        text_source = f"{source}: text_config"
        layers = _get(text_raw, "num_hidden_layers", 30, int, text_source)
        # transformers turns an unset (0) count into "all layers shared", and requires exactly that.
        shared = _get(text_raw, "num_kv_shared_layers", 0, int, text_source) or layers
        if shared != layers:
            raise ConfigError(
                f"{text_source}: all layers of an assistant must be KV-shared: num_kv_shared_layers is {shared}, "
                f"num_hidden_layers {layers}"
            )
        try:
            _check_required(text_raw.get)  # before the text config is read: its own rules differ
        except ConfigError as exc:
            raise ConfigError(f"{text_source}: {exc}") from None
        try:
            text = Gemma4TextConfig.from_hf_dict({**text_raw, "num_kv_shared_layers": 0}, source=text_source)
            return cls(
                text=text,
                backbone_hidden_size=_get(raw, "backbone_hidden_size", 1536, int, source),
                use_ordered_embeddings=_get(raw, "use_ordered_embeddings", False, bool, source),
                num_centroids=_get(raw, "num_centroids", 2048, int, source),
                centroid_intermediate_top_k=_get(raw, "centroid_intermediate_top_k", 32, int, source),
                tie_word_embeddings=_get(raw, "tie_word_embeddings", True, bool, source),
            )
        except ConfigError as exc:
            message = str(exc)
            raise ConfigError(message if message.startswith(source) else f"{source}: {message}") from None

    def to_hf_dict(self) -> dict[str, Any]:
        """config.json as transformers writes it for `Gemma4AssistantForCausalLM`."""
        text = self.text.to_hf_dict()
        text.update(num_kv_shared_layers=self.text.num_hidden_layers, vocab_size_per_layer_input=0)
        return {
            "architectures": [ASSISTANT_ARCHITECTURE],
            "model_type": ASSISTANT_MODEL_TYPE,
            "text_config": text,
            "backbone_hidden_size": self.backbone_hidden_size,
            "use_ordered_embeddings": self.use_ordered_embeddings,
            "num_centroids": self.num_centroids,
            "centroid_intermediate_top_k": self.centroid_intermediate_top_k,
            "tie_word_embeddings": self.tie_word_embeddings,
        }


# transformers' `validate_architecture`: (text field, transformers' default, the only value allowed).
_REQUIRED: tuple[tuple[str, Any, Any], ...] = (
    ("hidden_size_per_layer_input", 256, 0),
    ("vocab_size_per_layer_input", 262_144, 0),
    ("enable_moe_block", False, False),
    ("use_double_wide_mlp", False, False),
)


def _check_required(get: Callable[[str, Any], Any]) -> None:
    """Raise ConfigError naming the first text field (read with `get(name, default)`) an assistant forbids."""
    for name, default, required in _REQUIRED:
        value = get(name, default)
        if value != required or type(value) is not type(required):
            raise ConfigError(f"{name} must be {json.dumps(required)} in an assistant, got {value!r}")


def _last_producers(target: Gemma4TextConfig) -> dict[str, LayerSpec]:
    """The target's last layer of each attention type that computes its own keys/values."""
    return {spec.attention_type: spec for spec in target.layers if not spec.shares_kv}


def load_assistant_config(path: str | Path) -> Gemma4AssistantConfig:
    """Read `config.json` from an assistant checkpoint directory (or the file itself)."""
    path = Path(path)
    file = path / "config.json" if path.is_dir() else path
    try:
        raw = json.loads(file.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise ConfigError(f"{file}: no config.json (is this an assistant checkpoint directory?)") from None
    except json.JSONDecodeError as exc:
        raise ConfigError(f"{file}: not valid JSON ({exc})") from None
    return Gemma4AssistantConfig.from_hf_dict(raw, source=str(file))


# The drafter at position p reads sliding keys from p - W - 1; the target's query at p from p - W + 1.
ASSISTANT_SLIDING_LOOKBACK = 2


def sliding_keys(spec: LayerSpec) -> int | None:
    """Keys a drafter layer sees: all before the drafted position (full), or the last `window + 1`."""
    return None if spec.sliding_window is None else spec.sliding_window + 1
