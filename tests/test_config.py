"""gemma4.config: released variants, both config.json forms, validation, and no torch import."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from gemma4.config import (
    FULL,
    SLIDING,
    ConfigError,
    Gemma4Config,
    Gemma4TextConfig,
    load_config,
    variant_config,
)

REPO = Path(__file__).resolve().parents[1]


def test_import_does_not_pull_in_torch() -> None:
    code = "import sys, gemma4.config, gemma4; print('torch' in sys.modules)"
    out = subprocess.run(
        [sys.executable, "-c", code], cwd=REPO, env={"PYTHONPATH": str(REPO / "model")},
        capture_output=True, text=True, check=True,
    )
    assert out.stdout.strip() == "False"


@pytest.mark.parametrize(
    "name,full_layers,shared,producers",
    [
        ("e2b", [4, 9, 14, 19, 24, 29, 34], range(15, 35), {SLIDING: 13, FULL: 14}),
        ("e4b", [5, 11, 17, 23, 29, 35, 41], range(24, 42), {SLIDING: 22, FULL: 23}),
        ("26b-a4b", [5, 11, 17, 23, 29], range(0), {}),
        ("31b", list(range(5, 60, 6)), range(0), {}),
    ],
)
def test_variant_layer_geometry(name: str, full_layers: list[int], shared: range, producers: dict) -> None:
    text = variant_config(name).text
    assert [s.index for s in text.layers if s.attention_type == FULL] == full_layers
    assert [s.index for s in text.layers if s.shares_kv] == list(shared)
    for spec in text.layers:
        if spec.shares_kv:
            assert spec.kv_source == producers[spec.attention_type]
        assert spec.head_dim == (512 if spec.attention_type == FULL else 256)
        assert spec.sliding_window == (None if spec.attention_type == FULL else text.sliding_window)


def test_variant_specific_values() -> None:
    e2b, e4b, moe, dense = (variant_config(n).text for n in ("E2B", "gemma-4-E4B-it", "26b-a4b", "31B"))
    assert [s.intermediate_size for s in e2b.layers][14:16] == [6144, 12288]  # double-wide on shared layers
    assert {s.num_kv_heads for s in e4b.layers} == {2}
    assert {(s.attention_type, s.num_kv_heads, s.k_eq_v) for s in moe.layers} == {(SLIDING, 8, False), (FULL, 2, True)}
    assert {(s.attention_type, s.num_kv_heads, s.k_eq_v) for s in dense.layers} == {(SLIDING, 16, False), (FULL, 4, True)}
    assert (moe.num_experts, moe.top_k_experts, moe.moe_intermediate_size) == (128, 8, 704)
    assert (e2b.sliding_window, dense.sliding_window) == (512, 1024)
    assert dense.max_position_embeddings == 262_144 and e2b.max_position_embeddings == 131_072
    assert dense.full_rope.rotated_pairs(512) == 64 and dense.sliding_rope.rotated_pairs(256) == 128
    assert variant_config("e2b").modalities == ("text", "image", "video", "audio")
    assert variant_config("31b").modalities == ("text", "image", "video")
    with pytest.raises(ConfigError, match="unknown Gemma 4 variant 'gemma-3'"):
        variant_config("gemma-3")


def _official_config_json(name: str) -> dict:
    """The nested form the official checkpoints carry (converter keys, not per_layer_config)."""
    cfg = variant_config(name)
    return {
        "architectures": ["Gemma4ForConditionalGeneration"],
        "model_type": "gemma4",
        "text_config": cfg.text.to_hf_dict(),
        "vision_config": {"model_type": "gemma4_vision", "hidden_size": cfg.vision.hidden_size},
        "audio_config": {"model_type": "gemma4_audio"} if cfg.audio else None,
        "image_token_id": 258880, "eos_token_id": [1, 106], "eoa_token_index": 258883,
    }


@pytest.mark.parametrize("name", ["e2b", "e4b", "26b-a4b", "31b"])
def test_nested_config_json_round_trip(tmp_path: Path, name: str) -> None:
    (tmp_path / "config.json").write_text(json.dumps(_official_config_json(name)))
    loaded = load_config(tmp_path)
    assert loaded.text == variant_config(name).text
    assert loaded.text.layers == variant_config(name).text.layers
    assert loaded.family == name
    assert loaded.eos_token_ids == (1, 106)
    assert (loaded.audio is not None) == (name in ("e2b", "e4b"))


def test_text_only_config_json(tmp_path: Path) -> None:
    raw = variant_config("31b").text.to_hf_dict()
    (tmp_path / "config.json").write_text(json.dumps(raw))
    loaded = load_config(tmp_path / "config.json")
    assert loaded.architecture == "Gemma4ForCausalLM"
    assert loaded.text == variant_config("31b").text
    assert loaded.multimodal_placeholder_ids == ()


def test_transformers_reads_our_dict_the_same_way() -> None:
    """transformers' own config class derives the same per-layer geometry from our converter-form dict."""
    import transformers

    for name in ("e2b", "26b-a4b"):
        ours = variant_config(name).text
        raw = ours.to_hf_dict()
        raw.pop("model_type")
        hf = transformers.Gemma4TextConfig(**raw)
        for spec in ours.layers:
            hf_layer = hf.per_layer_config[spec.index]
            assert (hf_layer.head_dim, hf_layer.num_key_value_heads) == (spec.head_dim, spec.num_kv_heads)
        assert [m == "reuse" for m in hf.kv_sharing_modes] == [s.shares_kv for s in ours.layers]


def test_global_kv_override_applies_only_to_k_eq_v_models() -> None:
    raw = variant_config("e4b").text.to_hf_dict() | {"num_global_key_value_heads": 1}
    assert Gemma4TextConfig.from_hf_dict(raw).global_kv_heads == 2  # ignored, as transformers does


BAD_TEXT_CONFIGS = [
    ({"model_type": "llama"}, "unknown model_type 'llama'"),
    ({"model_type": "gemma4"}, "needs a 'text_config' object"),
    ({"model_type": "gemma4_text", "num_attention_heads": 6, "num_key_value_heads": 4},
     "num_attention_heads \\(6\\) must be a multiple"),
    ({"model_type": "gemma4_text", "num_hidden_layers": 2, "layer_types": ["full_attention"]},
     "layer_types has 1 entries but num_hidden_layers is 2"),
    ({"model_type": "gemma4_text", "num_hidden_layers": 2, "layer_types": ["full_attention", "sliding_attention"]},
     "last entry of layer_types must be 'full_attention'"),
    ({"model_type": "gemma4_text", "num_hidden_layers": 1, "layer_types": ["chunked"]},
     "layer_types\\[0\\] is 'chunked'"),
    ({"model_type": "gemma4_text", "enable_moe_block": True}, "num_experts must be a positive integer"),
    ({"model_type": "gemma4_text", "enable_moe_block": True, "num_experts": 4, "top_k_experts": 8,
      "moe_intermediate_size": 8}, "top_k_experts \\(8\\) cannot exceed num_experts \\(4\\)"),
    ({"model_type": "gemma4_text", "hidden_size": "big"}, "hidden_size must be int, got 'big'"),
    ({"model_type": "gemma4_text", "hidden_activation": "relu"}, "hidden_activation 'relu' is not supported"),
    ({"model_type": "gemma4_text", "rope_parameters": {"full_attention": {"rope_type": "yarn", "rope_theta": 1.0}}},
     "rope_parameters.full_attention: rope_type 'yarn' is not supported"),
    ({"model_type": "gemma4_text", "num_kv_shared_layers": 30}, "num_kv_shared_layers must be in"),
    ({"model_type": "gemma4_text", "vocab_size": 100, "eos_token_id": [1, 106]}, "eos_token_id\\[1\\] must be a token id"),
    ({"model_type": "gemma4_text", "per_layer_config": {"x": {}}}, "per_layer_config keys must be layer indices"),
    ({"model_type": "gemma4_text", "attention_bias": True}, "attention_bias=true is not supported"),
]


@pytest.mark.parametrize("raw,message", BAD_TEXT_CONFIGS)
def test_invalid_configs_get_clear_errors(raw: dict, message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        Gemma4Config.from_hf_dict(raw)


def test_missing_and_malformed_config_files(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="no config.json"):
        load_config(tmp_path)
    (tmp_path / "config.json").write_text("{not json")
    with pytest.raises(ConfigError, match="config.json: not valid JSON"):
        load_config(tmp_path)
